"""Print versions, devices, optional extras (and why each missing one is missing), presets and registries."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import platform
from collections.abc import Callable

from pae_fast.cli.common import list_presets, no_extra

# (import name, distribution, what it is for)
_OPTIONAL = [
    ("triton", "triton", "fused kernels (bundled with CUDA builds of torch)"),
    ("nvidia.dali", "nvidia-dali-cuda130", "DALI data loading (extra: dali)"),
    ("flash_attn", "flash-attn", "FlashAttention attention backend (extra: flash)"),
    ("xformers", "xformers", "xformers attention backend (extra: xformers)"),
    ("apex", "apex", "NVIDIA apex FusedAdam (optional; build from NVIDIA's repository)"),
    ("torch.utils.tensorboard", "tensorboard", "tensorboard logging (optional)"),
    ("timm", "timm", "vision foundation model backbones"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", action="store_true", help="also list the bundled config presets")
    p.add_argument("--model", metavar="NAME", help="print a generator's parameters and forward GMAC per image and exit")
    p.add_argument("--tokenizer", metavar="NAME",
                   help="print a tokenizer's frozen/trainable parameters, latent shape and encode/decode GMAC per "
                   "image and exit")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def extras_status() -> list[tuple[str, str | None, str | None, str]]:
    """(module, version, reason-missing, purpose) for each optional component."""
    rows = []
    for mod, dist, purpose in _OPTIONAL:
        try:
            m = importlib.import_module(mod)
            ver = getattr(m, "__version__", None) or _version(dist) or "?"
            if mod == "apex" and not _is_nvidia_apex():
                rows.append((mod, None, "the installed 'apex' is not NVIDIA apex (no apex.optimizers)", purpose))
                continue
            rows.append((mod, str(ver), None, purpose))
        except Exception as e:  # ImportError or a broken install: report why
            reason = f"not installed (pip install {dist})" if isinstance(e, ModuleNotFoundError) else str(e)
            rows.append((mod, None, reason.splitlines()[0][:160], purpose))
    return rows


def _is_nvidia_apex() -> bool:
    try:
        importlib.import_module("apex.optimizers")
        return True
    except Exception:
        return False


def _describe(option: str, name: str, describe: Callable[[str], str]) -> int:
    """Print ``describe(name)`` (built on the meta device: no memory, no weights); an unknown name is a config error."""
    from pae_fast.config import ConfigError

    try:
        print(describe(name))
    except KeyError as e:  # unknown name: the registry's message lists the valid ones
        raise ConfigError(f"{option}: {e.args[0]}") from None
    return 0


def main(args: argparse.Namespace, extra: list[str]) -> int:
    no_extra(extra, "info")
    if args.model:
        from pae_fast.models.profile import describe_generator

        return _describe("--model", args.model, describe_generator)
    if args.tokenizer:
        from pae_fast.models.tokenizer import describe_tokenizer

        return _describe("--tokenizer", args.tokenizer, describe_tokenizer)
    import torch

    import pae_fast

    print(f"pae_fast {pae_fast.__version__}  python {platform.python_version()}  {platform.platform()}")
    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i} {p.name}  {p.total_memory / 2**30:.1f} GiB  sm_{p.major}{p.minor}")
    else:
        print("  no CUDA device: kernels run through their PyTorch references (or the Triton interpreter)")
    print("optional components:")
    for mod, ver, why, purpose in extras_status():
        state = ver if why is None else f"missing: {why}"
        print(f"  {mod:<24} {state:<60} {purpose}")
    print("generators:", ", ".join(pae_fast.list_generators()) or "(none registered)")
    print("tokenizers:", ", ".join(pae_fast.list_tokenizers()) or "(none registered)")
    if args.presets:
        print("presets:", ", ".join(list_presets()) or "(none)")
    return 0

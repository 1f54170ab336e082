"""Command-line entry point. Each module in this package is one subcommand (``train_dit.py`` -> ``train-dit``).

A command module keeps its imports light at the top and defines:

- its docstring (first line = the one-line help),
- ``add_arguments(parser)``: its own arguments (config commands call ``common.add_config_arguments``),
- ``main(args, extra) -> int``: ``extra`` holds the unparsed ``--section.key value`` overrides.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

__all__ = ["main", "commands"]

_NOT_COMMANDS = {"common"}


def commands() -> dict[str, ModuleType]:
    """Discover the subcommand modules of this package."""
    import pae_fast.cli as pkg

    out = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in _NOT_COMMANDS:
            continue
        mod = importlib.import_module(f"pae_fast.cli.{info.name}")
        if hasattr(mod, "main") and hasattr(mod, "add_arguments"):
            out[info.name.replace("_", "-")] = mod
    return out


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(
        prog="python -m pae_fast",
        description="pae_fast: Prior-Aligned Autoencoders for latent diffusion on fused Triton kernels. "
        "Config commands take --config PRESET.yaml, dotted overrides (--train.steps 20) and --dry-run.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cmds = commands()
    for name, mod in cmds.items():
        doc = (mod.__doc__ or "").strip()
        sp = sub.add_parser(
            name,
            help=doc.splitlines()[0] if doc else name,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(sp)
        sp.set_defaults(_command=mod)
    return parser, cmds


def main(argv: list[str] | None = None) -> int:
    from pae_fast.config import ConfigError

    parser, _ = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._command.main(args, extra) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

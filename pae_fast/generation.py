"""Generator training and sampling: the library functions behind ``train-dit`` and ``sample`` (SPEC §4).

``train_generator(cfg)`` trains a LightningDiT / DiTᴰᴴ with flow matching on a latent cache (``data.root``) through
the shared engine; ``sample_generator(cfg)`` integrates the trained velocity field from noise with guidance and
writes decoded images (PNG grid, per-image PNGs, ADM npz) or, without a tokenizer, the latents and a
latent-channel preview grid.

Latents are standardised per channel with the cache statistics for training; the statistics travel with the
run (``latent_stats.safetensors`` in the run folder and the checkpoint metadata) so that sampling can
de-normalise ``z = x·std + mean`` before decoding.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pae_fast.config import Config, ConfigError, config_from_dict, dump_yaml, save_resolved
from pae_fast.flow.guidance import (
    AutoGuidance,
    ClassifierFreeGuidance,
    class_balanced_labels,
    conditional_velocity,
    random_labels,
)
from pae_fast.flow.loss import FlowLoss
from pae_fast.flow.samplers import VelocityFn, sample
from pae_fast.flow.timesteps import dimension_shift
from pae_fast.io import load_safetensors, save_safetensors

__all__ = [
    "STATS_FILE",
    "resolve_train_shift",
    "build_generator_task",
    "train_generator",
    "resolve_weights_file",
    "load_generator",
    "make_velocity_fn",
    "initial_noise",
    "generate_latents",
    "sample_labels",
    "sample_generator",
    "save_image_grid",
    "latent_preview",
]

log = logging.getLogger("pae_fast.generation")

STATS_FILE = "latent_stats.safetensors"  # per-channel mean/std of the training cache, in the run folder


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def resolve_train_shift(flow: Any, latent_shape: tuple[int, ...]) -> float:
    """The training shift: ``flow.shift``, or RAE's dimension rule ``s = sqrt(4096 / m)`` when
    ``flow.dimension_shift`` (m = C·H·W of one latent, i.e. tokens × channels)."""
    if flow.dimension_shift:
        return dimension_shift(math.prod(latent_shape))
    return flow.shift


class _SyntheticLatents(torch.utils.data.Dataset):
    """``data.source: synthetic`` without ``data.root``: the class-Gaussian latent set of
    :mod:`pae_fast.data.synthetic`, held in memory and standardised like a cache (no flips: a flipped class mean
    is another distribution)."""

    def __init__(self, data: Any, seed: int) -> None:
        from pae_fast.data.latent_cache import latent_stats
        from pae_fast.data.synthetic import SyntheticLatentSpec, synthetic_latents

        spec = SyntheticLatentSpec(data.num_classes, data.latent_channels, data.latent_size, seed=seed)
        z, self.labels = synthetic_latents(spec, max(1, data.synthetic_size // data.num_classes), seed=seed + 1)
        self.mean, self.std = latent_stats(z)
        self.latents = (z - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        self.num_classes = data.num_classes
        self.path = f"synthetic(num_classes={data.num_classes}, C={data.latent_channels}, size={data.latent_size})"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.latents[i], self.labels[i]


def _open_data(cfg: Config) -> Any:
    from pae_fast.data.latent_cache import LatentCache

    if not cfg.data.root:
        if cfg.data.source == "synthetic":
            return _SyntheticLatents(cfg.data, cfg.seed)
        raise ConfigError(
            "train-dit trains on a latent cache: set data.root to a cache folder (index.json, shard-*.safetensors, "
            "stats.safetensors), e.g. --data.root runs/latents (or data.source=synthetic for a synthetic set)"
        )
    try:
        return LatentCache(cfg.data.root, normalize=True, hflip=cfg.data.hflip)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.root={cfg.data.root!r}: {e}") from e


def _check_data_fits_model(shape: tuple[int, ...], num_classes: int | None, model_cfg: Any, where: str) -> None:
    problems = []
    if len(shape) != 3:
        problems.append(f"items must be latents (C, H, W), got shape {shape}")
    else:
        c, h, w = shape
        if c != model_cfg.in_channels:
            problems.append(f"model.in_channels is {model_cfg.in_channels} but the cache has {c} channels")
        if h != w or h != model_cfg.input_size:
            problems.append(f"model.input_size is {model_cfg.input_size} but the cache latents are {h}x{w}")
    if num_classes is not None and num_classes > model_cfg.num_classes:
        problems.append(f"model.num_classes is {model_cfg.num_classes} but the cache has {num_classes} classes")
    if problems:
        raise ConfigError(f"the latent data {where} does not fit the generator: " + "; ".join(problems))


def build_generator_task(cfg: Config, dataset: Any = None) -> tuple[Any, Config]:
    """Everything :func:`pae_fast.engine.train` needs to train the generator, without running it.

    Args:
        cfg: the run config (``model``, ``flow``, ``data``).
        dataset: a map-style dataset of ``(latent (C, H, W) standardised, label)``; default: the latent cache at
            ``data.root`` (standardised with its stats, h-flips as extra items when ``data.hflip``), or without a
            root and with ``data.source: synthetic`` an in-memory synthetic class-Gaussian set. A dataset
            passed here must expose ``mean``/``std`` ``(C,)`` when its latents are standardised (else 0 / 1).

    Returns:
        ``(TrainTask, resolved cfg)``; the resolved config holds the training shift actually used.
    """
    from pae_fast.engine.task import TrainTask
    from pae_fast.models.lightningdit import generator_from_config

    ds = _open_data(cfg) if dataset is None else dataset
    if len(ds) == 0:
        raise ConfigError(f"the latent data {getattr(ds, 'path', type(ds).__name__)} is empty")
    shape = tuple(ds[0][0].shape)
    _check_data_fits_model(shape, getattr(ds, "num_classes", None), cfg.model, str(getattr(ds, "path", "")))
    shift = resolve_train_shift(cfg.flow, shape)
    cfg = dataclasses.replace(cfg, flow=dataclasses.replace(cfg.flow, shift=shift))
    model = generator_from_config(cfg.model)
    c = shape[0]
    mean = getattr(ds, "mean", torch.zeros(c))
    std = getattr(ds, "std", torch.ones(c))
    metadata = {
        "generator": cfg.model.name,
        "latent_shape": json.dumps(list(shape)),
        "latent_mean": json.dumps([float(v) for v in mean]),
        "latent_std": json.dumps([float(v) for v in std]),
        "train_shift": repr(shift),
        "latent_cache": str(getattr(ds, "path", "")),
    }
    task = TrainTask(
        name="generator",
        model=model,
        loss_fn=FlowLoss.from_config(cfg.flow),
        dataset=ds,
        metadata=metadata,
    )
    return task, cfg


def train_generator(cfg: Config) -> Path:
    """Train a generator on a latent cache with the shared engine (``train-dit``).

    Writes ``<out_dir>/config.yaml`` (resolved), ``<out_dir>/latent_stats.safetensors`` and the engine's
    checkpoints (``<out_dir>/checkpoints/<step>/{model,ema}.safetensors`` with the stats in their metadata).

    Returns:
        the run folder.
    """
    from pae_fast.engine import train
    from pae_fast.engine.distributed import is_main

    task, cfg = build_generator_task(cfg)
    out = Path(cfg.out_dir)
    if cfg.flow.dimension_shift:
        log.info("dimension-dependent training shift s = %.4f (m = %s)", cfg.flow.shift, task.metadata["latent_shape"])
    if is_main():
        mean = torch.tensor(json.loads(task.metadata["latent_mean"]))
        std = torch.tensor(json.loads(task.metadata["latent_std"]))
        save_safetensors({"mean": mean, "std": std}, out / STATS_FILE, metadata={"latent_cache": cfg.data.root or ""})
    # the engine writes <out_dir>/config.yaml (the resolved config, with the training shift actually used)
    train(task, cfg.train, cfg.out_dir, seed=cfg.seed, config_yaml=dump_yaml(cfg))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loading a trained generator
# ----------------------------------------------------------------------------------------------------------------


def resolve_weights_file(path: str | os.PathLike, use_ema: bool = True, key: str = "sample.checkpoint") -> Path:
    """The weights file of a run folder (newest valid checkpoint), a checkpoint folder or a ``.safetensors`` file.

    Args:
        path: run folder, checkpoint folder or weights file.
        use_ema: prefer ``ema.safetensors`` over ``model.safetensors`` in a checkpoint folder.
        key: the config key named in error messages.
    """
    from pae_fast.engine.checkpoint import MANIFEST, checkpoint_root, latest_checkpoint, validate_checkpoint

    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise ConfigError(f"{key}={str(path)!r} does not exist (expected a run folder, a checkpoint "
                          "folder or a .safetensors file)")
    if (p / MANIFEST).is_file():
        validate_checkpoint(p)
        ckpt = p
    else:
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise ConfigError(f"{key}={str(path)!r}: no complete checkpoint under {checkpoint_root(p)}")
    names = ("ema", "model") if use_ema else ("model", "ema")
    for name in names:
        if (ckpt / f"{name}.safetensors").is_file():
            return ckpt / f"{name}.safetensors"
    raise ConfigError(f"checkpoint {ckpt} holds neither ema.safetensors nor model.safetensors")


def _read_metadata(file: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ConfigError(f"{file} is damaged or not a safetensors file: {e}") from e


def load_generator(
    path: str | os.PathLike,
    use_ema: bool = True,
    device: torch.device | str = "cpu",
    name: str | None = None,
    key: str = "sample.checkpoint",
    like: Any = None,
) -> tuple[nn.Module, dict[str, str]]:
    """Build a trained generator from its checkpoint (architecture from the run config in the metadata).

    Args:
        path: run folder, checkpoint folder or weights file (see :func:`resolve_weights_file`).
        use_ema: load the EMA weights when the checkpoint has them.
        device: where to put the model.
        name: registered generator name; required only when the metadata holds no run config.
        key: the config key named in error messages.
        like: a :class:`~pae_fast.config.GeneratorConfig` whose latent shape and classes (``in_channels``,
            ``input_size``, ``num_classes``) a checkpoint without a run config shares, e.g. the main model of
            AutoGuidance for its guide; the variant's defaults otherwise.

    Returns:
        ``(model in eval mode, metadata)``; the metadata gains ``"weights_file"``.
    """
    from pae_fast.engine.checkpoint import load_checkpoint_weights
    from pae_fast.models.lightningdit import generator_from_config

    file = resolve_weights_file(path, use_ema, key)
    meta = _read_metadata(file)
    if "config" in meta:
        import yaml

        model_cfg = config_from_dict(yaml.safe_load(meta["config"]), where=f" (metadata of {file})").model
    elif name is not None:
        model_cfg = Config().model
        model_cfg.name = name
        if like is not None:  # same latent space as ``like``; architecture from the named variant
            model_cfg = dataclasses.replace(
                model_cfg, in_channels=like.in_channels, input_size=like.input_size, num_classes=like.num_classes
            )
    else:
        raise ConfigError(f"{key}: {file} carries no run config in its metadata; name the generator")
    if name is not None and name != model_cfg.name:
        raise ConfigError(f"{key}: {file} holds a {model_cfg.name} but {name} was requested")
    model_cfg = dataclasses.replace(model_cfg, checkpoint=None, grad_checkpointing=False)
    model = generator_from_config(model_cfg)
    load_checkpoint_weights(file, model)
    meta["weights_file"] = str(file)
    return model.to(device).eval(), meta


def _model_config(meta: dict[str, str]) -> Any:
    """The generator config stored in a checkpoint's metadata (None when it carries none)."""
    if "config" not in meta:
        return None
    import yaml

    return config_from_dict(yaml.safe_load(meta["config"])).model


def _latent_stats(meta: dict[str, str], weights_file: Path, channels: int) -> tuple[Tensor, Tensor]:
    """The training cache's per-channel mean/std: checkpoint metadata first, then the run's stats file."""
    if "latent_mean" in meta and "latent_std" in meta:
        mean, std = torch.tensor(json.loads(meta["latent_mean"])), torch.tensor(json.loads(meta["latent_std"]))
    else:
        for folder in weights_file.parents[:3]:
            if (folder / STATS_FILE).is_file():
                stats, _ = load_safetensors(folder / STATS_FILE)
                mean, std = stats["mean"], stats["std"]
                break
        else:
            raise ConfigError(f"no latent statistics for {weights_file}: neither its metadata nor a {STATS_FILE} "
                              "next to it; they are needed to de-normalise the samples")
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ConfigError(f"latent statistics of {weights_file} have {mean.numel()} channels, the model {channels}")
    return mean.float(), std.float()


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


def make_velocity_fn(model: nn.Module, y: Tensor, sample_cfg: Any, guide: nn.Module | None = None) -> VelocityFn:
    """The velocity function ``sample.guidance`` asks for (none / CFG with interval / AutoGuidance)."""
    if sample_cfg.guidance == "none":
        return conditional_velocity(model, y)
    if sample_cfg.guidance == "cfg":
        return ClassifierFreeGuidance(model, y, sample_cfg.cfg_scale, sample_cfg.cfg_interval_start)
    if sample_cfg.guidance == "autoguidance":
        if guide is None:
            raise ConfigError("sample.guidance=autoguidance needs a guide model: set sample.guide_checkpoint")
        return AutoGuidance(model, guide, y, sample_cfg.autoguidance_scale)
    raise ConfigError(f"sample.guidance: expected 'none', 'cfg' or 'autoguidance', got {sample_cfg.guidance!r}")


def sample_labels(num_classes: int, sample_cfg: Any) -> Tensor:
    """Class-balanced labels (``sample.per_class`` of each class, shuffled) or ``sample.num_samples`` random ones."""
    g = torch.Generator().manual_seed(sample_cfg.seed)
    if sample_cfg.per_class is not None:
        return class_balanced_labels(num_classes, sample_cfg.per_class, shuffle=True, generator=g)
    return random_labels(sample_cfg.num_samples, num_classes, generator=g)


def initial_noise(seed: int, indices: range, latent_shape: tuple[int, ...]) -> Tensor:
    """``(len(indices), *latent_shape)`` CPU noise; sample ``i`` is drawn from its own generator seeded by
    ``(seed, i)``, so any batching (or a split over processes) reproduces the same noise."""
    out = torch.empty(len(indices), *latent_shape)
    g = torch.Generator()
    for j, i in enumerate(indices):
        g.manual_seed(seed * 1_000_003 + i)
        out[j] = torch.randn(latent_shape, generator=g)
    return out


def generate_latents(
    model: nn.Module,
    labels: Tensor,
    latent_shape: tuple[int, int, int],
    sample_cfg: Any,
    guide: nn.Module | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Tensor:
    """Sample standardised latents for ``labels`` in batches of ``sample.batch_size``.

    The initial noise of sample ``i`` depends only on ``sample.seed`` and ``i`` (:func:`initial_noise`), so the ODE
    samplers' results do not depend on the batch size.

    Returns:
        ``(N, C, H, W)`` float32 on the CPU, in the model's (standardised) latent space.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    n = labels.numel()
    sde_gen = torch.Generator(device=device).manual_seed(sample_cfg.seed + 1)
    amp = device.type == "cuda" and sample_cfg.precision != "fp32"
    dtype = torch.bfloat16 if sample_cfg.precision == "bf16" else torch.float16
    out = []
    starts = range(0, n, sample_cfg.batch_size)
    for s in tqdm(starts, desc="sampling", disable=not progress, unit="batch"):
        y = labels[s : s + sample_cfg.batch_size].to(device)
        fn = make_velocity_fn(model, y, sample_cfg, guide)

        def velocity(x: Tensor, t: Tensor, fn: VelocityFn = fn) -> Tensor:
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                return fn(x, t).float()

        x = sample(
            velocity,
            initial_noise(sample_cfg.seed, range(s, min(n, s + sample_cfg.batch_size)), latent_shape).to(device),
            sampler=sample_cfg.sampler,
            steps=sample_cfg.steps,
            shift=sample_cfg.shift,
            noise_scale=sample_cfg.sde_noise_scale,
            generator=sde_gen,
        )
        out.append(x.float().cpu())
    return torch.cat(out)


def sample_generator(cfg: Config) -> list[Path]:
    """Sample a trained generator (``sample``); returns the files (and the per-image folder) written.

    With ``sample.tokenizer_checkpoint`` the de-normalised latents are decoded by the registered tokenizer
    ``tokenizer.name`` into ``grid.png``, ``images/<i>.png`` and ``samples.npz`` (ADM: ``arr_0`` uint8
    ``(N, H, W, 3)``, plus ``labels``); otherwise ``latents.safetensors`` (``latents (N, C, H, W)`` de-normalised,
    ``labels (N,)``) and ``latent_grid.png`` are written. Output folder: ``sample.output_dir`` or
    ``<out_dir>/samples``.
    """
    from pae_fast.engine.distributed import default_device, get_world_size

    sc = cfg.sample
    if not sc.checkpoint:
        raise ConfigError("sample.checkpoint is not set: pass --sample.checkpoint RUN_OR_CHECKPOINT")
    if sc.steps < 1 or sc.batch_size < 1 or (sc.per_class is None and sc.num_samples < 1):
        raise ConfigError(f"sample.steps, sample.batch_size and sample.num_samples must be >= 1, got {sc.steps}, "
                          f"{sc.batch_size}, {sc.num_samples}")
    if sc.per_class is not None and sc.per_class < 1:
        raise ConfigError(f"sample.per_class must be >= 1 (or null), got {sc.per_class}")
    if get_world_size() > 1:
        raise ConfigError("sample runs as a single process: launch it with python, not torchrun")
    device = default_device(sc.device)
    model, meta = load_generator(sc.checkpoint, sc.use_ema, device)
    main_cfg = _model_config(meta)
    guide = None
    if sc.guidance == "autoguidance":
        if not sc.guide_checkpoint:
            raise ConfigError("sample.guidance=autoguidance needs sample.guide_checkpoint (a small / early generator)")
        guide, _ = load_generator(
            sc.guide_checkpoint, sc.use_ema, device, sc.guide_name, "sample.guide_checkpoint", like=main_cfg
        )
    weights_file = Path(meta["weights_file"])
    if "latent_shape" in meta:
        shape = tuple(json.loads(meta["latent_shape"]))
    else:
        shape = (model.in_channels, model.input_size, model.input_size)
    mean, std = _latent_stats(meta, weights_file, shape[0])
    num_classes = int(getattr(model, "num_classes", cfg.model.num_classes))
    labels = sample_labels(num_classes, sc)

    tokenizer = _load_tokenizer(cfg, device) if sc.tokenizer_checkpoint else None
    out_dir = Path(sc.output_dir) if sc.output_dir else Path(cfg.out_dir) / "samples"
    log.info("sampling %d latents %s from %s (%s, %d steps, guidance %s) into %s",
             labels.numel(), shape, weights_file, sc.sampler, sc.steps, sc.guidance, out_dir)
    z = generate_latents(model, labels, shape, sc, guide, device)
    z = z * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)  # back to the tokenizer's latent space
    written = [save_resolved(cfg, out_dir)]
    if tokenizer is None:
        save_safetensors({"latents": z, "labels": labels}, out_dir / "latents.safetensors",
                         metadata={"generator": str(weights_file), "config": dump_yaml(cfg)})
        written.append(out_dir / "latents.safetensors")
        if sc.save_png:
            preview = latent_preview(z[: min(sc.grid_max, 16)])
            nrow = min(shape[0], 8)  # one row per sample, one column per channel
            written.append(save_image_grid(preview, out_dir / "latent_grid.png", nrow=nrow))
        return written
    written += _decode_and_save(tokenizer, z, labels, sc, out_dir, device)
    return written


def _load_tokenizer(cfg: Config, device: torch.device) -> nn.Module:
    from pae_fast.engine.checkpoint import load_checkpoint_weights
    from pae_fast.registry import create_tokenizer

    try:
        tok = create_tokenizer(cfg.tokenizer.name)
    except KeyError as e:
        raise ConfigError(f"tokenizer.name={cfg.tokenizer.name!r} cannot decode sample.tokenizer_checkpoint="
                          f"{cfg.sample.tokenizer_checkpoint!r}: {e.args[0]}") from e
    if not callable(getattr(tok, "decode", None)):
        raise ConfigError(f"tokenizer {cfg.tokenizer.name!r} has no decode(latents) method")
    load_checkpoint_weights(cfg.sample.tokenizer_checkpoint, tok, which="ema" if cfg.sample.use_ema else "model")
    return tok.to(device).eval()


@torch.no_grad()
def _decode_and_save(tok: nn.Module, z: Tensor, labels: Tensor, sc: Any, out_dir: Path, device: torch.device):
    """Decode in batches into one preallocated uint8 ``(N, H, W, 3)`` array (50k ImageNet samples: 9.8 GB)."""
    from pae_fast.eval.images import save_npz_images, to_uint8_hwc

    arr = None
    img_dir = out_dir / "images"
    for s in range(0, z.shape[0], sc.batch_size):
        x = tok.decode(z[s : s + sc.batch_size].to(device))  # (B, 3, H, W) in [0, 1]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"tokenizer.decode returned shape {tuple(x.shape)}; expected images (B, 3, H, W)")
        u8 = to_uint8_hwc(x.float().clamp(0, 1).cpu())
        if arr is None:
            import numpy as np

            arr = np.empty((z.shape[0], *u8.shape[1:]), dtype=np.uint8)
        arr[s : s + len(u8)] = u8
        if sc.save_png:
            for i, im in enumerate(u8):
                _save_png(im, img_dir / f"{s + i:06d}.png")
    written = []
    if sc.save_png:
        grid = torch.from_numpy(arr[: sc.grid_max]).permute(0, 3, 1, 2).float() / 255
        written += [save_image_grid(grid, out_dir / "grid.png"), img_dir]
    if sc.save_npz:
        written.append(save_npz_images(out_dir / "samples.npz", arr, labels=labels.numpy()))
    return written


# ----------------------------------------------------------------------------------------------------------------
# Image outputs
# ----------------------------------------------------------------------------------------------------------------


def _save_png(hwc_uint8: Any, path: Path) -> Path:
    from PIL import Image

    from pae_fast.io import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(hwc_uint8).save(tmp, format="PNG")
    return path


def save_image_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 2) -> Path:
    """Save ``(N, 3, H, W)`` images in [0, 1] as one PNG grid (``nrow`` per row, default ≈ sqrt(N)), atomically."""
    from torchvision.utils import make_grid

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(images.shape)}")
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images.float().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0)
    hwc = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return _save_png(hwc, Path(path))


def latent_preview(latents: Tensor, max_channels: int = 8, min_tile: int = 32) -> Tensor:
    """Grey tiles of latent channels for a quick look: one row per sample, one column per channel.

    Each channel is scaled by its 1st/99th percentile over the shown samples; tiles are upscaled (nearest) to at
    least ``min_tile`` pixels.

    Args:
        latents: ``(N, C, H, W)``.

    Returns:
        ``(N·min(C, max_channels), 3, h, w)`` images in [0, 1], sample-major: save them with
        ``save_image_grid(..., nrow=min(C, max_channels))`` for one row per sample.
    """
    if latents.ndim != 4:
        raise ValueError(f"expected latents (N, C, H, W), got shape {tuple(latents.shape)}")
    n, c, h, w = latents.shape
    k = min(c, max_channels)
    z = latents[:, :k].float()
    flat = z.transpose(0, 1).reshape(k, -1)
    lo = flat.quantile(0.01, dim=1).view(1, k, 1, 1)
    hi = flat.quantile(0.99, dim=1).view(1, k, 1, 1)
    z = ((z - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    scale = max(1, math.ceil(min_tile / min(h, w)))
    z = torch.nn.functional.interpolate(z, scale_factor=scale, mode="nearest")
    return z.reshape(n * k, 1, h * scale, w * scale).expand(-1, 3, -1, -1)

"""Stage: sample a trained generator (``sample``).

``sample(cfg)`` loads the generator (and an AutoGuidance guide) through :mod:`pae_fast.weights`, integrates the
velocity field from noise with the configured sampler and guidance (docs/method.md § Sampling), de-normalises with
the latent statistics stored in the checkpoint's metadata, and writes decoded images (PNG grid, per-image PNGs,
ADM npz) or, without a tokenizer, the latents and a latent-channel preview grid
(:mod:`pae_fast.stages.sample_output`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pae_fast.config import Config, ConfigError, config_from_dict
from pae_fast.data.latent_stats import LatentStats
from pae_fast.engine.lock import RunLock
from pae_fast.engine.precision import autocast_dtype
from pae_fast.errors import NonFiniteError
from pae_fast.flow.grid import plan_from_config, sample_shift
from pae_fast.flow.guidance import (
    AutoGuidance,
    ClassifierFreeGuidance,
    class_balanced_labels,
    conditional_velocity,
    random_labels,
)
from pae_fast.flow.samplers import VelocityFn
from pae_fast.flow.samplers import sample as integrate
from pae_fast.stages.sample_output import load_decoder, write_samples

__all__ = [
    "load_generator",
    "checkpoint_latent_stats",
    "make_velocity_fn",
    "initial_noise",
    "generate_latents",
    "sample_labels",
    "default_output_dir",
    "sample",
]

log = logging.getLogger("pae_fast.sample")


def load_generator(
    path: str | os.PathLike,
    use_ema: bool = True,
    device: torch.device | str = "cpu",
    name: str | None = None,
    key: str = "sample.checkpoint",
    like: Any = None,
    fallback: Any = None,
    flow_cfg: Any = None,
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
        fallback: the :class:`~pae_fast.config.GeneratorConfig` (``--model.name`` and its fields) that builds the
            model of a bare weights file whose metadata holds no run config (e.g. RAE's released ``.pt``).
        flow_cfg: the run's ``flow`` section; its ``time_convention`` (or the checkpoint's metadata) decides
            whether the network is wrapped into our time convention (docs/method.md § Sampling).

    Returns:
        ``(model in eval mode, seen in our time convention, metadata)``; the metadata gains ``"weights_file"``.
    """
    from pae_fast.models.generator import generator_from_config, load_generator_weights
    from pae_fast.weights import read_metadata

    file, meta = read_metadata(path, use_ema, key)  # WeightsError: a missing / damaged file (exit code 3)
    if "config" in meta:
        import yaml

        model_cfg = config_from_dict(yaml.safe_load(meta["config"]), where=f" (metadata of {file})").model
    elif fallback is not None and name is None:
        model_cfg = dataclasses.replace(fallback)
        log.info("%s carries no run config: building %s from the model section", file, model_cfg.name)
    elif name is not None:
        model_cfg = Config().model
        model_cfg.name = name
        if like is not None:  # same latent space as ``like``; architecture from the named variant
            model_cfg = dataclasses.replace(
                model_cfg, in_channels=like.in_channels, input_size=like.input_size, num_classes=like.num_classes
            )
    else:
        raise ConfigError(f"{key}: {file} carries no run config in its metadata; name the generator (--model.name)")
    if name is not None and name != model_cfg.name:
        raise ConfigError(f"{key}: {file} holds a {model_cfg.name} but {name} was requested")
    if "config" not in meta:  # bare weights (RAE's .pt): the latent channels are the weights', not a default
        model_cfg = _channels_from_weights(model_cfg, file, use_ema, key)
    model_cfg = dataclasses.replace(model_cfg, checkpoint=None, grad_checkpointing=False)
    model = generator_from_config(model_cfg)
    load_generator_weights(model, str(file), key=key)
    meta["weights_file"] = str(file)
    if flow_cfg is not None:
        from pae_fast.flow.convention import convention_for, wrap_time_convention

        try:
            model = wrap_time_convention(model, convention_for(flow_cfg, meta, where=str(file)))
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from e
    return model.to(device).eval(), meta


def _channels_from_weights(model_cfg: Any, file: Path, use_ema: bool, key: str) -> Any:
    """``model_cfg`` with ``in_channels`` read from the weights' input embedding (``x_embedder.proj.weight``:
    ``(hidden, C, p, p)`` in LightningDiT and DiT^DH alike), e.g. 768 for RAE's DiT^DH-XL and its DiT^DH-S guide."""
    from pae_fast.weights import read_shapes

    shape = read_shapes(file, ("ema", "model") if use_ema else ("model", "ema"), key).get("x_embedder.proj.weight")
    if shape is None or len(shape) != 4 or shape[1] == model_cfg.in_channels:
        return model_cfg  # no such key: the strict load names what is missing
    log.info("%s: %d input channels (from x_embedder.proj.weight; the model section says %d)", file, shape[1],
             model_cfg.in_channels)
    return dataclasses.replace(model_cfg, in_channels=int(shape[1]))


def _model_config(meta: dict[str, str]) -> Any:
    """The generator config stored in a checkpoint's metadata (None when it carries none)."""
    if "config" not in meta:
        return None
    import yaml

    return config_from_dict(yaml.safe_load(meta["config"])).model


def checkpoint_latent_stats(
    meta: dict[str, str], weights_file: Path, shape: tuple[int, ...], stats_file: str | None = None
) -> LatentStats:
    """The latent statistics a generator was trained with, read from its weights file's metadata.

    Args:
        stats_file: ``sample.latent_stats``: a statistics file (a latent cache's ``stats.safetensors``, or RAE's
            ``stat.pt``) used when the weights carry none (bare weights such as RAE's released checkpoints); never
            overrides the metadata.

    Raises:
        ConfigError: neither source holds statistics (they are needed to de-normalise samples), or they do not fit
            ``shape``.
    """
    try:
        stats = LatentStats.from_metadata(meta, where=str(weights_file))
        if stats is None and stats_file:  # ours (stats.safetensors) or RAE's stat.pt (mean / var, eps 1e-5)
            from pae_fast.weights import read_latent_stats

            stats = read_latent_stats(stats_file, key="sample.latent_stats")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"sample.latent_stats / metadata of {weights_file}: {e}") from e
    if stats is None:
        raise ConfigError(f"{weights_file} carries no latent statistics in its metadata (latent_mean / latent_std, "
                          "written by train-dit); they are needed to de-normalise the samples: set "
                          "sample.latent_stats to the training cache's stats.safetensors")
    try:
        stats.check_fits(torch.zeros(1, *shape), what=f"latents of {weights_file}")
    except ValueError as e:
        raise ConfigError(f"latent statistics of {weights_file}: {e}") from e
    return stats


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
    check_stop: Callable[[], None] | None = None,
) -> Tensor:
    """Sample standardised latents for ``labels`` in batches of ``sample.batch_size``.

    The initial noise of sample ``i`` depends only on ``sample.seed`` and ``i`` (:func:`initial_noise`), so the ODE
    samplers' results do not depend on the batch size. ``check_stop`` is called before each batch (it raises to
    stop: SIGTERM / SIGINT).

    Returns:
        ``(N, C, H, W)`` float32 on the CPU, in the model's (standardised) latent space.
    """
    from pae_fast.progress import progress as report

    device = torch.device(device)
    n = labels.numel()
    sde_gen = torch.Generator(device=device).manual_seed(sample_cfg.seed + 1)
    dtype = autocast_dtype(sample_cfg.precision)  # the engine's one precision -> dtype mapping (None for fp32)
    amp = device.type == "cuda" and dtype is not None
    out = []
    starts = range(0, n, sample_cfg.batch_size)
    for s in report(starts, "sampling", enabled=progress, unit="batch"):
        if check_stop is not None:
            check_stop()
        y = labels[s : s + sample_cfg.batch_size].to(device)
        fn = make_velocity_fn(model, y, sample_cfg, guide)

        def velocity(x: Tensor, t: Tensor, fn: VelocityFn = fn) -> Tensor:
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                return fn(x, t).float()

        x = integrate(
            velocity,
            initial_noise(sample_cfg.seed, range(s, min(n, s + sample_cfg.batch_size)), latent_shape).to(device),
            sampler=sample_cfg.sampler,
            steps=sample_cfg.steps,
            shift=sample_shift(sample_cfg, latent_shape),
            t_start=sample_cfg.t_start,
            t_end=sample_cfg.t_end,
            noise_scale=sample_cfg.sde_noise_scale,
            last_step=sample_cfg.last_step,
            generator=sde_gen,
        )
        out.append(x.float().cpu())
    return torch.cat(out)


_FINAL_OUTPUTS = ("samples.npz", "grid.png", "latents.safetensors", "latent_grid.png")  # written last


def default_output_dir(weights_file: Path) -> Path:
    """Where samples go without ``sample.output_dir``: beside the checkpoint sampled, ``<run>/samples/<step>`` for
    a checkpoint folder written by the engine, else ``<folder of the file>/samples_<file stem>``."""
    from pae_fast.engine.checkpoint import MANIFEST

    ckpt = weights_file.parent
    if (ckpt / MANIFEST).is_file():
        root = ckpt.parent  # <run>/checkpoints
        run = root.parent if root.name == "checkpoints" else root
        return run / "samples" / ckpt.name
    return ckpt / f"samples_{weights_file.stem}"


def sample(cfg: Config, *, overwrite: bool = True, allow_tokenizer_mismatch: bool = False,
           check_stop: Callable[[], None] | None = None) -> list[Path]:
    """Sample a trained generator (``sample``); returns the files (and the per-image folder) written.

    With ``sample.tokenizer_checkpoint`` the de-normalised latents are decoded by the registered tokenizer
    ``tokenizer.name`` into ``grid.png``, ``images/<i>.png`` and ``samples.npz`` (ADM: ``arr_0`` uint8
    ``(N, H, W, 3)``, plus ``labels``); otherwise ``latents.safetensors`` (``latents (N, C, H, W)`` de-normalised,
    ``labels (N,)``) and ``latent_grid.png`` are written. Output folder: ``sample.output_dir``, else beside the
    checkpoint (:func:`default_output_dir`).

    Args:
        overwrite: False refuses an output folder that holds finished samples (``OutputError``, before sampling);
            a folder left by an interrupted run is written again.
        allow_tokenizer_mismatch: decode even when the tokenizer is not the one the generator's latents came from
            (:func:`pae_fast.stages.tokenizer_pairing.check_decoder`; refused otherwise).
        check_stop: called between batches; it raises to stop (the command's SIGTERM / SIGINT check).
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
    device = default_device(sc.device, key="sample.device")
    model, meta = load_generator(sc.checkpoint, sc.use_ema, device, fallback=cfg.model, flow_cfg=cfg.flow)
    main_cfg = _model_config(meta)
    guide = None
    if sc.guidance == "autoguidance":
        if not sc.guide_checkpoint:
            raise ConfigError("sample.guidance=autoguidance needs sample.guide_checkpoint (a small / early generator)")
        like = main_cfg or dataclasses.replace(  # bare main weights: the latent space of the model built from them
            cfg.model, in_channels=model.in_channels, input_size=model.input_size, num_classes=model.num_classes)
        guide, _ = load_generator(
            sc.guide_checkpoint, sc.use_ema, device, sc.guide_name, "sample.guide_checkpoint", like=like,
            flow_cfg=cfg.flow,
        )
        if (guide.in_channels, guide.input_size) != (model.in_channels, model.input_size):
            raise ConfigError(f"sample.guide_checkpoint: the guide works on {guide.in_channels}x{guide.input_size}^2 "
                              f"latents, the main model on {model.in_channels}x{model.input_size}^2")
    weights_file = Path(meta["weights_file"])
    if "latent_shape" in meta:
        shape = tuple(json.loads(meta["latent_shape"]))
    else:
        shape = (model.in_channels, model.input_size, model.input_size)
    stats = checkpoint_latent_stats(meta, weights_file, shape, sc.latent_stats)
    num_classes = int(getattr(model, "num_classes", cfg.model.num_classes))
    labels = sample_labels(num_classes, sc)

    out_dir = Path(sc.output_dir) if sc.output_dir else default_output_dir(weights_file)
    _check_output(out_dir, overwrite)
    tokenizer = None
    if sc.tokenizer_checkpoint:
        from pae_fast.stages.tokenizer_pairing import check_decoder

        decoder_file = check_decoder(meta, weights_file, cfg.tokenizer.name, sc.tokenizer_checkpoint,
                                     prefer_ema=sc.use_ema, vfm_weights=cfg.tokenizer.vfm_weights,
                                     allow_mismatch=allow_tokenizer_mismatch)
        tokenizer = load_decoder(cfg, device, decoder_file)
    log.info("sampling %d latents %s from %s (%s, guidance %s) into %s",
             labels.numel(), shape, weights_file, plan_from_config(sc, shape).describe(), sc.guidance, out_dir)
    z = generate_latents(model, labels, shape, sc, guide, device, check_stop=check_stop)
    if not torch.isfinite(z).all():  # refuse before anything is written
        bad = (~torch.isfinite(z)).flatten(1).any(1).sum().item()
        raise NonFiniteError(f"sampling {weights_file} produced NaN/Inf latents ({bad} of {z.shape[0]} samples); "
                             "nothing was written")
    z = stats.denormalize(z)  # back to the tokenizer's latent space
    with RunLock(out_dir):
        return write_samples(cfg, z, labels, tokenizer, weights_file, shape, out_dir, device, check_stop)


def _check_output(out_dir: Path, overwrite: bool) -> None:
    """Before sampling: the folder can be written, and holds no finished samples unless ``overwrite``."""
    from pae_fast.errors import OutputError
    from pae_fast.io import check_output_dir

    check_output_dir(out_dir, key="sample.output_dir / --out")
    done = [n for n in _FINAL_OUTPUTS if (out_dir / n).exists()]
    if done and not overwrite:
        raise OutputError(f"{out_dir} already holds samples ({', '.join(done)}); pass --overwrite to replace them, "
                          "or --out another folder")

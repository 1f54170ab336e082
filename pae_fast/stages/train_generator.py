"""Stage: train a LightningDiT / DiTᴰᴴ generator with flow matching on latents (``train-dit``).

``train_generator(cfg)`` assembles a :class:`~pae_fast.engine.task.TrainTask` (model from the config, flow loss,
standardised latent data) and runs the shared engine. The latent statistics used to standardise travel inside every
saved weights file's metadata (:meth:`LatentStats.to_metadata`), so sampling de-normalises with exactly them
(docs/method.md § Latent statistics).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

from pae_fast.config import Config, ConfigError, dump_yaml
from pae_fast.flow.loss import FlowLoss
from pae_fast.flow.timesteps import dimension_shift

__all__ = ["resolve_train_shift", "build_generator_task", "train_generator"]

log = logging.getLogger("pae_fast.train_generator")


def resolve_train_shift(flow: Any, latent_shape: tuple[int, ...]) -> float:
    """The training shift: ``flow.shift``, or RAE's dimension rule ``s = sqrt(4096 / m)`` when
    ``flow.dimension_shift`` (m = C·H·W of one latent, i.e. tokens × channels; docs/method.md § Flow matching)."""
    if flow.dimension_shift:
        return dimension_shift(math.prod(latent_shape))
    return flow.shift


def _check_data_fits_model(shape: tuple[int, ...], num_classes: int | None, model_cfg: Any, where: str,
                           metadata: dict[str, Any] | None = None, tokenizer_cfg: Any = None) -> None:
    """Refuse latent data that does not fit the generator config (before anything is written), naming each mismatch:
    channels (``model.in_channels``), latent size (``model.input_size``), class count (``model.num_classes``) and,
    when the data records the tokenizer that wrote it (``metadata["tokenizer"]``, ``["tokenizer_weights"]``),
    ``tokenizer.name`` and ``tokenizer.encode_weights``."""
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
    recorded = (metadata or {}).get("tokenizer")
    if recorded and tokenizer_cfg is not None and recorded != tokenizer_cfg.name:
        problems.append(f"tokenizer.name is {tokenizer_cfg.name!r} but the cache was written by tokenizer {recorded!r} "
                        f"(set tokenizer.name={recorded} to train on it)")
    which = (metadata or {}).get("tokenizer_weights")  # raw (non-EMA) | ema; caches from before it was recorded: none
    if which and tokenizer_cfg is not None and which != tokenizer_cfg.encode_weights:
        problems.append(f"tokenizer.encode_weights is {tokenizer_cfg.encode_weights!r} but the cache was encoded with "
                        f"the tokenizer's {which!r} weights (set tokenizer.encode_weights={which} to train on it)")
    if problems:
        raise ConfigError(f"the latent data {where} does not fit the generator: " + "; ".join(problems))


def build_generator_task(cfg: Config, dataset: Any = None, world_size: int = 1) -> tuple[Any, Config]:
    """Everything :func:`pae_fast.engine.train` needs to train the generator, without running it.

    Args:
        cfg: the run config (``model``, ``flow``, ``data``, ``train``).
        dataset: a map-style dataset of ``(latent (C, H, W) standardised, label)``; default
            :func:`pae_fast.data.latents.open_latent_data`, or with ``data.latents: online`` the images at
            ``data.root`` encoded on the fly (:mod:`pae_fast.stages.online_latents`). A dataset passed here exposes
            ``stats`` (:class:`LatentStats`) when its latents are standardised (identity statistics otherwise).
        world_size: processes the run will use (checks ``data.batch_size`` against the engine's micro-batch).

    Returns:
        ``(TrainTask, resolved cfg)``; the resolved config holds the training shift actually used.
    """
    from pae_fast.data.latents import identity_stats, latent_loader_workers, open_latent_data
    from pae_fast.data.pil_loader import _collate as collate_images
    from pae_fast.engine.state import seed_all
    from pae_fast.engine.task import TrainTask
    from pae_fast.models.generator import generator_from_config
    from pae_fast.models.profile import train_flops_per_sample
    from pae_fast.stages.tokenizer_pairing import RECORD_KEY, tokenizer_record

    online = None
    if dataset is None and cfg.data.latents == "online":  # images encoded on the fly (stages/online_latents.py)
        from pae_fast.stages.online_latents import OnlineLatentData

        num_workers = latent_loader_workers(dataclasses.replace(cfg.data, loader="auto"), cfg.train, world_size)
        online = OnlineLatentData.from_config(cfg)
        ds, shape, stats = online.dataset, online.latent_shape, online.stats
    else:
        num_workers = latent_loader_workers(cfg.data, cfg.train, world_size)
        ds = open_latent_data(cfg) if dataset is None else dataset
        if len(ds) == 0:
            raise ConfigError(f"the latent data {getattr(ds, 'path', type(ds).__name__)} is empty")
        shape = tuple(ds[0][0].shape)
        stats = getattr(ds, "stats", None) or identity_stats(shape[0])
    _check_data_fits_model(shape, getattr(ds, "num_classes", None), cfg.model, str(getattr(ds, "path", "")),
                           getattr(ds, "metadata", None), cfg.tokenizer)
    shift = resolve_train_shift(cfg.flow, shape)
    cfg = dataclasses.replace(cfg, flow=dataclasses.replace(cfg.flow, shift=shift))
    seed_all(cfg.seed)  # before the model is built: the seed sets the initial weights too
    model = generator_from_config(cfg.model)
    metadata = {
        "generator": cfg.model.name,
        "latent_shape": json.dumps(list(shape)),
        **stats.to_metadata(),
        "train_shift": repr(shift),
        "time_convention": "pae",  # weights trained here: t = 1 data, predict v (docs/method.md § Sampling)
        "latent_cache": str(getattr(ds, "path", "")),
        **(online.metadata() if online is not None else {}),
    }
    record = tokenizer_record(online.metadata() if online is not None else getattr(ds, "metadata", None), stats)
    if record is not None:  # which tokenizer made these latents: sample checks its decoder against it
        metadata[RECORD_KEY] = json.dumps(record, sort_keys=True)
    flow_loss = FlowLoss.from_config(cfg.flow)
    task = TrainTask(
        name="generator",
        model=model,
        loss_fn=online.loss_fn(flow_loss) if online is not None else flow_loss,
        dataset=ds,
        collate_fn=collate_images if online is not None else None,
        metadata=metadata,
        flops_per_sample=train_flops_per_sample(model),
        num_workers=num_workers,
        counters=online.counters if online is not None else None,
    )
    return task, cfg


def train_generator(cfg: Config, on_checkpoint: Any = None, checkpoint_steps: Any = ()) -> Path:
    """Train a generator on latents with the shared engine (``train-dit``).

    Writes ``<out_dir>/config.yaml`` (resolved) and the engine's checkpoints
    (``<out_dir>/checkpoints/<step>/{model,ema}.safetensors``, the latent statistics in their metadata).

    Args:
        on_checkpoint: the engine's ``fn(step, model, ema, out_dir)`` after each checkpoint (an evaluation).
        checkpoint_steps: further steps to checkpoint (and evaluate) at (:class:`~pae_fast.engine.task.TrainTask`).

    Returns:
        the run folder.
    """
    from pae_fast.engine import train
    from pae_fast.engine.distributed import get_world_size, is_main
    from pae_fast.run_identity import open_run, run_identity

    if cfg.flow.time_convention != "pae":
        raise ConfigError(f"flow.time_convention={cfg.flow.time_convention!r}: training writes pae-convention "
                          "weights (t = 1 data); the rae convention is for sampling RAE's released checkpoints")
    # everything below only reads until open_run: a bad cache or config changes nothing in the run folder
    task, cfg = build_generator_task(cfg, world_size=get_world_size())
    task = dataclasses.replace(task, on_checkpoint=on_checkpoint, checkpoint_steps=frozenset(checkpoint_steps))
    if cfg.flow.dimension_shift:
        log.info("dimension-dependent training shift s = %.4f (m = %s)", cfg.flow.shift, task.metadata["latent_shape"])
    with open_run(cfg.out_dir, run_identity(cfg), cfg.train.resume, main=is_main()):
        # the engine writes <out_dir>/config.yaml (the resolved config, with the training shift actually used)
        train(task, cfg.train, cfg.out_dir, seed=cfg.seed, config_yaml=dump_yaml(cfg))
    return Path(cfg.out_dir)

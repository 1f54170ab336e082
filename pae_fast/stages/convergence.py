"""Stage: convergence of generators on two or more latent spaces (``convergence``; docs/method.md § Convergence).

:func:`run_convergence` trains one generator per latent space with the same config (seed, schedule, sizes) through
``train-dit``'s library function, for every seed, and evaluates its EMA weights at log-spaced steps through the
engine's checkpoint callback (``TrainTask.checkpoint_steps`` / ``on_checkpoint``: no second training loop): class-
balanced samples (sampler and steps of ``sample``, no guidance by default, as the paper's Fig. 1 plots unguided
gFID), decoded by the space's tokenizer, and their Fréchet distance to reference images in the VFM's feature space
(:func:`pae_fast.stages.demo_measure.image_fd`'s features), plus FID when Inception weights are given
(:mod:`pae_fast.eval.fid`). It writes ``convergence.json`` / ``.md`` / ``.png``
(:mod:`pae_fast.stages.convergence_report`) with the speed-up arithmetic of :mod:`pae_fast.stages.convergence_math`.

Layout of ``out_dir``: ``runs/<space>/seed<k>/`` (a ``train-dit`` run each, with ``convergence_points.json``: the
evaluations of that run so far, so an interrupted run resumes without re-evaluating), and the three result files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pae_fast.config import Config, ConfigError
from pae_fast.errors import DataError
from pae_fast.io import atomic_write_text

__all__ = ["LatentSpace", "ConvergencePlan", "generator_config", "run_convergence", "POINTS_FILE"]

log = logging.getLogger("pae_fast.convergence")

POINTS_FILE = "convergence_points.json"


@dataclass(frozen=True)
class LatentSpace:
    """One latent space: ``source`` is a latent cache folder (``index.json``), or with ``data.latents: online`` an
    image folder encoded on the fly; ``tokenizer_weights`` decodes its samples; ``tokenizer`` is the registered name
    (default: the one the cache's metadata records)."""

    name: str
    source: str
    tokenizer_weights: str
    tokenizer: str | None = None


@dataclass(frozen=True)
class ConvergencePlan:
    """What is measured (docs/method.md § Convergence).

    Attributes:
        baseline: the space whose final value per seed is the target of the speed-up.
        seeds: one run per space and seed (the config's seed is replaced by each).
        eval_steps: steps to evaluate at (the last step is always added); empty: ``points`` log-spaced steps.
        points: how many log-spaced steps (the last one, halved repeatedly).
        per_class: samples per class at each evaluation.
        sample_steps: solver steps of ``sample.sampler`` at each evaluation.
        guidance: ``sample.guidance`` of the evaluations (``none``: the paper's Fig. 1 is unguided).
        vfm_weights, vfm: the frozen encoder whose mean-pooled patch tokens are the FD feature space.
        inception_weights: local FID Inception weights (FID is skipped without them).
        roofline, roofline_model: ``benchmarks/results/roofline.json`` and the model whose predicted step times
            price the steps (None: no GPU-hours).
    """

    baseline: str
    vfm_weights: str
    seeds: tuple[int, ...] = (0, 1)
    eval_steps: tuple[int, ...] = ()
    points: int = 6
    per_class: int = 8
    sample_steps: int = 10
    guidance: str = "none"
    vfm: str = "ViT-tiny"
    inception_weights: str | None = None
    roofline: str | None = None
    roofline_model: str = "LightningDiT-XL/1"


def generator_config(cfg: Config, out: Path, cache: str, latent_shape: list[int], tokenizer: str,
                     num_classes: int | None = None) -> Config:
    """The ``train-dit`` config on one latent cache (channels / size from the tokenizer's latent shape; the
    tokenizer that wrote the cache, which ``train-dit`` checks against the cache's metadata)."""
    c, h, _ = latent_shape
    model = dataclasses.replace(cfg.model, in_channels=c, input_size=h, checkpoint=None,
                                num_classes=num_classes or cfg.model.num_classes)
    data = dataclasses.replace(cfg.data, source="latent_cache", root=cache, num_workers=0, file_list=None)
    tok = dataclasses.replace(cfg.tokenizer, name=tokenizer)
    return dataclasses.replace(cfg, out_dir=str(out), model=model, data=data, tokenizer=tok)


def _space_config(cfg: Config, space: LatentSpace, out: Path) -> tuple[Config, nn.Module | None]:
    """The run config of ``space`` (refuses a missing source or tokenizer file, naming it: exit code 3), and for
    online latents the tokenizer it loaded to read the latent shape."""
    src = Path(space.source)
    if not src.is_dir():
        raise DataError(f"convergence space {space.name!r}: {src} is not a latent cache or image folder")
    if not Path(space.tokenizer_weights).exists():  # a weights file, or a run / checkpoint folder
        raise DataError(f"convergence space {space.name!r}: tokenizer weights {space.tokenizer_weights} not found")
    if cfg.data.latents == "online":
        if not space.tokenizer:
            raise ConfigError(f"convergence space {space.name!r}: online latents need the tokenizer's name")
        from pae_fast.registry import create_tokenizer

        tokenizer = create_tokenizer(space.tokenizer, weights=space.tokenizer_weights).eval()
        c, h, _ = (int(d) for d in tokenizer.latent_shape)
        tok = dataclasses.replace(cfg.tokenizer, name=space.tokenizer, checkpoint=space.tokenizer_weights)
        data = dataclasses.replace(cfg.data, root=str(src))
        model = dataclasses.replace(cfg.model, in_channels=c, input_size=h, checkpoint=None,
                                    num_classes=cfg.data.num_classes or cfg.model.num_classes)
        return dataclasses.replace(cfg, out_dir=str(out), tokenizer=tok, data=data, model=model), tokenizer
    if not (src / "index.json").is_file():
        raise DataError(f"convergence space {space.name!r}: {src} holds no latent cache (no index.json); with "
                        "data.latents=online give an image folder")
    from pae_fast.data.latent_cache import LatentCache

    cache = LatentCache(src, normalize=False, hflip=False)
    name = space.tokenizer or cache.metadata.get("tokenizer")
    if not name:
        raise ConfigError(f"convergence space {space.name!r}: the cache {src} records no tokenizer; name it")
    return generator_config(cfg, out, str(src), [cache.channels, *cache.size], name, cache.num_classes), None


class _Evaluator:
    """Evaluates a generator at a checkpoint: samples → tokenizer → images → FD to the reference (VFM features;
    Inception features when given)."""

    def __init__(self, cfg: Config, plan: ConvergencePlan, reference: Tensor, device: torch.device) -> None:
        from pae_fast.stages.demo_measure import load_vfm, vfm_features

        self.cfg, self.plan, self.device = cfg, plan, device
        self.vfm = load_vfm(plan.vfm_weights, plan.vfm).to(device)
        self.ref_vfm = vfm_features(self.vfm, reference.to(device)).cpu()
        self.inception = None
        if plan.inception_weights:
            from pae_fast.eval.fid import extract_features
            from pae_fast.eval.inception import load_inception

            self.inception = load_inception(plan.inception_weights, self.cfg.eval.inception_size, device)
            self.ref_pool = extract_features(_u8(reference).split(64), self.inception, device=device)["pool"]

    @torch.no_grad()
    def __call__(self, model: nn.Module, tokenizer: nn.Module, meta: dict[str, str], weights: Path, num_classes: int,
                 seed: int) -> dict[str, float]:
        from pae_fast.eval.fid import frechet_distance_features
        from pae_fast.stages.demo_measure import vfm_features
        from pae_fast.stages.sample import checkpoint_latent_stats, generate_latents, sample_labels

        p = self.plan
        sc = dataclasses.replace(self.cfg.sample, per_class=p.per_class, steps=p.sample_steps, guidance=p.guidance,
                                 seed=seed)
        shape = tuple(json.loads(meta["latent_shape"]))
        stats = checkpoint_latent_stats(meta, weights, shape)
        was = model.training
        model.eval()  # no label dropout while sampling
        z = generate_latents(model, sample_labels(num_classes, sc), shape, sc, device=self.device, progress=False)
        model.train(was)
        z = stats.denormalize(z)
        images = torch.cat([tokenizer.decode(z[i : i + sc.batch_size].to(self.device)).float().clamp(0, 1).cpu()
                            for i in range(0, len(z), sc.batch_size)])
        images = _u8(images).float() / 255  # the 8-bit images a sample file would hold
        out = {"fd_vfm": frechet_distance_features(vfm_features(self.vfm, images.to(self.device)).cpu(),
                                                   self.ref_vfm)}
        if self.inception is not None:
            from pae_fast.eval.fid import extract_features

            pool = extract_features(_u8(images).split(64), self.inception, device=self.device)["pool"]
            out["fid"] = frechet_distance_features(pool, self.ref_pool)
        return out


def _u8(images: Tensor) -> Tensor:
    """float ``(N, 3, H, W)`` in [0, 1] (or uint8) -> uint8, rounded as ``eval.images.to_uint8_hwc``."""
    from pae_fast.eval.images import to_uint8_hwc

    if images.dtype == torch.uint8:
        return images
    return torch.from_numpy(to_uint8_hwc(images)).permute(0, 3, 1, 2)


def _read_points(path: Path) -> dict[int, dict[str, float]]:
    if not path.is_file():
        return {}
    return {int(k): v for k, v in json.loads(path.read_text(encoding="utf-8")).items()}


def _train_and_evaluate(run_cfg: Config, evaluator: _Evaluator | None, tokenizer: nn.Module, eval_steps: list[int],
                        num_classes: int) -> dict[int, dict[str, float]]:
    """One ``train-dit`` run with an evaluation at each of ``eval_steps`` (recorded in ``POINTS_FILE``); under
    ``torchrun`` only rank 0 evaluates (the engine calls ``on_checkpoint`` there), the others get ``{}``."""
    from pae_fast.stages.train_generator import train_generator
    from pae_fast.weights import read_metadata

    run = Path(run_cfg.out_dir)
    points_file = run / POINTS_FILE
    points = _read_points(points_file)

    def on_checkpoint(step: int, model: nn.Module, ema: nn.Module, out_dir: str) -> None:
        if step not in eval_steps:
            return
        weights, meta = read_metadata(Path(out_dir) / "checkpoints" / f"{step:07d}", True, "convergence checkpoint")
        points[step] = evaluator(ema, tokenizer, meta, weights, num_classes, run_cfg.seed)
        log.info("%s step %d: %s", run, step, " ".join(f"{k}={v:.4g}" for k, v in points[step].items()))
        atomic_write_text(points_file, json.dumps({str(k): v for k, v in sorted(points.items())}, indent=1) + "\n")

    train_generator(run_cfg, on_checkpoint=on_checkpoint if evaluator is not None else None,
                    checkpoint_steps=eval_steps)
    if evaluator is None:
        return {}
    missing = [s for s in eval_steps if s not in points]
    if missing:
        raise DataError(f"{points_file} lacks the evaluations of steps {missing} (the run finished before they "
                        "were recorded); remove the run folder to rerun it")
    return {s: points[s] for s in eval_steps}


def run_convergence(cfg: Config, spaces: list[LatentSpace], plan: ConvergencePlan, reference: Tensor | str,
                    out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train and evaluate one generator per space and seed; write ``convergence.{json,md,png}``.

    Args:
        cfg: the generator run config (``model``, ``flow``, ``train``, ``sample``, ``data.latents``); each space
            gets its latent shape and classes, each seed its seed; everything else is the same for all runs.
        spaces: two or more latent spaces with distinct names, one of them ``plan.baseline``.
        plan: seeds, evaluation steps and the metric's settings (:class:`ConvergencePlan`).
        reference: images the samples are compared with: ``(N, 3, H, W)`` float in [0, 1], or an image folder / ADM
            npz (:class:`pae_fast.eval.images.ImageSource`).
        out_dir: where runs and results go (default ``cfg.out_dir``).

    Returns:
        the content of ``convergence.json``.

    Raises:
        ConfigError: fewer than two spaces, duplicate names, an unknown baseline, no seed, bad evaluation steps.
        DataError: a missing cache / image folder / tokenizer weights file (named).
    """
    from pae_fast.engine.distributed import default_device, is_main
    from pae_fast.registry import create_tokenizer
    from pae_fast.stages.convergence_math import log_spaced_steps
    from pae_fast.stages.convergence_report import read_roofline, write_results

    names = [s.name for s in spaces]
    if len(spaces) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"convergence needs two or more latent spaces with distinct names, got {names}")
    if plan.baseline not in names:
        raise ConfigError(f"convergence baseline {plan.baseline!r} is not one of the spaces {names}")
    if not plan.seeds or len(set(plan.seeds)) != len(plan.seeds):
        raise ConfigError(f"convergence needs one or more distinct seeds, got {list(plan.seeds)}")
    total = cfg.train.steps
    if any(s < 1 or s > total for s in plan.eval_steps):
        raise ConfigError(f"convergence evaluation steps must lie in 1..train.steps={total}, got {plan.eval_steps}")
    eval_steps = sorted(set(plan.eval_steps) | {total}) if plan.eval_steps else log_spaced_steps(total, plan.points)
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    run_cfgs = {s.name: _space_config(cfg, s, out / "runs" / s.name) for s in spaces}  # reads only: (cfg, tok)
    if not isinstance(reference, Tensor):
        from pae_fast.eval.images import ImageSource

        if not Path(reference).exists():
            raise DataError(f"convergence reference images {reference} not found")
        reference = torch.from_numpy(ImageSource(reference, "reference").read_all()).permute(0, 3, 1, 2)
    reference = reference.float() / 255 if reference.dtype == torch.uint8 else reference.float()
    roofline = read_roofline(plan.roofline, plan.roofline_model) if plan.roofline else None  # before any training
    device = default_device(cfg.train.device)
    evaluator = _Evaluator(cfg, plan, reference, device) if is_main() else None
    curves: dict[str, dict[int, dict[int, dict[str, float]]]] = {}
    runs: dict[str, dict[int, str]] = {}
    for space in spaces:
        base, tokenizer = run_cfgs[space.name]
        if tokenizer is None:
            tokenizer = create_tokenizer(base.tokenizer.name, weights=space.tokenizer_weights).eval()
        tokenizer = tokenizer.to(device)
        for seed in plan.seeds:
            run_cfg = dataclasses.replace(base, seed=seed, out_dir=str(out / "runs" / space.name / f"seed{seed}"))
            log.info("convergence: %s seed %d, %d steps, evaluations at %s", space.name, seed, total, eval_steps)
            curves.setdefault(space.name, {})[seed] = _train_and_evaluate(run_cfg, evaluator, tokenizer, eval_steps,
                                                                          base.model.num_classes)
            runs.setdefault(space.name, {})[seed] = run_cfg.out_dir
    if evaluator is None:  # a rank other than 0 of a torchrun launch: it trained; rank 0 evaluates and writes
        return {}
    return write_results(out, cfg, plan, curves, runs, len(reference), roofline)

"""Stage: train a PAE or RAE tokenizer (``train-tokenizer``), docs/method.md § Tokenizer training.

``train_tokenizer(cfg)`` builds a :class:`~pae_fast.engine.task.TrainTask` and runs the shared engine:

- main unit: :class:`~pae_fast.stages.tokenizer_task.TokenizerTrainModule` (the tokenizer's trainable parts: DAM,
  projector, decompressor, decoder; the VFM frozen) with the generator-side loss of
  :class:`~pae_fast.losses.total.TokenizerLoss` (L1, LPIPS, GAN, SSR, MCR, SCR, RAE noise augmentation), EMA,
  exact resume, SIGTERM, bf16 and DDP from the engine;
- ``extra_optimized["disc"]``: the DINO discriminator's heads with their own AdamW and schedule (hinge loss);
- ``on_checkpoint``: held-out PSNR / SSIM (/ LPIPS / rFID) and input | reconstruction grids of the EMA weights,
  recorded as ``"weights": "ema"`` (:mod:`pae_fast.stages.tokenizer_eval`).

SSR / SCR targets come from the refined projector ``P_t`` of ``refine-priors`` (``tokenizer.priors: refined``,
``tokenizer.priors_file``; with the decompressor it also initialises the PAE tokenizer) or from the raw VFM tokens
(``priors: raw``).
LPIPS and the GAN need local weights; ``tokenizer.lpips_weights: none`` / ``tokenizer.lambda_gan: 0`` turn them off
and ``tokenizer.disc_weights: random`` asks for random frozen discriminator features; whichever is used is logged
and written into every checkpoint's metadata (``losses``).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import torch

from pae_fast.config import Config, ConfigError, TokenizerConfig, dump_yaml
from pae_fast.losses.total import term_on

__all__ = ["build_tokenizer_task", "train_tokenizer", "RAW_FIT_IMAGES", "init_from_priors"]

log = logging.getLogger("pae_fast.train.tokenizer")

RAW_FIT_IMAGES = 16  # priors=raw, raw_prior_projection=pca: the PCA is fitted on the tokens of this many images


def init_from_priors(t: TokenizerConfig) -> bool:
    """Whether a PAE tokenizer starts from ``priors_file``'s projector and decompressor (docs/method.md § Ablation
    presets): ``tokenizer.init_from_priors``, or when unset (auto) exactly when SSR / SCR use refined targets."""
    if t.init_from_priors is not None:
        return bool(t.init_from_priors)
    return t.priors == "refined" and (term_on(t, "ssr") or term_on(t, "scr"))


def _check_config(t: TokenizerConfig, tok: Any = None) -> None:
    """Tokenizer settings that cannot work together; without ``tok`` only those that need no model (run before
    building)."""
    ssr_on, scr_on = term_on(t, "ssr"), term_on(t, "scr")
    if t.lambda_l1 <= 0 and t.lambda_lpips <= 0:
        raise ConfigError("tokenizer.lambda_l1 and tokenizer.lambda_lpips are both 0: no reconstruction loss")
    if t.priors == "refined" and (ssr_on or scr_on) and t.priors_file is None:
        raise ConfigError("tokenizer.priors=refined needs tokenizer.priors_file (the priors.safetensors written by "
                          "`python -m pae_fast refine-priors`), or set tokenizer.priors: raw")
    if t.init_from_priors and t.priors_file is None:
        raise ConfigError("tokenizer.init_from_priors is true but tokenizer.priors_file is unset (the "
                          "priors.safetensors of `python -m pae_fast refine-priors`)")
    if tok is None:
        return
    if t.init_from_priors and tok.kind != "pae":
        raise ConfigError(f"tokenizer.init_from_priors is true but {t.name!r} is an RAE: it has no projector")
    if float(t.lambda_kl) > 0 and getattr(tok, "latent_logvar", None) is None:
        raise ConfigError(f"tokenizer.lambda_kl > 0 needs a tokenizer with a log-variance head (e.g. "
                          f"'{t.name}-kl'); {t.name!r} has none")
    if tok.kind == "rae" and (ssr_on or scr_on):
        raise ConfigError(f"tokenizer {t.name!r} is an RAE (its latent is the frozen VFM's tokens): SSR / SCR cannot "
                          "train it; set tokenizer.ssr: false and tokenizer.scr: false")


def _raw_projection(t: TokenizerConfig, seed: int, tok: Any, dataset: Any, device: torch.device) -> Any:
    """The fixed SCR projection of raw VFM tokens (``priors: raw``), fitted on the first images for ``pca``."""
    from pae_fast.losses.refine import RawProjection

    if not term_on(t, "scr"):
        return None
    proj = RawProjection(tok.vfm_dim, tok.latent_shape[0], t.raw_prior_projection, seed=seed)
    if t.raw_prior_projection == "pca":
        n = min(RAW_FIT_IMAGES, len(dataset))
        items = (dataset[i][0] for i in range(len(dataset)))  # None: a bad file skipped (data.on_bad_file=skip)
        x = torch.stack(list(itertools.islice((x for x in items if x is not None), n))).float().to(device)
        with torch.no_grad():  # on the training device (the engine moves the VFM there anyway)
            proj.fit(tok.vfm.to(device).tokens(tok.vfm.preprocess(x)))
    return proj


def build_tokenizer_task(cfg: Config, dataset: torch.utils.data.Dataset | None = None,
                         heldout: torch.utils.data.Dataset | None = None, world_size: int = 1, rank: int = 0,
                         allow_random_disc: bool = False) -> tuple[Any, Any]:
    """Everything :func:`pae_fast.engine.train` needs to train the tokenizer; reads only, writes nothing.

    Args:
        cfg: the run config (``tokenizer``, ``data``, ``train``, ``eval``, ``seed``).
        dataset: map-style ``(image (3, S, S) float in [0, 1], label, ...)``; default ``cfg.data``.
        heldout: held-out images of the same form; default the ``tokenizer.heldout_items`` of ``cfg.data``.
        world_size, rank: the process layout (MCR noise per rank, data workers).
        allow_random_disc: permit random frozen discriminator features with ``disc_weights`` unset (tests).
    Returns:
        ``(TrainTask, HeldoutEvaluator)``.
    """
    from pae_fast.engine.distributed import default_device
    from pae_fast.engine.precision import compute_dtype
    from pae_fast.engine.state import seed_all
    from pae_fast.engine.task import Shared, TrainTask
    from pae_fast.losses.total import TokenizerLoss
    from pae_fast.registry import create_tokenizer
    from pae_fast.stages.image_data import check_image_size, open_image_data
    from pae_fast.stages.refine_priors import init_tokenizer_from_priors, load_priors
    from pae_fast.stages.tokenizer_eval import HeldoutEvaluator
    from pae_fast.stages.tokenizer_flops import tokenizer_flops_fn
    from pae_fast.stages.tokenizer_task import (
        TokenizerTrainModule,
        disc_unit_loss_fn,
        tokenizer_loss_fn,
    )

    t = cfg.tokenizer
    _check_config(t)
    device = default_device(cfg.train.device)
    seed_all(cfg.seed)  # before any module is built: the seed sets the initial weights
    tok = create_tokenizer(t.name, weights=t.checkpoint, vfm_weights=t.vfm_weights)
    if t.vfm_weights is None and t.checkpoint is None:
        log.warning("tokenizer.vfm_weights is unset: the frozen VFM has RANDOM weights (tests / demos only)")
    _check_config(t, tok)
    check_image_size(cfg, tok.image_size)
    if dataset is None:
        dataset, held_default = open_image_data(cfg, t.heldout_items)
        heldout = heldout if heldout is not None else held_default
    if len(dataset) == 0:
        raise ConfigError(f"the image data {getattr(dataset, 'path', type(dataset).__name__)} is empty")

    loss = TokenizerLoss.from_config(t, device=None, allow_random_disc=allow_random_disc,
                                     latent_channels=tok.latent_shape[0])
    projector, raw_projection, priors_meta = None, None, {}
    init = init_from_priors(t)
    if (loss.needs_targets and t.priors == "refined") or init:
        projector, priors_meta = load_priors(t.priors_file, cfg, tok)  # also checks the recipe fits this tokenizer
        if init and tok.kind == "pae" and t.checkpoint is None:  # start at the refined prior (§ Refined priors)
            init_tokenizer_from_priors(tok, t.priors_file)
        if not (loss.needs_targets and t.priors == "refined"):
            projector = None  # read for the initialisation only
    if loss.needs_targets and t.priors == "raw":
        raw_projection = _raw_projection(t, cfg.seed, tok, dataset, device)
    for m in (loss.lpips, projector, raw_projection):  # the frozen helpers the engine does not move
        if m is not None:
            m.to(device)
    heldout_lpips = loss.lpips  # the held-out metric stays fp32 (NCHW, as loaded)
    if loss.lpips is not None:  # the loss's own trunk: one channels-last copy in the compute dtype, converted once
        dtype = compute_dtype(cfg.train.precision) or torch.float32  # (docs/method.md § LPIPS fast path)
        loss.lpips = copy.deepcopy(loss.lpips).to_compute_dtype(dtype)
    status = loss.status()
    for term, line in status.items():  # before the engine's log exists: what is off or random shows as a warning
        if line.startswith("off") or "RANDOM" in line:
            log.warning("loss %s: %s", term, line)
    shared = Shared(loss=loss, projector=projector, raw_projection=raw_projection, seed=cfg.seed, recons=[],
                    has_disc=loss.discriminator is not None, status=status, announced=False, train=cfg.train,
                    latents=[])
    model = TokenizerTrainModule(tok, shared)
    extras = {}
    if loss.discriminator is not None:
        extras["disc"] = (loss.discriminator, disc_unit_loss_fn(shared))
    if loss.latent_denoiser is not None:  # Table 3a's diffusion-loss regulariser: the denoiser's own unit
        from pae_fast.losses.latent_diffusion import denoiser_unit_loss_fn

        extras["latent_denoiser"] = (loss.latent_denoiser, denoiser_unit_loss_fn(shared))
    inception = None
    if cfg.eval.inception_weights is not None and heldout is not None:
        from pae_fast.eval.inception import load_inception

        inception = load_inception(cfg.eval.inception_weights, cfg.eval.inception_size, device)
    evaluator = HeldoutEvaluator(heldout, cfg.eval.batch_size, t.grid_items, heldout_lpips, inception)
    metadata = {
        "tokenizer": t.name,
        "kind": tok.kind,
        "latent_shape": json.dumps(list(tok.latent_shape)),
        "stats_mode": tok.stats_mode,
        "losses": json.dumps(status, sort_keys=True),
        "priors": t.priors,
        "priors_file": str(t.priors_file or ""),
        "priors_recipe": priors_meta.get("recipe", ""),
        "vfm_weights": str(t.vfm_weights or ""),
    }

    def on_checkpoint(step: int, model_: Any, ema: Any, out_dir: str) -> None:
        evaluator.evaluate(ema.tok, step, out_dir, weights="ema")

    flops = tokenizer_flops_fn(tok, loss, t, projector, raw_projection)  # per image and step: TFLOP/s and MFU
    task = TrainTask(name="tokenizer", model=model, loss_fn=tokenizer_loss_fn(shared, rank), dataset=dataset,
                     metadata=metadata, extra_optimized=extras, on_checkpoint=on_checkpoint, flops_per_sample=flops,
                     collate_fn=getattr(dataset, "collate_fn", None),  # data.on_bad_file=skip drops bad files
                     num_workers=cfg.data.num_workers if getattr(dataset, "samples", None) is not None else 0)
    return task, evaluator


def train_tokenizer(cfg: Config, dataset: torch.utils.data.Dataset | None = None,
                    heldout: torch.utils.data.Dataset | None = None) -> Path:
    """Train a tokenizer with the shared engine (``train-tokenizer``).

    Args:
        cfg: the run config.
        dataset: optional training images (map-style ``(image (3, S, S) float in [0, 1], label)``); default
            ``cfg.data``.
        heldout: optional held-out images of the same form; default ``tokenizer.heldout_items`` of ``cfg.data``.
    Returns:
        the run folder; its weights load with ``create_tokenizer(cfg.tokenizer.name, weights=<run folder>)``
        (the newest checkpoint's ``ema.safetensors``, the tokenizer's full state dict).
    """
    from pae_fast.engine import train
    from pae_fast.engine.checkpoint import latest_checkpoint
    from pae_fast.engine.distributed import default_device, get_rank, get_world_size, is_main
    from pae_fast.run_identity import open_run, run_identity

    task, evaluator = build_tokenizer_task(cfg, dataset, heldout, get_world_size(), get_rank())
    identity = run_identity(cfg, ("data", "tokenizer"))
    if dataset is not None:
        identity["data.dataset"] = f"{type(dataset).__name__}:{len(dataset)}"
    out = Path(cfg.out_dir)
    with open_run(out, identity, cfg.train.resume, main=is_main()):
        fresh = cfg.train.resume == "none" or (cfg.train.resume == "auto" and latest_checkpoint(out) is None)
        if fresh and is_main():  # the held-out row of the initial weights (step 0)
            evaluator.evaluate(task.model.tok.to(default_device(cfg.train.device)), 0, out, weights="raw")
        train(task, cfg.train, out, seed=cfg.seed, config_yaml=dump_yaml(cfg))
    return out

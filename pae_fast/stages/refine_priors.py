"""Stage 0: refined priors (``refine-priors``), docs/method.md § Refined priors.

Trains :class:`~pae_fast.models.refine.RefinedPriors` (projector ``P_t: D -> C``, C the tokenizer's latent width,
and the ViT reconstructor ``Q_t``) on the frozen VFM tokens of the images with
:func:`pae_fast.losses.refine.refine_step_loss` through the shared engine, then writes
``<out_dir>/priors.safetensors``: the projector's weights (keys of
:class:`~pae_fast.models.refine.PriorProjector`: ``attn.qkv.*``, ``attn.proj.*``, ``conv.*``) from the newest
checkpoint's trained (not EMA) model [choice], and the targets' recipe in its metadata (``upsampler``,
``lowpass_strength``, ``grid``, ``latent_dim``, ``vfm_dim``, ``image_size``, the tokenizer and encoder names).
``train-tokenizer`` reads it with :func:`load_priors` (``tokenizer.priors_file``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pae_fast.config import Config, ConfigError, dump_yaml
from pae_fast.engine.task import Shared

__all__ = ["PRIORS_FILE", "build_refine_task", "refine_priors", "load_priors"]

log = logging.getLogger("pae_fast.train.refine")

PRIORS_FILE = "priors.safetensors"


def frozen_vfm(cfg: Config) -> Any:
    """The frozen encoder of ``cfg.tokenizer.name`` with ``cfg.tokenizer.vfm_weights`` (random when unset: logged)."""
    from pae_fast.registry import create_tokenizer

    tok = create_tokenizer(cfg.tokenizer.name, vfm_weights=cfg.tokenizer.vfm_weights)
    if cfg.tokenizer.vfm_weights is None:
        log.warning("tokenizer.vfm_weights is unset: the VFM has RANDOM weights (tests / demos only)")
    return tok, tok.vfm


def _refine_loss_fn(shared: Shared):
    from pae_fast.losses.refine import refine_step_loss

    def loss_fn(model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch[0]
        vfm = shared.vfm
        if next(vfm.parameters()).device != images.device:  # the engine moves only the trained module
            vfm.to(images.device)
        with torch.no_grad():
            tokens = vfm.tokens(vfm.preprocess(images.float()))  # (B, N, D), frozen
        priors = model.module if hasattr(model, "module") else model
        out = refine_step_loss(priors, tokens, shared.cfg, shared.image_size)
        total = out.pop("total")
        return total, out

    return loss_fn


def build_refine_task(cfg: Config, dataset: torch.utils.data.Dataset | None = None) -> Any:
    """The :class:`~pae_fast.engine.task.TrainTask` of stage 0 (reads only; writes nothing).

    Args:
        cfg: ``tokenizer`` (name, vfm_weights), ``refine``, ``data``, ``seed``.
        dataset: map-style ``(image (3, S, S) in [0, 1], label, ...)``; default: :func:`open_image_data`.
    """
    from pae_fast.engine.state import seed_all
    from pae_fast.engine.task import TrainTask
    from pae_fast.models.refine import RefinedPriors
    from pae_fast.stages.image_data import check_image_size, open_image_data

    if cfg.refine.lambda_rep <= 0 and cfg.refine.lambda_gram <= 0:
        raise ConfigError("refine.lambda_rep and refine.lambda_gram are both 0: nothing to train")
    from pae_fast.models.refine import UPSAMPLERS

    if cfg.refine.upsampler not in UPSAMPLERS:
        raise ConfigError(f"refine.upsampler={cfg.refine.upsampler!r}: registered {sorted(UPSAMPLERS)}")
    seed_all(cfg.seed)  # before any module is built: the seed sets the initial weights
    tok, vfm = frozen_vfm(cfg)
    check_image_size(cfg, tok.image_size)
    if vfm.embed_dim % cfg.refine.projector_heads:
        raise ConfigError(f"refine.projector_heads={cfg.refine.projector_heads} does not divide the VFM width "
                          f"{vfm.embed_dim}")
    if cfg.refine.reconstructor_hidden % cfg.refine.reconstructor_heads:
        raise ConfigError(f"refine.reconstructor_heads={cfg.refine.reconstructor_heads} does not divide "
                          f"refine.reconstructor_hidden={cfg.refine.reconstructor_hidden}")
    ds = open_image_data(cfg)[0] if dataset is None else dataset
    if len(ds) == 0:
        raise ConfigError(f"the image data {getattr(ds, 'path', type(ds).__name__)} is empty")
    seed_all(cfg.seed)
    model = RefinedPriors.from_config(cfg.refine, vfm.embed_dim, vfm.grid_size, tok.latent_shape[0])
    shared = Shared(vfm=vfm, cfg=cfg.refine, image_size=tok.image_size)
    metadata = recipe_metadata(cfg, tok)
    return TrainTask(name="refine", model=model, loss_fn=_refine_loss_fn(shared), dataset=ds, metadata=metadata,
                     num_workers=cfg.data.num_workers if dataset is None else 0)


def recipe_metadata(cfg: Config, tok: Any) -> dict[str, str]:
    """The targets' recipe stored with the priors (what ``train-tokenizer`` checks before using them)."""
    r = cfg.refine
    return {
        "priors": "refined",
        "tokenizer": cfg.tokenizer.name,
        "encoder": tok.vfm.name,
        "vfm_dim": str(tok.vfm_dim),
        "grid": str(tok.vfm.grid_size),
        "image_size": str(tok.image_size),
        "latent_dim": str(tok.latent_shape[0]),
        "projector_heads": str(r.projector_heads),
        "upsampler": r.upsampler,
        "lowpass_strength": repr(float(r.lowpass_strength)),
        "lambda_rep": repr(float(r.lambda_rep)),
        "lambda_gram": repr(float(r.lambda_gram)),
    }


def refine_priors(cfg: Config, dataset: torch.utils.data.Dataset | None = None) -> Path:
    """Train the refined priors with the shared engine and write ``<out_dir>/priors.safetensors``.

    Args:
        cfg: the run config (``tokenizer``, ``refine``, ``data``, ``train``, ``seed``, ``out_dir``).
        dataset: optional map-style dataset of ``(image (3, S, S) float in [0, 1], label)``; default ``cfg.data``.
    Returns:
        the path of ``priors.safetensors`` (projector weights + the recipe in its metadata).
    """
    from pae_fast.engine import train
    from pae_fast.engine.checkpoint import latest_checkpoint
    from pae_fast.engine.distributed import is_main
    from pae_fast.io import save_safetensors
    from pae_fast.run_identity import open_run, run_identity
    from pae_fast.weights import read_state_dict

    task = build_refine_task(cfg, dataset)  # validates everything before the folder is touched
    # what defines the priors: the data, the encoder (tokenizer name + VFM weights) and the refine section
    identity = {k: v for k, v in run_identity(cfg, ("data", "tokenizer", "refine")).items()
                if not k.startswith("tokenizer.") or k in ("tokenizer.name", "tokenizer.vfm_weights")}
    if dataset is not None:
        identity["data.dataset"] = f"{type(dataset).__name__}:{len(dataset)}"
    out = Path(cfg.out_dir)
    with open_run(out, identity, cfg.train.resume, main=is_main()):
        result = train(task, cfg.train, out, seed=cfg.seed, config_yaml=dump_yaml(cfg))
        if result.interrupted or not is_main():
            return out / PRIORS_FILE
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise ConfigError(f"refine-priors: no checkpoint under {out} (train.steps={cfg.train.steps})")
        state, meta = read_state_dict(ckpt / "model.safetensors", key="refine checkpoint")
        proj = {k[len("projector."):]: v.contiguous() for k, v in state.items() if k.startswith("projector.")}
        recipe = {**task.metadata, "step": meta.get("step", ""), "source": str(ckpt)}
        path = out / PRIORS_FILE
        save_safetensors(proj, path, metadata={"recipe": json.dumps(recipe, sort_keys=True), **recipe})
    log.info("refined priors written to %s", path)
    return path


def load_priors(path: str, cfg: Config, tok: Any) -> tuple[nn.Module, dict[str, str]]:
    """The frozen projector ``P_t`` from ``priors.safetensors`` after checking its recipe against this tokenizer.

    Returns:
        ``(PriorProjector (eval, no grad), metadata)``.
    Raises:
        ConfigError: the priors were made for another encoder / grid / width; WeightsError: unreadable file.
    """
    from pae_fast.models.refine import PriorProjector
    from pae_fast.weights import load_into, read_state_dict

    state, meta = read_state_dict(path, key="tokenizer.priors_file")
    want = {"vfm_dim": str(tok.vfm_dim), "grid": str(tok.vfm.grid_size)}
    if tok.kind == "pae":
        want["latent_dim"] = str(tok.latent_shape[0])
    bad = [f"{k}={meta.get(k)!r} (this tokenizer: {v})" for k, v in want.items() if meta.get(k) != v]
    if bad:
        raise ConfigError(f"tokenizer.priors_file={path!r} was made for another tokenizer: {'; '.join(bad)}")
    proj = PriorProjector(tok.vfm_dim, int(meta["latent_dim"]), int(meta.get("projector_heads", "16")))
    load_into(proj, state, what=f"tokenizer.priors_file={path!r}", strict=True)
    proj.eval().requires_grad_(False)
    return proj, meta

"""Stage 0: refined priors (``refine-priors``), docs/method.md § Refined priors.

Trains :class:`~pae_fast.models.refine.RefinedPriors` (projector ``P_t: D -> C``, C the tokenizer's latent width:
the tokenizer's own projector; and ``Q_t`` = the tokenizer's decompressor + a ViT) on the frozen VFM tokens of the
images with :func:`pae_fast.losses.refine.refine_step_loss` through the shared engine. Only what it trains is built,
plus the frozen encoder: the tokenizer is read on the meta device for its sizes, never built. It then writes
``<out_dir>/priors.safetensors``: the tokenizer's ``projector.*`` and ``decompressor.*`` keys
(:meth:`~pae_fast.models.refine.RefinedPriors.tokenizer_state`) from the newest checkpoint's trained (not EMA) model
[choice], and the targets' recipe in its metadata (``upsampler``, ``lowpass_strength``, ``grid``, ``latent_dim``,
``vfm_dim``, ``projector_heads``, ``image_size``, the tokenizer and encoder names). ``train-tokenizer`` reads it with
:func:`load_priors` (the frozen ``P_t``, ``tokenizer.priors_file``) and starts the PAE tokenizer from it with
:func:`init_tokenizer_from_priors` (docs/method.md § Refined priors).
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

__all__ = ["PRIORS_FILE", "build_refine_task", "refine_priors", "load_priors", "init_tokenizer_from_priors"]

log = logging.getLogger("pae_fast.train.refine")

PRIORS_FILE = "priors.safetensors"


def tokenizer_sizes(name: str) -> Any:
    """The tokenizer ``name`` built on the meta device (no memory, no weights): its sizes, kind and encoder name."""
    from pae_fast.registry import create_tokenizer

    quiet = logging.getLogger("pae_fast.models")  # a meta build is random by construction: no warning for it
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            return create_tokenizer(name)
    finally:
        quiet.setLevel(level)


def frozen_vfm(cfg: Config) -> tuple[Any, Any]:
    """``(meta tokenizer, frozen encoder)``: the encoder of ``cfg.tokenizer.name`` built for real with
    ``cfg.tokenizer.vfm_weights`` (random when unset: logged); the rest of the tokenizer only on the meta device."""
    from pae_fast.models.vfm import build_vfm

    tok = tokenizer_sizes(cfg.tokenizer.name)
    vfm = build_vfm(tok.vfm.name, weights=cfg.tokenizer.vfm_weights, log_random=False)
    if cfg.tokenizer.vfm_weights is None:
        log.warning("tokenizer.vfm_weights is unset: the VFM has RANDOM weights (tests / demos only)")
    return tok, vfm


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
    if tok.kind == "pae" and cfg.refine.projector_heads != vfm.num_heads:
        raise ConfigError(f"refine.projector_heads={cfg.refine.projector_heads} but {cfg.tokenizer.name}'s projector "
                          f"has {vfm.num_heads} heads (P_t and the decompressor initialise the tokenizer's)")
    ds = open_image_data(cfg)[0] if dataset is None else dataset
    if len(ds) == 0:
        raise ConfigError(f"the image data {getattr(ds, 'path', type(ds).__name__)} is empty")
    seed_all(cfg.seed)
    model = RefinedPriors.from_config(cfg.refine, vfm.embed_dim, vfm.grid_size, tok.latent_shape[0])
    shared = Shared(vfm=vfm, cfg=cfg.refine, image_size=tok.image_size)
    metadata = recipe_metadata(cfg, tok)
    return TrainTask(name="refine", model=model, loss_fn=_refine_loss_fn(shared), dataset=ds, metadata=metadata,
                     num_workers=cfg.data.num_workers if dataset is None else 0,
                     collate_fn=getattr(ds, "collate_fn", None))  # data.on_bad_file=skip drops bad files


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
        the path of ``priors.safetensors`` (projector and decompressor weights + the recipe in its metadata).
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
        task.model.load_state_dict(state)  # the trained (not EMA) weights of the newest checkpoint
        proj = {k: v.detach().cpu().contiguous() for k, v in task.model.tokenizer_state().items()}
        recipe = {**task.metadata, "step": meta.get("step", ""), "source": str(ckpt)}
        path = out / PRIORS_FILE
        save_safetensors(proj, path, metadata={"recipe": json.dumps(recipe, sort_keys=True), **recipe})
    log.info("refined priors written to %s", path)
    return path


def _read_priors(path: str, tok: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of ``priors.safetensors`` after checking its recipe against this tokenizer."""
    from pae_fast.weights import read_state_dict

    state, meta = read_state_dict(path, key="tokenizer.priors_file")
    want = {"vfm_dim": str(tok.vfm_dim), "grid": str(tok.vfm.grid_size)}
    if tok.kind == "pae":
        want["latent_dim"] = str(tok.latent_shape[0])
        want["projector_heads"] = str(tok.vfm.num_heads)
    bad = [f"{k}={meta.get(k)!r} (this tokenizer: {v})" for k, v in want.items() if meta.get(k) != v]
    if bad:
        raise ConfigError(f"tokenizer.priors_file={path!r} was made for another tokenizer: {'; '.join(bad)}")
    return state, meta


def load_priors(path: str, cfg: Config, tok: Any) -> tuple[nn.Module, dict[str, str]]:
    """The frozen projector ``P_t`` from ``priors.safetensors`` after checking its recipe against this tokenizer.

    Returns:
        ``(PriorProjector (eval, no grad), metadata)``.
    Raises:
        ConfigError: the priors were made for another encoder / grid / width / head count; WeightsError: unreadable
        file, or one without the projector's keys (the key diff).
    """
    from pae_fast.models.refine import PriorProjector
    from pae_fast.weights import load_into

    state, meta = _read_priors(path, tok)
    proj = PriorProjector(tok.vfm_dim, int(meta["latent_dim"]), int(meta["projector_heads"]), tok.vfm.grid_size)
    proj_state = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    load_into(proj, proj_state, what=f"tokenizer.priors_file={path!r} (projector.*)", strict=True)
    proj.eval().requires_grad_(False)
    return proj, meta


@torch.no_grad()
def init_tokenizer_from_priors(tok: nn.Module, path: str) -> list[str]:
    """Start a PAE tokenizer at its refined prior: its ``projector.*`` and ``decompressor.*`` from ``path``, strictly
    (as the authors' ``pretrained_compressor_path`` loads ``latent_compressor.*`` and ``latent_decompressor.*``).

    Returns:
        the keys loaded.
    Raises:
        ConfigError: the priors were made for another tokenizer; WeightsError: a key or shape differs (key diff).
    """
    from pae_fast.weights import load_into

    state, _ = _read_priors(path, tok)
    parts = {k: v for k, v in tok.state_dict().items() if k.startswith(("projector.", "decompressor."))}
    holder = nn.Module()  # load_into's strict key diff over exactly these two parts
    holder.projector, holder.decompressor = tok.projector, tok.decompressor
    load_into(holder, state, what=f"tokenizer.priors_file={path!r}", strict=True)
    return sorted(parts)

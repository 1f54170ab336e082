"""The demo's measurements: held-out reconstruction PSNR, the Fréchet distance of images in the VFM's feature
space, the generator's held-out validation loss, and the untrained generator the trained one is compared with.

Every number here is computed from files of the run (weights, caches, sample npz) on held-out data; nothing is
typed in (docs/method.md § Demo).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["load_vfm", "vfm_features", "image_fd", "recon_psnr", "validation_loss", "save_untrained_generator",
           "load_npz_images"]


def load_vfm(weights: str | os.PathLike, encoder: str = "ViT-tiny") -> nn.Module:
    """The frozen encoder with its weights (through the registry and :mod:`pae_fast.weights`)."""
    import pae_fast.models  # noqa: F401  (registers the encoders)
    from pae_fast.registry import create_encoder

    return create_encoder(encoder, weights=str(weights)).eval()


@torch.no_grad()
def vfm_features(vfm: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean-pooled patch tokens ``(N, D)`` of ``images (N, 3, S, S)`` in [0, 1] (the FD feature space)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, S, S) in [0, 1], got {tuple(images.shape)}")
    return torch.cat([vfm(images[i : i + batch_size].float()).mean(1) for i in range(0, len(images), batch_size)])


def image_fd(vfm: nn.Module, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between the VFM features of ``images`` and of ``reference`` (both ``(N, 3, S, S)``)."""
    from pae_fast.eval.fid import frechet_distance_features

    fd = frechet_distance_features(vfm_features(vfm, images), vfm_features(vfm, reference))
    if not math.isfinite(fd):
        raise FloatingPointError(f"image FD is {fd}")
    return fd


def load_npz_images(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples.npz`` of ``sample`` -> images ``(N, 3, H, W)`` float in [0, 1] and labels ``(N,)``."""
    with np.load(path) as f:
        arr, labels = f["arr_0"], f["labels"]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255), torch.from_numpy(labels).long()


@torch.no_grad()
def recon_psnr(tokenizer: nn.Module, images: torch.Tensor, batch_size: int = 64) -> tuple[float, torch.Tensor]:
    """Mean PSNR (dB) of ``decode(encode(x))`` (clamped to [0, 1]) over ``images``; and the reconstructions."""
    from pae_fast.eval.recon import psnr

    recs = torch.cat([tokenizer(images[i : i + batch_size]).clamp(0, 1) for i in range(0, len(images), batch_size)])
    return float(psnr(recs, images).mean()), recs


@torch.no_grad()
def validation_loss(model: nn.Module, latents: torch.Tensor, labels: torch.Tensor, flow_cfg: Any, shift: float,
                    draws: int = 4, seed: int = 0, batch_size: int = 256) -> float:
    """The flow-matching training loss on held-out latents, averaged over ``draws`` seeded (time, noise) draws per
    latent, with the model in eval mode (no label dropout).

    Args:
        model: the generator (our time convention).
        latents: ``(N, C, H, W)`` held-out latents, standardised with the training cache's statistics.
        labels: ``(N,)``.
        flow_cfg: the run's ``flow`` section (time sampling, cosine term); ``shift`` the training shift used.
    """
    from pae_fast.flow.loss import FlowLoss, flow_matching_loss

    loss_fn = FlowLoss.from_config(flow_cfg, shift=shift)
    g = torch.Generator().manual_seed(seed)
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for _ in range(draws):
        for s in range(0, len(latents), batch_size):
            x1, y = latents[s : s + batch_size], labels[s : s + batch_size]
            t, xt, v = loss_fn.sample_path(x1, generator=g)
            loss, _ = flow_matching_loss(model(xt, t, y).float(), v, cosine=loss_fn.cosine)
            total += float(loss) * len(x1)
            count += len(x1)
    model.train(was)
    return total / count


def save_untrained_generator(cfg: Any, path: str | os.PathLike) -> Path:
    """The generator exactly as ``train-dit`` would start it (same seed, same latent statistics in the metadata),
    saved as a weights file ``sample`` loads: the baseline "before training" sampled with the same sampler."""
    from pae_fast.config import dump_yaml
    from pae_fast.io import save_safetensors
    from pae_fast.stages.train_generator import build_generator_task

    task, run_cfg = build_generator_task(cfg)
    meta = {**task.metadata, "config": dump_yaml(run_cfg), "step": "0"}
    state = {k: v.detach().contiguous() for k, v in task.model.state_dict().items()}
    path = Path(path)
    save_safetensors(state, path, metadata=meta)
    return path

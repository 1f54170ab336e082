"""Reconstruction terms of the tokenizer loss: L1 and LPIPS (docs/method.md §Tokenizer losses).

LPIPS is :mod:`pae_fast.losses.lpips` (VGG-16 through torchvision's layer layout + the linear heads, frozen,
differentiable w.r.t. its inputs); this module only decides, from :class:`~pae_fast.config.TokenizerConfig`, whether
the term is on and from which local files it is built:

- ``lpips_weights: none`` (the string): the LPIPS term is off (tests, demos without weights); it is then absent from
  the loss dict and :func:`lpips_status` reports ``"off"``;
- ``lpips_weights: <file>`` (+ ``lpips_backbone_weights: <file>`` unless the file is a whole pae_fast LPIPS state
  dict): the perceptual metric;
- ``lpips_weights`` unset while ``lambda_lpips > 0``: :class:`LPIPSWeightsMissing`, naming the keys and files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pae_fast.losses.lpips import LPIPS

__all__ = ["LPIPS_OFF", "LPIPSWeightsMissing", "l1_loss", "lpips_loss", "lpips_enabled", "lpips_status", "build_lpips"]

LPIPS_OFF = "none"  # value of tokenizer.lpips_weights that turns the LPIPS term off


class LPIPSWeightsMissing(FileNotFoundError):
    """LPIPS was requested (lambda_lpips > 0) but its weight files are not configured or do not exist."""


def l1_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over every element.

    Args:
        x, y: ``(B, 3, H, W)`` images (any equal shapes).
    Returns:
        0-dim fp32 (fp64 for fp64 inputs) loss.
    """
    if x.shape != y.shape:
        raise ValueError(f"l1_loss: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    dt = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dt) - y.to(dt)).abs().mean()


def lpips_loss(lpips: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS distance of a batch (differentiable w.r.t. both images; the network itself is frozen).

    Args:
        lpips: a frozen :class:`~pae_fast.losses.lpips.LPIPS`.
        x, y: ``(B, 3, H, W)`` images in [0, 1] (cast once to the trunk's compute dtype inside).
    Returns:
        0-dim fp32 loss (mean over images).
    """
    return lpips(x, y).mean()


def lpips_enabled(cfg: Any) -> bool:
    """True when the config asks for the LPIPS term (weight > 0 and ``lpips_weights`` is not ``"none"``)."""
    w = getattr(cfg, "lpips_weights", None)
    return float(cfg.lambda_lpips) > 0 and not (isinstance(w, str) and w.lower() == LPIPS_OFF)


def lpips_status(cfg: Any, lpips: LPIPS | None) -> str:
    """One line for logs: ``"off (tokenizer.lpips_weights: none)"``, ``"off (lambda_lpips = 0)"`` or the files."""
    if lpips is None:
        if float(cfg.lambda_lpips) <= 0:
            return "off (tokenizer.lambda_lpips = 0)"
        return "off (tokenizer.lpips_weights: none)"
    files = [f for f in (cfg.lpips_weights, getattr(cfg, "lpips_backbone_weights", None)) if f]
    return f"on (VGG-16 LPIPS from {', '.join(map(str, files)) or 'injected module'})"


def build_lpips(cfg: Any, device: torch.device | str | None = None) -> LPIPS | None:
    """The LPIPS module the tokenizer loss uses, or None when the term is off.

    Args:
        cfg: a :class:`~pae_fast.config.TokenizerConfig` (``lambda_lpips``, ``lpips_weights``,
            ``lpips_backbone_weights``).
        device: where to put the module.

    Raises:
        LPIPSWeightsMissing: LPIPS is on but ``tokenizer.lpips_weights`` is unset or a named file does not exist.
    """
    if not lpips_enabled(cfg):
        return None
    heads = cfg.lpips_weights
    backbone = getattr(cfg, "lpips_backbone_weights", None)
    if heads is None:
        raise LPIPSWeightsMissing(
            f"tokenizer.lambda_lpips = {cfg.lambda_lpips} but tokenizer.lpips_weights is not set: LPIPS needs local "
            "weights (the official v0.1 VGG heads file, e.g. vgg.pth, plus tokenizer.lpips_backbone_weights = a "
            "torchvision vgg16 state dict, or one whole pae_fast LPIPS safetensors). "
            f"Set tokenizer.lpips_weights: {LPIPS_OFF} to train without the LPIPS term."
        )
    missing = [f"{k}={str(p)!r}" for k, p in (("tokenizer.lpips_weights", heads),
                                                ("tokenizer.lpips_backbone_weights", backbone))
               if p is not None and not Path(p).exists()]  # fmt: skip
    if missing:
        raise LPIPSWeightsMissing(f"LPIPS weight file(s) not found: {', '.join(missing)}")
    try:
        module = LPIPS("vgg", heads, backbone)
    except ValueError as e:  # the files do not cover every parameter: name them and what is missing
        raise LPIPSWeightsMissing(f"tokenizer.lpips_weights / tokenizer.lpips_backbone_weights: {e}") from e
    return module.to(device) if device is not None else module

"""SCR, the global-semantics regularizer (docs/method.md §SCR).

``L_SCR = (1 - cos(pool(T), pool(z))) + mean_i (1 - cos(T_i, z_i))``, batch mean, where ``pool`` is the mean over
tokens and ``T`` the 32-d semantic target (refined projector output, or a raw projection; detached). Either term can
be switched off (``tokenizer.scr_terms``: ``pooled | patch | both``); an off term is not computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pae_fast.losses.ssr import latent_tokens

__all__ = ["SCR_TERMS", "scr_losses"]

SCR_TERMS = ("pooled", "patch", "both")


def scr_losses(z: torch.Tensor, target: torch.Tensor, terms: str = "both") -> dict[str, torch.Tensor]:
    """The SCR terms that are on.

    Args:
        z: ``(B, C, H, W)`` latent or ``(B, N, C)`` tokens.
        target: ``(B, N, C)`` semantic target tokens or a ``(B, C, H, W)`` map (same C as z); detached.
        terms: ``"pooled"``, ``"patch"`` or ``"both"``.
    Returns:
        ``{"scr_pooled": ..., "scr_patch": ...}`` (only the terms that are on), each 0-dim fp32.
    """
    if terms not in SCR_TERMS:
        raise ValueError(f"tokenizer.scr_terms: expected one of {SCR_TERMS}, got {terms!r}")
    zt = latent_tokens(z).float()
    tt = latent_tokens(target).detach().float()
    if zt.shape != tt.shape:
        raise ValueError(f"scr: latent tokens {tuple(zt.shape)} and semantic target {tuple(tt.shape)} must match "
                         "(the target is projected to the latent width)")  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    if terms in ("pooled", "both"):
        out["scr_pooled"] = (1 - F.cosine_similarity(zt.mean(1), tt.mean(1), dim=-1, eps=1e-8)).mean()
    if terms in ("patch", "both"):
        out["scr_patch"] = (1 - F.cosine_similarity(zt, tt, dim=-1, eps=1e-8)).mean()
    return out

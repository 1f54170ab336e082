"""SSR, the spatial-structure regularizer (docs/method.md § SSR).

``L_SSR = sum_b ||G_z - G_T||_F^2 / den`` with ``G = X^ X^T`` the token x token Gram matrix of the latent ``z`` and
of the structural target ``T``, computed by the tiled fused kernel :func:`pae_fast.kernels.gram_loss` (the N x N
matrices never exist in memory on the Triton path). Two explicit options (``tokenizer.ssr_gram``,
``tokenizer.ssr_reduction``), the same for both sides:

- ``gram``: ``cosine`` (default; ``X^`` = l2-normalised tokens) or ``raw`` (``X^ = X``, plain inner products);
- ``reduction``: ``mean`` (default; den = B N^2, the mean over every Gram entry), ``row_mean`` (den = B N) or
  ``sum`` (den = B: the paper's literal squared Frobenius norm per image, averaged over the batch).

The target is a stop-gradient: it is detached here.
"""

from __future__ import annotations

import torch

__all__ = ["SSR_GRAMS", "latent_tokens", "ssr_loss"]

SSR_GRAMS = ("cosine", "raw")


def latent_tokens(z: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` latent -> ``(B, H*W, C)`` tokens (a view; row-major over the grid); ``(B, N, C)`` passes."""
    if z.dim() == 4:
        return z.flatten(2).transpose(1, 2)
    if z.dim() == 3:
        return z
    raise ValueError(f"expected a (B, C, H, W) latent or (B, N, C) tokens, got shape {tuple(z.shape)}")


def ssr_loss(z: torch.Tensor, target: torch.Tensor, backend: str | None = None, gram: str = "cosine",
             reduction: str = "mean") -> torch.Tensor:  # fmt: skip
    """SSR between the latent and its structural target.

    Args:
        z: ``(B, C, H, W)`` latent or ``(B, N, C)`` tokens.
        target: ``(B, N, C_T)`` target tokens (``C_T`` may differ from C) or a ``(B, C_T, H, W)`` map; detached.
        backend: kernel backend (``auto | triton | torch``; None: the scope default).
        gram: ``cosine`` | ``raw`` (``tokenizer.ssr_gram``), applied to both Grams.
        reduction: ``mean`` | ``row_mean`` | ``sum`` (``tokenizer.ssr_reduction``).
    Returns:
        0-dim fp32 loss.
    """
    from pae_fast.kernels import gram_loss

    if gram not in SSR_GRAMS:
        raise ValueError(f"ssr_loss: gram must be one of {', '.join(SSR_GRAMS)} (tokenizer.ssr_gram), got {gram!r}")
    zt, tt = latent_tokens(z), latent_tokens(target).detach()
    if zt.shape[:2] != tt.shape[:2]:
        raise ValueError(f"ssr_loss: latent tokens {tuple(zt.shape)} and target tokens {tuple(tt.shape)} must share "
                         "(B, N): build the target on the latent grid")  # fmt: skip
    return gram_loss(zt, tt, normalize=gram == "cosine", backend=backend, reduction=reduction)

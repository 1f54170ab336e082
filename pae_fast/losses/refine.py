"""Refined-prior loss (stage 0) and the SSR / SCR targets the tokenizer trains against
(docs/method.md §Refined priors).

    L_refine = lambda_rep mean ||Q_t(P_t(H)) - H||^2 + lambda_gram mean_ij (Gram(P_t(H)) - Gram(H_ref))_ij^2

``H`` = frozen VFM tokens (detached), ``H_ref`` = :func:`~pae_fast.models.refine.structural_target`. Grams are cosine
Grams of l2-normalised tokens through :func:`pae_fast.kernels.gram_loss`, the same kernel as SSR [choice].

Targets for the tokenizer (:func:`build_prior_targets`):
- ``priors="refined"``: SSR and SCR both use ``P_t(H)`` (32-d, the refined projector, frozen);
- ``priors="raw"``: SSR uses the raw VFM tokens ``H`` (D-d; the Gram kernel accepts a different width) and SCR a
  fixed linear projection of ``H`` to the latent width: PCA (``raw_prior_projection="pca"``, the top principal
  directions of VFM tokens, fitted once by :meth:`RawProjection.fit`) or a fixed seeded random orthonormal
  projection (``"random"``) [choice].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from pae_fast.losses.total import PriorTargets, term_on
from pae_fast.models.refine import RefinedPriors

__all__ = ["refine_loss", "refine_step_loss", "RawProjection", "build_prior_targets"]


def refine_loss(
    priors: RefinedPriors,
    vfm_tokens: torch.Tensor,
    structure: torch.Tensor | None,
    lambda_rep: float = 1.0,
    lambda_gram: float = 1.0,
    backend: str | None = None,
) -> dict[str, torch.Tensor]:
    """The stage-0 loss.

    Args:
        priors: the :class:`~pae_fast.models.refine.RefinedPriors` being trained.
        vfm_tokens: ``(B, N, D)`` frozen VFM tokens (detached here).
        structure: ``(B, N, D)`` structural target ``H_ref`` (detached here); may be None when ``lambda_gram`` is 0.
        lambda_rep, lambda_gram: weights (``refine.lambda_rep`` / ``refine.lambda_gram``); a zero weight skips the term.
    Returns:
        ``{"rep"?, "gram"?, "total"}`` 0-dim fp32 (``rep``/``gram`` detached).
    """
    from pae_fast.kernels import gram_loss

    h = vfm_tokens.detach()
    p = priors.projector(h)
    out: dict[str, torch.Tensor] = {}
    parts = []
    if lambda_rep > 0:
        rep = (priors.reconstructor(p).float() - h.float()).pow(2).mean()
        out["rep"] = rep.detach()
        parts.append(lambda_rep * rep)
    if lambda_gram > 0:
        if structure is None:
            raise ValueError("refine_loss: lambda_gram > 0 needs the structural target H_ref")
        gram = gram_loss(p, structure.detach(), normalize=True, backend=backend)
        out["gram"] = gram.detach()
        parts.append(lambda_gram * gram)
    if not parts:
        raise ValueError("refine_loss: refine.lambda_rep and refine.lambda_gram are both 0")
    out["total"] = torch.stack(parts).sum()
    return out


def refine_step_loss(
    priors: RefinedPriors, vfm_tokens: torch.Tensor, cfg: Any, image_size: int, backend: str | None = None
) -> dict[str, torch.Tensor]:
    """:func:`refine_loss` of one batch with its structural target built from a
    :class:`~pae_fast.config.RefineConfig` (``lowpass_strength``, ``upsampler``, ``lambda_rep``, ``lambda_gram``).

    Args:
        priors: the model being trained (its ``grid`` is the latent grid).
        vfm_tokens: ``(B, N, D)`` frozen VFM tokens of images of side ``image_size``.
    """
    from pae_fast.models.refine import structural_target

    structure = None
    if cfg.lambda_gram > 0:
        structure = structural_target(vfm_tokens, image_size, priors.grid, cfg.lowpass_strength, cfg.upsampler)
    return refine_loss(priors, vfm_tokens, structure, cfg.lambda_rep, cfg.lambda_gram, backend)


class RawProjection(nn.Module):
    """A fixed linear map ``D -> out_dim`` of raw VFM tokens (the SCR target when ``priors="raw"``).

    Args:
        dim: VFM width D; out_dim: the latent width.
        kind: ``"pca"`` (call :meth:`fit` once on a sample of tokens) or ``"random"`` (orthonormal, seeded).
        seed: seed of the random projection.
    """

    def __init__(self, dim: int, out_dim: int = 32, kind: str = "pca", seed: int = 0) -> None:
        super().__init__()
        if kind not in ("pca", "random"):
            raise ValueError(f"tokenizer.raw_prior_projection: expected 'pca' or 'random', got {kind!r}")
        if out_dim > dim:
            raise ValueError(f"RawProjection: out_dim {out_dim} exceeds the VFM width {dim}")
        self.kind = kind
        self.register_buffer("mean", torch.zeros(dim))
        w = torch.zeros(dim, out_dim)
        if kind == "random":
            g = torch.Generator().manual_seed(seed)
            w = torch.linalg.qr(torch.randn(dim, out_dim, generator=g, dtype=torch.float64))[0].float()
        self.register_buffer("weight", w)  # (D, out_dim), orthonormal columns
        self.register_buffer("fitted", torch.tensor(kind == "random"))

    @torch.no_grad()
    def fit(self, tokens: torch.Tensor) -> RawProjection:
        """PCA on ``(..., D)`` tokens: mean and the top ``out_dim`` principal directions (no-op for ``random``)."""
        if self.kind != "pca":
            return self
        x = tokens.detach().reshape(-1, tokens.shape[-1]).double()
        if x.shape[0] < self.weight.shape[1]:
            raise ValueError(f"RawProjection.fit: need >= {self.weight.shape[1]} tokens, got {x.shape[0]}")
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        self.mean.copy_(mean.float())
        self.weight.copy_(vh[: self.weight.shape[1]].T.float())
        self.fitted.fill_(True)
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) -> (B, N, out_dim)``."""
        if not bool(self.fitted):
            raise RuntimeError("RawProjection(kind='pca') is not fitted: call .fit(tokens) on a sample first")
        return (tokens.float() - self.mean) @ self.weight


@torch.no_grad()
def build_prior_targets(
    vfm_tokens: torch.Tensor,
    cfg: Any,
    projector: nn.Module | None = None,
    raw_projection: RawProjection | None = None,
) -> PriorTargets:
    """SSR / SCR targets of one batch, without grad.

    Args:
        vfm_tokens: ``(B, N, D)`` frozen VFM tokens.
        cfg: the :class:`~pae_fast.config.TokenizerConfig` (``priors``, ``ssr``/``scr`` switches and weights).
        projector: the frozen refined projector ``P_t`` (``priors="refined"``).
        raw_projection: the fitted :class:`RawProjection` (``priors="raw"`` with SCR on).
    Returns:
        :class:`~pae_fast.losses.total.PriorTargets` with only the targets of the terms that are on.
    """
    ssr_on, scr_on = term_on(cfg, "ssr"), term_on(cfg, "scr")
    h = vfm_tokens.detach()
    if not (ssr_on or scr_on):
        return PriorTargets()
    if cfg.priors == "refined":
        if projector is None:
            raise ValueError("tokenizer.priors='refined' needs the refined projector P_t (run refine-priors first)")
        p = projector(h).float()
        return PriorTargets(structure=p if ssr_on else None, semantic=p if scr_on else None)
    if cfg.priors != "raw":
        raise ValueError(f"tokenizer.priors: expected 'refined' or 'raw', got {cfg.priors!r}")
    semantic = None
    if scr_on:
        if raw_projection is None:
            raise ValueError("tokenizer.priors='raw' with SCR on needs a RawProjection (fitted for 'pca')")
        semantic = raw_projection(h)
    return PriorTargets(structure=h if ssr_on else None, semantic=semantic)

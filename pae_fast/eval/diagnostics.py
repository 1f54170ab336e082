"""PAE's latent diagnostics and sampler-trajectory measures (docs/method.md § Diffusability metrics): SSC, NMI,
LPC, eRank, straightness and efficiency.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pae_fast.eval.diffusability import check_latents

__all__ = ["nmi", "ssc", "lpc", "erank", "straightness", "efficiency"]


# ----------------------------------------------------------------------------------------------------------------
# SSC: spectral clustering of tokens vs segmentation
# ----------------------------------------------------------------------------------------------------------------


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of two labelings, ``MI / mean(H(a), H(b))`` (1 if both are constant)."""
    a = np.unique(np.asarray(a).ravel(), return_inverse=True)[1]
    b = np.unique(np.asarray(b).ravel(), return_inverse=True)[1]
    if a.shape != b.shape:
        raise ValueError(f"nmi: labelings differ in size: {a.shape} vs {b.shape}")
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pa[:, None] * pb[None])[nz])).sum())
    ent = lambda q: float(-(q[q > 0] * np.log(q[q > 0])).sum())
    ha, hb = ent(pa), ent(pb)
    if ha == 0 and hb == 0:
        return 1.0
    return max(0.0, mi / ((ha + hb) / 2))


def ssc(
    latents: torch.Tensor,
    segments: torch.Tensor,
    sigma: float = 0.1,
    max_images: int | None = 256,
    seed: int = 0,
) -> float:
    """Spectral segmentation consistency: NMI between spectral clusters of the token affinity
    ``exp(<z_i, z_j> / sigma)`` (l2-normalised tokens) and segmentation labels, averaged over images.

    Clustering: normalised affinity ``D^-1/2 A D^-1/2``, its top-k eigenvectors row-normalised (Ng, Jordan & Weiss,
    2001), k-means with k-means++ seeding; ``k`` = the number of segments in that image. Images with one segment are
    skipped.

    Args:
        latents: ``(N, C, H, W)``.
        segments: ``(N, H, W)`` integer segment ids at token resolution (larger masks are reduced by nearest
            sampling).
        sigma: affinity temperature.
    """
    from scipy.cluster.vq import kmeans2

    check_latents(latents)
    n, c, h, w = latents.shape
    if segments.dim() != 3 or segments.shape[0] != n:
        raise ValueError(f"segments must be (N={n}, H, W) integer masks, got {tuple(segments.shape)}")
    if segments.shape[1:] != (h, w):
        segments = torch.nn.functional.interpolate(segments[:, None].float(), size=(h, w), mode="nearest")[:, 0]
    segments = segments.long().cpu()
    if max_images is not None:
        latents, segments = latents[:max_images], segments[:max_images]
    rng = np.random.default_rng(seed)
    scores = []
    z = torch.nn.functional.normalize(latents.detach().cpu().double().reshape(latents.shape[0], c, h * w), dim=1)
    for i in range(z.shape[0]):
        seg = segments[i].flatten().numpy()
        k = len(np.unique(seg))
        if k < 2:
            continue
        a = torch.exp((z[i].t() @ z[i] - 1) / sigma)  # (S, S); the constant shift cancels in the normalisation
        dinv = a.sum(1).rsqrt()
        m = dinv[:, None] * a * dinv[None]
        _, vecs = torch.linalg.eigh(m)
        emb = torch.nn.functional.normalize(vecs[:, -k:], dim=1).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kmeans2 warns about empty clusters; they are re-seeded by '++'
            _, pred = kmeans2(emb, k, minit="++", rng=rng)
        scores.append(nmi(pred, seg))
    if not scores:
        raise ValueError("ssc: no image has two or more segments")
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------------------------
# LPC, eRank, trajectories
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def lpc(
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    lpips_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rhos: Sequence[float] = (0.1, 0.5, 1.0, 2.0),
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Latent perceptual continuity: LPIPS between ``D(z +- eps u)`` and ``D(z)``, ``eps = rho |z|``.

    ``u`` is a random unit direction per latent (same for all ``rho``); both signs are averaged. The score is the
    ``1/rho``-weighted mean over ``rhos`` (weights normalised to sum to 1).

    Args:
        decode_fn: latents ``(B, C, H, W)`` -> images ``(B, 3, h, w)`` in [0, 1].
        latents: ``(N, C, H, W)``.
        lpips_fn: ``(x, y) -> (B,)`` distances (e.g. :class:`pae_fast.losses.lpips.LPIPS`).
    Returns:
        ``{"lpc": score, "per_rho": {rho: mean LPIPS}}``.
    """
    check_latents(latents)
    if not rhos or any(r <= 0 for r in rhos):
        raise ValueError(f"lpc: rhos must be positive, got {rhos}")
    gen = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(rhos, 0.0)
    for i in range(0, latents.shape[0], batch_size):
        z = latents[i : i + batch_size].float()
        u = torch.randn(z.shape, generator=gen).to(z)
        u = u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        norm = z.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        base = decode_fn(z)
        for rho in rhos:
            eps = rho * norm
            d = lpips_fn(decode_fn(z + eps * u), base) + lpips_fn(decode_fn(z - eps * u), base)
            sums[rho] += float(d.sum()) / 2
    per_rho = {float(r): sums[r] / latents.shape[0] for r in rhos}
    wts = np.array([1 / r for r in rhos])
    wts = wts / wts.sum()
    return {"lpc": float(sum(wt * per_rho[float(r)] for wt, r in zip(wts, rhos))), "per_rho": per_rho}


def erank(latents: torch.Tensor) -> float:
    """Normalised effective rank ``exp(-sum_i p_i log p_i) / C``, ``p = sigma / sum(sigma)`` the singular values
    of each latent's token matrix ``(H*W, C)``, averaged over latents. In ``(0, 1]``; 1 = all channels used
    equally. [choice] per-latent token matrix, not centred (docs/method.md gives only the formula)."""
    check_latents(latents)
    n, c, h, w = latents.shape
    if h * w < c:
        warnings.warn(f"erank: {h * w} tokens < {c} channels, so the rank is at most {h * w}", stacklevel=2)
    out = 0.0
    for i in range(0, n, 1024):
        x = latents[i : i + 1024].double().reshape(-1, c, h * w).transpose(1, 2)  # (B, S, C)
        sv = torch.linalg.svdvals(x)
        p = sv / sv.sum(1, keepdim=True).clamp_min(1e-300)
        ent = -(p * p.clamp_min(1e-300).log()).sum(1)
        out += float((ent.exp() / c).sum())
    return out / n


def _check_traj(traj: torch.Tensor) -> torch.Tensor:
    if traj.dim() < 2 or traj.shape[0] < 2:
        raise ValueError(f"trajectories must be (T, N, ...) with T >= 2 recorded states, got {tuple(traj.shape)}")
    return traj.double().flatten(2)  # (T, N, D)


def straightness(traj: torch.Tensor) -> float:
    """Mean cosine between successive steps ``Delta_i = x_(i+1) - x_i`` of sampler trajectories ``(T, N, ...)``
    (needs T >= 3); 1 for straight paths."""
    x = _check_traj(traj)
    if x.shape[0] < 3:
        raise ValueError(f"straightness needs at least 3 recorded states, got {x.shape[0]}")
    delta = x[1:] - x[:-1]
    return float(torch.nn.functional.cosine_similarity(delta[1:], delta[:-1], dim=-1).mean())


def efficiency(traj: torch.Tensor) -> float:
    """Path efficiency ``|x_end - x_start| / sum_i |Delta_i|`` per trajectory, averaged; 1 for straight paths."""
    x = _check_traj(traj)
    length = (x[1:] - x[:-1]).norm(dim=-1).sum(0)
    return float(((x[-1] - x[0]).norm(dim=-1) / length.clamp_min(1e-300)).mean())

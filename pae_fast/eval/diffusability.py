"""Latent diffusability metrics (docs/method.md § Diffusability metrics): VIV and its time profile, LNC, GSQ, SEC,
LDS and CDS. PAE's further diagnostics (SSC, LPC, eRank) and the trajectory measures are in
:mod:`pae_fast.eval.diagnostics`.

Latents are ``(N, C, H, W)``, labels ``(N,)``. Unless a metric says otherwise it reads the latents as given; the
suite (:func:`pae_fast.eval.report.diffusability_metrics`) first standardises each channel over ``(N, H, W)`` -- the
space the generator diffuses in -- and runs every metric there.

VIV, the velocity irreducible variance (seed 004), is the Bayes floor of the flow-matching loss when each class is
a Gaussian: for ``x1 ~ N(0, diag(lam))`` and ``x0 ~ N(0, I)`` on the path ``x_t = t x1 + (1 - t) x0`` the best
velocity predictor leaves ``Var(v | x_t) = lam / ((1 - t)^2 + t^2 lam)`` per eigen-direction, whose integral over
``t in [0, 1]`` is ``(pi / 2) sqrt(lam)``. The per-class covariance is estimated as a Kronecker product
``Sigma_spatial (x) Sigma_channel`` by flip-flop maximum likelihood, batched over classes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "check_latents",
    "standardize",
    "VIVSpectra",
    "viv_spectra",
    "viv",
    "viv_profile",
    "lnc",
    "gsq",
    "sec",
    "sec_from_energy",
    "dct_energy_spectrum",
    "cosine_distance_profile",
    "lds",
    "cds",
    "lds_from_profile",
    "cds_from_profile",
]


def check_latents(latents: torch.Tensor, labels: torch.Tensor | None = None, what: str = "latents") -> None:
    """Raise a ``ValueError`` naming the problem unless ``latents`` is ``(N, C, H, W)`` and ``labels`` ``(N,)``."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
        shape = tuple(latents.shape) if hasattr(latents, "shape") else type(latents).__name__
        raise ValueError(f"{what} must be a (N, C, H, W) tensor, got {shape}")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != latents.shape[0]):
        raise ValueError(f"labels must be ({latents.shape[0]},) to match {what}, got {tuple(labels.shape)}")


def standardize(latents: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-channel standardisation over ``(N, H, W)``: ``(N, C, H, W)`` float32.

    The statistics are :func:`pae_fast.data.latent_stats.compute_latent_stats` (``"channel"`` mode, float64 sums
    over chunks of latents), so this is the same standardisation generator training applies.
    """
    from pae_fast.data.latent_stats import compute_latent_stats

    check_latents(latents)
    stats = compute_latent_stats((latents[i : i + chunk] for i in range(0, latents.shape[0], chunk)), "channel")
    return stats.normalize(latents.float())


# ----------------------------------------------------------------------------------------------------------------
# VIV
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VIVSpectra:
    """Per-class eigenvalues of the Kronecker covariance estimate.

    Attributes:
        eigenvalues: ``(K, C*H*W)`` float64, each row rescaled to sum to the class's total variance.
        classes: ``(K,)`` the class label of each row.
        total_variance: ``(K,)`` the population total variance ``sum_d Var(z_d)`` of each class.
    """

    eigenvalues: torch.Tensor
    classes: torch.Tensor
    total_variance: torch.Tensor

    def viv_per_class(self) -> torch.Tensor:
        """``(K,)``: ``(pi / 2) mean_i sqrt(lam_i)``."""
        return math.pi / 2 * self.eigenvalues.clamp_min(0).sqrt().mean(1)

    def viv(self) -> float:
        """VIV: the mean of :meth:`viv_per_class` over classes."""
        return float(self.viv_per_class().mean())

    def profile(self, ts: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
        """``I(t) = mean_k mean_i lam_i / ((1 - t)^2 + t^2 lam_i)`` at each ``t``; its integral over [0, 1] is VIV."""
        lam = self.eigenvalues.clamp_min(0).float()  # (K, D); float32 is ample for a curve
        out = []
        for t in np.asarray(ts, dtype=np.float64):
            den = (1 - t) ** 2 + t**2 * lam  # 0 only for lam = 0 at t = 1, whose limit contributes 0
            out.append(float(torch.where(den > 0, lam / den.clamp_min(1e-30), 0.0).mean(dtype=torch.float64)))
        return np.array(out)


def _chol_inv(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """``L^-1`` of a batch of SPD matrices ``cov + ridge * tr/d * I = L L^T``: ``(K, d, d)`` float64."""
    d = cov.shape[-1]
    scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    reg = cov + (ridge * scale)[:, None, None] * torch.eye(d, dtype=cov.dtype, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(reg)
    if bool((info > 0).any()):  # extremely ill-conditioned: fall back to a larger ridge
        reg = cov + (1e-3 * scale)[:, None, None] * torch.eye(d, dtype=cov.dtype, device=cov.device)
        chol = torch.linalg.cholesky(reg)
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device).expand_as(chol)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def _flip_flop(x: torch.Tensor, n: torch.Tensor, iters: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Kronecker (matrix-normal) MLE of a batch of classes.

    Args:
        x: ``(K, M, C, S)`` class-centred samples, zero rows as padding.
        n: ``(K,)`` real sample counts.
    Returns:
        ``Sigma_C (K, C, C)``, ``Sigma_S (K, S, S)`` in float64 (``Sigma_C`` normalised to trace C).
    """
    k, m, c, s = x.shape
    nd = n.to(torch.float64)
    rows_c = x.permute(0, 2, 1, 3).reshape(k, c, m * s)  # channel view: M*S samples of C channels
    sigma_s = None
    sigma_c = None
    for _ in range(iters):
        # channel covariance from spatially whitened data (whitening by L_S^-T: Y Y^T = X Sigma_S^-1 X^T)
        if sigma_s is None:
            y = rows_c
        else:
            w_s = _chol_inv(sigma_s, ridge).to(x.dtype).transpose(1, 2)  # (K, S, S)
            y = torch.bmm(x.reshape(k, m * c, s), w_s).view(k, m, c, s).permute(0, 2, 1, 3).reshape(k, c, m * s)
        sigma_c = torch.bmm(y, y.transpose(1, 2)).double() / (nd * s)[:, None, None]
        sigma_c = sigma_c * (c / sigma_c.diagonal(dim1=1, dim2=2).sum(-1))[:, None, None]  # fix the scale
        # spatial covariance from channel-whitened data: rows are the M*C samples of S positions
        w_c = _chol_inv(sigma_c, ridge).to(x.dtype)  # (K, C, C)
        y = torch.bmm(w_c, rows_c).view(k, c, m, s).reshape(k, c * m, s)
        sigma_s = torch.bmm(y.transpose(1, 2), y).double() / (nd * c)[:, None, None]
    return sigma_c, sigma_s


def viv_spectra(
    latents: torch.Tensor,
    labels: torch.Tensor,
    iters: int = 5,
    max_per_class: int | None = None,
    standardized: bool = False,
    ridge: float = 1e-6,
    max_chunk_elems: int = 1 << 25,
) -> VIVSpectra:
    """Per-class Kronecker covariance spectra, the work behind :func:`viv` and :func:`viv_profile`.

    Steps (docs/method.md § Diffusability metrics): (1) standardise each channel over all latents; (2) per class,
    total variance ``v = sum_d Var(z_d)`` and centring by the class mean; (3) ``iters`` flip-flop iterations
    (channel covariance from spatially whitened data, then spatial covariance from channel-whitened data);
    (4) ``lam`` = all products ``e_C,i * e_S,j``; (5) ``lam`` rescaled to sum to ``v``.

    Args:
        latents: ``(N, C, H, W)``.
        labels: ``(N,)`` integer classes; classes with fewer than 2 latents are left out.
        iters: flip-flop iterations.
        max_per_class: use at most the first this-many latents of each class (e.g. 50 as the paper).
        standardized: the latents are already standardised (skip step 1).
        ridge: relative ridge on each covariance before whitening (for classes with few samples).
        max_chunk_elems: classes are processed in chunks of about this many latent elements.
    """
    check_latents(latents, labels)
    if iters < 1:
        raise ValueError(f"viv: iters must be >= 1, got {iters}")
    z = latents.float() if standardized else standardize(latents)
    _, c, h, w = z.shape
    s = h * w
    labels = labels.long().to(z.device)
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    if max_per_class is not None:
        counts = counts.clamp_max(max_per_class)
    keep = counts >= 2
    if not bool(keep.all()):
        warnings.warn(f"viv: {int((~keep).sum())} classes have fewer than 2 latents and are left out", stacklevel=2)
    classes, counts, starts = classes[keep], counts[keep], starts[keep]
    if classes.numel() == 0:
        raise ValueError("viv: no class has at least 2 latents")
    if int(counts.min()) * c < s:
        warnings.warn(
            f"viv: a class has {int(counts.min())} latents x {c} channels < {s} positions, so its spatial covariance "
            "is rank-deficient and held up by the ridge: VIV is biased low; use more latents per class",
            stacklevel=2,
        )
    by_size = torch.argsort(counts, descending=True)  # similar counts share a chunk: little padding
    eig_rows, var_rows, class_rows = [], [], []
    i = 0
    while i < len(by_size):
        m = int(counts[by_size[i]])
        kc = max(1, max_chunk_elems // (m * c * s))
        sel = by_size[i : i + kc]
        i += kc
        x = z.new_zeros(len(sel), m, c, s)
        for j, cls in enumerate(sel.tolist()):
            idx = order[starts[cls] : starts[cls] + counts[cls]]
            x[j, : len(idx)] = z[idx].view(len(idx), c, s)
        n = counts[sel].to(z.device)
        mask = (torch.arange(m, device=z.device)[None] < n[:, None]).to(x.dtype)[:, :, None, None]
        x = (x - x.sum(1, keepdim=True) / n.to(x.dtype)[:, None, None, None]) * mask  # centre, keep padding at 0
        v = x.double().pow(2).sum((1, 2, 3)) / n.double()  # population total variance
        sigma_c, sigma_s = _flip_flop(x, n, iters, ridge)
        e_c = torch.linalg.eigvalsh(sigma_c).clamp_min(0)
        e_s = torch.linalg.eigvalsh(sigma_s).clamp_min(0)
        lam = (e_c[:, :, None] * e_s[:, None, :]).flatten(1)  # (k, C*S)
        lam = lam * (v / lam.sum(1).clamp_min(1e-300))[:, None]
        eig_rows.append(lam.cpu())
        var_rows.append(v.cpu())
        class_rows.append(classes[sel].cpu())
    cls_all = torch.cat(class_rows)
    back = torch.argsort(cls_all)
    return VIVSpectra(torch.cat(eig_rows)[back], cls_all[back], torch.cat(var_rows)[back])


def viv(latents: torch.Tensor, labels: torch.Tensor, iters: int = 5, max_per_class: int | None = None) -> float:
    """Velocity irreducible variance: ``mean_k (pi / 2) mean_i sqrt(lam_k,i)`` (docs/method.md § Diffusability metrics).

    Bounded by ``pi / 2``; for isotropic within-class variance ``v`` (after standardisation) it is ``(pi/2) sqrt(v)``.
    """
    return viv_spectra(latents, labels, iters=iters, max_per_class=max_per_class).viv()


def viv_profile(
    latents: torch.Tensor,
    labels: torch.Tensor,
    ts: Sequence[float] | np.ndarray | torch.Tensor,
    iters: int = 5,
    max_per_class: int | None = None,
) -> np.ndarray:
    """Time profile of VIV: ``I(t) = mean_k mean_i lam_i / ((1 - t)^2 + t^2 lam_i)`` (t = 1 is data).

    Normalised like VIV (mean over eigen-directions and classes), so ``integral_0^1 I(t) dt = VIV``.
    """
    return viv_spectra(latents, labels, iters=iters, max_per_class=max_per_class).profile(ts)


# ----------------------------------------------------------------------------------------------------------------
# Neighbourhood metrics: LNC and GSQ
# ----------------------------------------------------------------------------------------------------------------


def _knn_label_agreement(feats: torch.Tensor, labels: torch.Tensor, k: int, chunk: int = 1024) -> float:
    """Mean fraction of each row's k nearest other rows (cosine) that share its label."""
    n = feats.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k-NN needs 1 <= k < N; got k={k}, N={n}")
    f = torch.nn.functional.normalize(feats.float(), dim=1)
    labels = labels.long().to(f.device)
    hits = 0.0
    for i in range(0, n, chunk):
        sim = f[i : i + chunk] @ f.t()
        rows = torch.arange(i, min(i + chunk, n), device=f.device)
        sim[rows - i, rows] = -float("inf")  # exclude self
        nn_idx = sim.topk(k, dim=1).indices
        hits += float((labels[nn_idx] == labels[rows, None]).double().sum())
    return hits / (n * k)


def lnc(latents: torch.Tensor, labels: torch.Tensor, k: int = 10) -> float:
    """Latent neighbourhood consistency: fraction of each latent's ``k`` nearest neighbours (cosine of the
    token-mean-pooled latents) with the same label, averaged over latents."""
    check_latents(latents, labels)
    return _knn_label_agreement(latents.float().mean((2, 3)), labels, k)


def gsq(latents: torch.Tensor, labels: torch.Tensor) -> float:
    """Global semantic quality: 1-NN label purity of pooled, centred, l2-normalised latents."""
    check_latents(latents, labels)
    pooled = latents.float().mean((2, 3))
    return _knn_label_agreement(pooled - pooled.mean(0), labels, 1)


# ----------------------------------------------------------------------------------------------------------------
# Spectral and spatial structure: SEC, LDS, CDS
# ----------------------------------------------------------------------------------------------------------------


def dct_energy_spectrum(latents: torch.Tensor, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """DCT energy per channel and per Manhattan frequency.

    Args:
        latents: ``(N, C, H, W)``.
    Returns:
        ``energy (C, H + W - 1)``: summed squared orthonormal 2-D DCT-II coefficients of frequency ``u + v = f``
        over all latents; and ``count (H + W - 1,)`` coefficients per frequency.
    """
    from scipy.fft import dctn

    check_latents(latents)
    _, c, h, w = latents.shape
    freq = (np.arange(h)[:, None] + np.arange(w)[None, :]).ravel()
    nf = h + w - 1
    energy = np.zeros((c, nf))
    for i in range(0, latents.shape[0], chunk):
        x = latents[i : i + chunk].detach().cpu().double().numpy()
        e = (dctn(x, type=2, axes=(-2, -1), norm="ortho") ** 2).sum(0).reshape(c, h * w)  # (C, H*W)
        for ch in range(c):
            energy[ch] += np.bincount(freq, weights=e[ch], minlength=nf)
    return energy, np.bincount(freq, minlength=nf)


def sec(latents: torch.Tensor, rho: float = 0.5) -> float:
    """Spectral energy concentration: the fraction of DCT energy above Manhattan frequency ``rho (H-1 + W-1)``.

    Per channel (energy summed over latents), then averaged over channels. White noise on 16x16 at
    ``rho = 0.5`` gives 120/256 = 0.469; spatially smooth latents give less.
    """
    return sec_from_energy(dct_energy_spectrum(latents)[0], *latents.shape[-2:], rho=rho)


def sec_from_energy(energy: np.ndarray, h: int, w: int, rho: float = 0.5) -> float:
    """SEC from :func:`dct_energy_spectrum`'s ``energy (C, H + W - 1)`` of an ``h x w`` grid."""
    if not 0 <= rho <= 1:
        raise ValueError(f"sec: rho must be in [0, 1], got {rho}")
    cut = rho * (h - 1 + w - 1)
    high = energy[:, np.arange(energy.shape[1]) > cut].sum(1)
    total = energy.sum(1)
    valid = total > 0
    if not valid.any():
        raise ValueError("sec: the latents have no energy (all zero)")
    return float((high[valid] / total[valid]).mean())


def cosine_distance_profile(latents: torch.Tensor, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Mean cosine similarity between tokens as a function of their Manhattan grid distance.

    Args:
        latents: ``(N, C, H, W)``; tokens are the ``C``-vectors at each position, l2-normalised.
    Returns:
        ``d (H + W - 1,)`` distances ``0..H-1+W-1`` and ``cos (H + W - 1,)`` the mean over latents and pairs.
    """
    check_latents(latents)
    n, c, h, w = latents.shape
    s = h * w
    gram = torch.zeros(s, s, dtype=torch.float64, device=latents.device)
    for i in range(0, n, chunk):
        t = torch.nn.functional.normalize(latents[i : i + chunk].float().reshape(-1, c, s), dim=1)  # (B, C, S)
        t = t.permute(2, 0, 1).reshape(s, -1)  # (S, B*C)
        gram += (t @ t.t()).double()
    gram = gram.cpu() / n
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1)
    dist = (pos[:, None] - pos[None]).abs().sum(-1).flatten()
    nd = h + w - 1
    sums = torch.bincount(dist, weights=gram.flatten(), minlength=nd)
    counts = torch.bincount(dist, minlength=nd)
    return np.arange(nd), (sums / counts.clamp_min(1)).numpy()


def lds_from_profile(d: np.ndarray, cos: np.ndarray, h: int, w: int, far: int = 6) -> float:
    """LDS from :func:`cosine_distance_profile` output of an ``h x w`` grid (far distances weighted by pair count)."""
    if d[-1] < far:
        raise ValueError(f"lds needs grid distances >= {far}; a {h}x{w} grid reaches only {d[-1]}")
    counts = _pair_counts(h, w)
    far_mask = d >= far
    return float(cos[1] - (cos[far_mask] * counts[far_mask]).sum() / counts[far_mask].sum())


def _pair_counts(h: int, w: int) -> np.ndarray:
    dy = np.abs(np.arange(h)[:, None] - np.arange(h)[None]).ravel()
    dx = np.abs(np.arange(w)[:, None] - np.arange(w)[None]).ravel()
    return np.bincount((dy[:, None] + dx[None]).ravel(), minlength=h + w - 1).astype(np.float64)


def cds_from_profile(d: np.ndarray, cos: np.ndarray, max_d: int = 8) -> float:
    """CDS from :func:`cosine_distance_profile` output: minus the slope of ``cos`` over ``d = 1..max_d``."""
    sel = (d >= 1) & (d <= max_d)
    if sel.sum() < 2:
        raise ValueError("cds needs grid distances 1 and 2 at least")
    slope = np.polyfit(d[sel].astype(np.float64), cos[sel], 1)[0]
    return float(-slope)


def lds(latents: torch.Tensor, far: int = 6) -> float:
    """Local dependency strength: mean token cosine at grid distance 1 minus the mean at distances ``>= far``."""
    d, cos = cosine_distance_profile(latents)
    return lds_from_profile(d, cos, *latents.shape[-2:], far=far)


def cds(latents: torch.Tensor, max_d: int = 8) -> float:
    """Correlation decay speed: minus the least-squares slope of mean token cosine vs grid distance ``1..max_d``."""
    d, cos = cosine_distance_profile(latents)
    return cds_from_profile(d, cos, max_d)

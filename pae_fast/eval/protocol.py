"""Inception Score and precision/recall arithmetic under the two published evaluation protocols (docs/method.md
§Evaluation protocols).

- ``"adm"`` (guided-diffusion ``evaluations/evaluator.py``, the protocol of the ImageNet tables we compare with):
  IS over consecutive chunks of 5,000 images in the given order (``ceil(N / 5000)`` splits, the last one smaller);
  k-NN squared distances computed in float16 per 10,000 x 10,000 block, recomputed in float32 only for a block
  whose float16 result is not finite.
- ``"torch-fidelity"``: IS over ``splits`` parts with boundaries ``floor(i·N / splits)`` after a permutation drawn
  from ``numpy.random.RandomState(2020)``; Euclidean k-NN distances in float32.

The features come from the same Inception network either way; only this arithmetic differs.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "ADM_IS_SPLIT_SIZE",
    "ADM_BLOCK",
    "TORCH_FIDELITY_SEED",
    "is_split_bounds",
    "inception_score",
    "pairwise_sq_dists",
    "precision_recall",
]

Protocol = Literal["adm", "torch-fidelity"]
PROTOCOLS: tuple[str, ...] = ("adm", "torch-fidelity")
ADM_IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score(split_size=5000)
ADM_BLOCK = 10_000  # ADM's ManifoldEstimator row/column batch size (the float16 fallback is decided per block)
TORCH_FIDELITY_SEED = 2020  # torch-fidelity's default rng_seed for the IS shuffle


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def is_split_bounds(n: int, protocol: Protocol = "adm", splits: int = 10) -> list[tuple[int, int]]:
    """``[(begin, end), ...]`` of the IS splits of ``n`` images.

    Args:
        n: number of images (>= 1).
        protocol: ``"adm"``: consecutive chunks of 5,000 (the last smaller); ``"torch-fidelity"``: ``splits`` parts
            ``[floor(i·n / splits), floor((i + 1)·n / splits))``.
        splits: number of parts (torch-fidelity only), in [1, n].
    """
    _check_protocol(protocol)
    if n < 1:
        raise ValueError(f"inception_score needs at least one image, got {n}")
    if protocol == "adm":
        return [(b, min(b + ADM_IS_SPLIT_SIZE, n)) for b in range(0, n, ADM_IS_SPLIT_SIZE)]
    if not 1 <= splits <= n:
        raise ValueError(f"inception_score: eval.is_splits must be in [1, N={n}], got {splits}")
    return [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]


def inception_score(logits: Any, protocol: Protocol = "adm", splits: int = 10) -> float:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``, averaged over the protocol's splits.

    The softmax is taken in float64 from the logits. Terms with ``p(y|x) = 0`` (a saturated softmax, or a logit of
    ``-inf``) contribute ``0·log 0 = 0``, the limit in the definition (Salimans et al., 2016): n samples that put all
    mass on k equally used classes score k. ADM's code takes ``log`` of float32 probabilities and would give NaN
    for such exact zeros; it agrees with this value wherever it is finite.

    Args:
        logits: ``(N, K)`` class logits; ``+inf`` or NaN entries are rejected.
        protocol: ``"adm"`` or ``"torch-fidelity"`` (order, shuffle and split sizes, see :func:`is_split_bounds`).
        splits: number of splits for ``"torch-fidelity"`` (ignored by ``"adm"``, which uses 5,000-image chunks).

    Returns:
        the mean IS over the splits.
    """
    x = (
        logits.detach().cpu().double()
        if isinstance(logits, torch.Tensor)
        else torch.as_tensor(np.asarray(logits, dtype=np.float64))
    )
    if x.dim() != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(x.shape)}")
    if torch.isnan(x).any() or torch.isposinf(x).any():
        raise ValueError("inception_score: logits contain NaN or +inf; the class posterior is undefined")
    bounds = is_split_bounds(x.shape[0], protocol, splits)
    if protocol == "torch-fidelity":
        perm = np.random.RandomState(TORCH_FIDELITY_SEED).permutation(x.shape[0])
        x = x[torch.from_numpy(perm)]
    logp = torch.log_softmax(x, dim=1)
    scores = []
    for b, e in bounds:
        part = logp[b:e]
        log_marginal = torch.logsumexp(part, dim=0) - math.log(e - b)  # log mean_x p(y|x)
        p = part.exp()
        terms = torch.where(p > 0, p * (part - log_marginal), torch.zeros_like(p))  # 0·log 0 = 0
        scores.append(float(terms.sum(1).mean().exp()))
    return float(np.mean(scores))


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``max(|a|² − 2·a·bᵀ + |b|², 0)`` in ``dtype`` (ADM's distance block), returned as float32.

    In float16 the inputs, the elementwise squares, the two reductions and each elementwise step are rounded to
    float16; the reductions (row norms, the matrix product) accumulate in float32 before their rounding, as
    TensorFlow's float16 GPU kernels that ADM ran on do. That makes the result independent of the device here.

    Args:
        a: ``(M, D)``; b: ``(N, D)``; dtype: ``torch.float16`` or ``torch.float32``.
    Returns:
        ``(M, N)`` float32 (inf where the float16 arithmetic overflowed).
    """
    a, b = a.to(dtype), b.to(dtype)
    na = (a * a).float().sum(1, keepdim=True).to(dtype)
    nb = (b * b).float().sum(1)[None].to(dtype)
    ab = (a.float() @ b.float().t()).to(dtype)
    d = na - 2 * ab + nb
    return torch.clamp_min(d, 0).float()


def _adm_block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = pairwise_sq_dists(a, b, torch.float16)
    if not torch.isfinite(d).all():  # ADM: the whole block again in float32
        d = pairwise_sq_dists(a, b, torch.float32)
    return d


def _block_dists(protocol: Protocol, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if protocol == "adm":
        return _adm_block(a, b)
    return torch.cdist(a, b)  # torch-fidelity: Euclidean distances in float32


def _radii(protocol: Protocol, x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (the (k+1)-th smallest counts itself), ``(N,)``."""
    if x.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors per set, got {x.shape[0]}")
    out = []
    for i in range(0, len(x), block):
        # the k+1 smallest of each column block, then of their union: the same k-th value as over the full row
        best = torch.cat(
            [
                _block_dists(protocol, x[i : i + block], x[j : j + block])
                .topk(min(k + 1, len(x[j : j + block])), dim=1, largest=False)
                .values
                for j in range(0, len(x), block)
            ],
            dim=1,
        )
        out.append(best.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _inside(
    protocol: Protocol, query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, block: int
) -> torch.Tensor:
    """For each query row: inside some reference ball (``dist <= radius``)?"""
    out = []
    for i in range(0, len(query), block):
        hit = torch.zeros(len(query[i : i + block]), dtype=torch.bool, device=query.device)
        for j in range(0, len(ref), block):
            d = _block_dists(protocol, query[i : i + block], ref[j : j + block])
            hit |= (d <= radii[None, j : j + block]).any(1)
        out.append(hit)
    return torch.cat(out)


def _f32(x: Any, device: str | torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)


def precision_recall(
    real: Any,
    fake: Any,
    k: int = 3,
    protocol: Protocol = "adm",
    block: int = ADM_BLOCK,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN hypersphere manifolds.

    Precision = fraction of ``fake`` inside the real manifold; recall = fraction of ``real`` inside the fake one.
    ``"adm"`` compares squared distances computed in float16 per ``block x block`` tile (float32 for a tile that
    overflows); ``"torch-fidelity"`` compares float32 Euclidean distances.

    Args:
        real: ``(N1, D)`` reference features.
        fake: ``(N2, D)`` sample features.
        k: neighbourhood size (3 in both protocols).
        protocol: ``"adm"`` or ``"torch-fidelity"``.
        block: tile size (ADM: 10,000; the float16 fallback is decided per tile, so keep it for ADM's numbers).
        device: where to compute.
    """
    _check_protocol(protocol)
    r, f = _f32(real, device), _f32(fake, device)
    if r.dim() != 2 or f.dim() != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(
            f"precision_recall: expected (N1, D) and (N2, D) features, got {tuple(r.shape)}, {tuple(f.shape)}"
        )
    if block < 1:
        raise ValueError(f"precision_recall: block must be >= 1, got {block}")
    r_radii, f_radii = _radii(protocol, r, k, block), _radii(protocol, f, k, block)
    precision = _inside(protocol, f, r, r_radii, block).double().mean()
    recall = _inside(protocol, r, f, f_radii, block).double().mean()
    return float(precision), float(recall)

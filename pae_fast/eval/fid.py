"""Generation metrics (docs/method.md § Evaluation protocol): FID, sFID, Inception Score, precision/recall, FD in
DINOv2 space.

The protocol follows ADM's evaluator: Inception ``pool_3`` features for FID, the first 7 channels of
``mixed_6/conv`` for sFID, softmax of ``pool_3 @ W`` over 1008 classes for IS, k-NN manifolds with k = 3 for
precision/recall (Kynkäänniemi et al., 2019). The IS splits and the precision of the k-NN distances follow
``eval.protocol`` (:mod:`pae_fast.eval.protocol`: ADM's by default, or torch-fidelity's). FD_DINOv2 uses the CLS token
of a DINOv2 ViT-L/14 at 224 px (bicubic resize, ImageNet normalisation), as in Stein et al. (2023).

    from pae_fast.eval.fid import evaluate_generation
    metrics = evaluate_generation("samples.npz", "VIRTUAL_imagenet256_labeled.npz", inception_weights="pt_incep.pth")
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pae_fast.eval.images import ImageSource, save_reference_stats
from pae_fast.eval.inception import FIDInceptionV3, load_inception, load_state_dict_file
from pae_fast.eval.protocol import PROTOCOLS, Protocol, inception_score, precision_recall

__all__ = [
    "frechet_distance",
    "frechet_distance_features",
    "feature_statistics",
    "PROTOCOLS",
    "inception_score",
    "precision_recall",
    "DINOv2Features",
    "load_dino",
    "extract_features",
    "evaluate_generation",
    "resolve_device",
]


_STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s"), "dino": ("mu_dino", "sigma_dino")}
_METRIC_NAMES = {"pool": "fid", "spatial": "sfid", "dino": "fd_dinov2"}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _f64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between two Gaussians, ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``tr((S1 S2)^(1/2)) = sum_i sqrt(eig_i(F^T S2 F))`` for any factor ``S1 = F F^T``: ``F^T S2 F`` is symmetric
    PSD with the eigenvalues of ``S1 S2`` (the same as ``sqrt(S1) S2 sqrt(S1)``). ``F`` is the Cholesky factor of
    ``S1``; a singular covariance that does not factor gets the smallest ridge that lets it (``1e-14 tr(S1) / D``
    and up). Then one symmetric eigenvalue solve in float64: no general ``sqrtm``, no complex parts, about a third
    of the cost of an eigen-decomposition of ``sqrt(S1)``, and on rank-deficient covariances closer to the exact
    sample-space value (:func:`frechet_distance_features`) than ``scipy.linalg.sqrtm``.

    Args:
        mu1, mu2: ``(D,)`` means (numpy or torch).
        sigma1, sigma2: ``(D, D)`` covariances.
    Returns:
        The distance (float, >= 0 up to rounding).
    """
    mu1, mu2 = np.atleast_1d(_f64(mu1)), np.atleast_1d(_f64(mu2))
    s1, s2 = np.atleast_2d(_f64(sigma1)), np.atleast_2d(_f64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"frechet_distance: shapes do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, "
            f"sigma1 {s1.shape}, sigma2 {s2.shape} (expected (D,) and (D, D))"
        )
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    f = _psd_factor(s1)
    m = f.T @ s2 @ f
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _psd_factor(s: np.ndarray) -> np.ndarray:
    """``F`` with ``F F^T = S`` (up to a tiny ridge): Cholesky, or the eigen-square-root as the last resort."""
    d = s.shape[0]
    scale = max(np.trace(s) / d, np.finfo(np.float64).tiny)
    for rel in (0.0, 1e-14, 1e-12, 1e-10, 1e-8):
        try:
            return np.linalg.cholesky(s + rel * scale * np.eye(d))
        except np.linalg.LinAlgError:
            continue
    e, v = np.linalg.eigh(s)
    return v * np.sqrt(np.clip(e, 0, None))


def frechet_distance_features(feats1: Any, feats2: Any) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets ``(N1, D)``, ``(N2, D)``.

    When both sets are no larger than ``D`` (covariances of rank < D, e.g. quick checks on a few hundred images)
    the trace term is computed exactly in sample space: with centred features ``A``, ``B``,
    ``tr((S1 S2)^(1/2)) = ||A B^T||_* / sqrt((N1 - 1)(N2 - 1))`` (the non-zero eigenvalues of ``A^T A B^T B`` are
    the squared singular values of ``A B^T``), at ``O(N1 N2 D)`` instead of ``O(D^3)``. Larger sets go through
    :func:`frechet_distance` on their statistics.
    """
    a, b = _f64(feats1), _f64(feats2)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"expected two (N, D) feature sets with N >= 2 and one D, got {a.shape}, {b.shape}")
    if max(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    mu1, mu2 = a.mean(0), b.mean(0)
    a, b = a - mu1, b - mu2
    c1, c2 = len(a) - 1, len(b) - 1
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() / c1 + (b * b).sum() / c2 - 2 * tr_covmean)


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features, float64 (as ADM)."""
    x = _f64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


# ----------------------------------------------------------------------------------------------------------------
# DINOv2 features (FD_DINOv2)
# ----------------------------------------------------------------------------------------------------------------


class DINOv2Features(nn.Module):
    """CLS features of a timm DINOv2 ViT: bicubic resize to ``input_size``, model mean/std, ``(B, D)`` out.

    Args:
        model: a timm ViT built with ``num_classes=0`` (its forward returns the pooled CLS token).
        input_size: resize target (224 as in Stein et al.; must be a multiple of the patch size).
    """

    def __init__(self, model: nn.Module, input_size: int = 224) -> None:
        super().__init__()
        self.model = model
        self.input_size = input_size
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 or float in [0, 1] -> ``(B, D)``."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bicubic", align_corners=False).clamp(0, 1)
        return self.model((x - self.mean) / self.std)


def load_dino(
    model_name: str = "vit_large_patch14_dinov2.lvd142m",
    weights: str | os.PathLike | None = None,
    input_size: int = 224,
    device: str | torch.device = "cpu",
    allow_random: bool = False,
    **model_kwargs: Any,
) -> DINOv2Features:
    """A DINOv2 feature extractor from timm (``pretrained=False``) with weights from a local file.

    Accepts timm-format state dicts and the original DINOv2 release format (converted by timm's checkpoint filter,
    which also resamples the position embedding to ``input_size``).

    Args:
        model_name: timm model name.
        weights: local safetensors/.pth; required unless ``allow_random`` (tests).
        input_size: image size fed to the ViT.
        **model_kwargs: forwarded to ``timm.create_model`` (e.g. a tiny ``depth``/``embed_dim`` in tests).
    """
    import timm

    if weights is None and not allow_random:
        raise FileNotFoundError(f"FD_DINOv2 needs local weights for {model_name}: set eval.dino_weights")
    model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=input_size, **model_kwargs)
    if weights is not None:
        sd = load_state_dict_file(weights, "DINOv2 weights")
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            sd = filter_fn(sd, model)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        result = model.load_state_dict(sd, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"DINOv2 weights {weights} do not fit {model_name}: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
    return DINOv2Features(model, input_size).eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction and the full evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    batches: Iterable[torch.Tensor],
    inception: FIDInceptionV3 | None = None,
    dino: DINOv2Features | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    check_stop: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
    """Features of image batches.

    Args:
        batches: ``(B, 3, H, W)`` tensors, uint8 or float in [0, 1].
        inception: gives ``pool (N, 2048)``, ``logits (N, 1008)``, ``spatial (N, 2023)``.
        dino: gives ``dino (N, D)``.
        check_stop: called before each batch; it raises to stop (the command's SIGTERM / SIGINT check).
    Returns:
        float32 numpy arrays by name.
    """
    out: dict[str, list[np.ndarray]] = {}
    from pae_fast.progress import progress as report

    for batch in report(batches, "features", enabled=progress, unit="batch"):
        if check_stop is not None:
            check_stop()
        x = batch.to(device)
        feats: dict[str, torch.Tensor] = {}
        if inception is not None:
            feats.update(inception(x))
        if dino is not None:
            feats["dino"] = dino(x)
        for k, v in feats.items():
            out.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def evaluate_generation(
    samples: str | os.PathLike | np.ndarray | torch.Tensor,
    reference: str | os.PathLike | np.ndarray | torch.Tensor,
    inception_weights: str | os.PathLike | None = None,
    inception: FIDInceptionV3 | None = None,
    dino: DINOv2Features | None = None,
    batch_size: int = 64,
    inception_size: int = 299,
    is_splits: int = 10,
    knn_k: int = 3,
    protocol: Protocol = "adm",
    device: str | torch.device = "auto",
    progress: bool = False,
    reference_stats_out: str | os.PathLike | None = None,
    reference_stats_images: bool = False,
    check_stop: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """FID, sFID, IS, precision, recall (and FD_DINOv2 with ``dino``) of samples against a reference.

    Args:
        samples: ADM npz, image folder, uint8 ``(N, H, W, 3)`` array or ``(N, 3, H, W)`` tensor.
        reference: the same kinds; a reference npz with ``mu``/``sigma`` (and ``mu_s``/``sigma_s``,
            ``mu_dino``/``sigma_dino``) uses those statistics; precision/recall need its images (``arr_0``).
        inception_weights: local FID Inception weights (or pass a loaded ``inception``).
        is_splits: IS splits of the ``"torch-fidelity"`` protocol (ADM uses 5,000-image chunks).
        protocol: ``"adm"`` or ``"torch-fidelity"``: IS splits and shuffle, k-NN distance precision
            (:mod:`pae_fast.eval.protocol`).
        reference_stats_out: write the reference statistics (ADM keys) to this npz for reuse.
        reference_stats_images: also embed the reference images as ``arr_0`` in that npz, which makes it a
            reference batch ADM's evaluator reads; without them the file serves pae_fast only.
        check_stop: see :func:`extract_features`.
    Returns:
        ``{"protocol", "fid", "sfid", "is", "precision", "recall", ["fd_dinov2"], "num_samples", "num_reference",
        "reference_stats_layout"}``; metrics
        that the reference cannot support are absent and listed in ``"skipped"`` with the reason.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    dev = resolve_device(device)
    if inception is None:
        inception = load_inception(inception_weights, input_size=inception_size, device=dev)
    inception = inception.to(dev)
    dino = dino.to(dev) if dino is not None else None
    src = ImageSource(samples, "samples")
    ref = ImageSource(reference, "reference")
    if not src.has_images:
        raise ValueError(f"samples {src.name} hold no images (an npz needs arr_0)")
    fs = extract_features(src.batches(batch_size), inception, dino, dev, progress, check_stop)
    fr = extract_features(ref.batches(batch_size), inception, dino, dev, progress, check_stop) if ref.has_images else {}

    ref_stats = dict(ref.stats)  # precomputed statistics of a reference batch win over recomputing them
    for feat, (mu_key, sigma_key) in _STAT_KEYS.items():
        if feat in fr and mu_key not in ref_stats:
            ref_stats[mu_key], ref_stats[sigma_key] = feature_statistics(fr[feat])
    result: dict[str, Any] = {"protocol": protocol, "num_samples": len(src), "num_reference": len(ref), "skipped": {}}
    if reference_stats_out is not None and ref_stats:
        if reference_stats_images and not ref.has_images:
            raise ValueError(f"reference {ref.name} holds no images to embed as arr_0 (it has statistics only)")
        images = ref.read_all() if reference_stats_images else None
        save_reference_stats(reference_stats_out, ref_stats, images=images)
        result["reference_stats_layout"] = "adm" if images is not None else "pae_fast"

    result["is"] = inception_score(fs["logits"], protocol=protocol, splits=min(is_splits, len(fs["logits"])))
    for feat, (mu_key, sigma_key) in _STAT_KEYS.items():
        metric = _METRIC_NAMES[feat]
        if feat not in fs:
            continue
        if mu_key not in ref_stats:
            result["skipped"][metric] = f"reference {ref.name} has neither {mu_key}/{sigma_key} nor images"
            continue
        if fs[feat].shape[1] != np.shape(ref_stats[mu_key])[0]:
            result["skipped"][metric] = (
                f"feature sizes differ: samples {fs[feat].shape[1]}, reference {np.shape(ref_stats[mu_key])[0]} "
                f"(reference statistics computed at another input size?)"
            )
            continue
        if feat in fr and mu_key not in ref.stats:  # both feature sets at hand
            result[metric] = frechet_distance_features(fs[feat], fr[feat])
        else:
            result[metric] = frechet_distance(*feature_statistics(fs[feat]), ref_stats[mu_key], ref_stats[sigma_key])
    if "pool" in fr:
        result["precision"], result["recall"] = precision_recall(
            fr["pool"], fs["pool"], k=knn_k, protocol=protocol, device=dev
        )
    else:
        result["skipped"]["precision/recall"] = f"reference {ref.name} has no images (arr_0)"
    return result

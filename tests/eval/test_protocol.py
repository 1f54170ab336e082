"""eval.protocol: ADM's and torch-fidelity's IS splits and precision/recall arithmetic, pinned against direct
transcriptions of each definition written here in numpy (tiny class counts and feature dims keep it fast)."""

import logging

import numpy as np
import pytest
import torch

from pae_fast.eval.images import ImageSource, save_reference_stats
from pae_fast.eval.protocol import inception_score, is_split_bounds, precision_recall


def _logits(n: int, k: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, k)) * 3.0 + np.linspace(0, 2, k)  # uneven class use


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _split_score(p: np.ndarray) -> float:
    kl = p * (np.log(p) - np.log(p.mean(0, keepdims=True)))
    return float(np.exp(kl.sum(1).mean()))


def _adm_is(logits: np.ndarray) -> float:
    """ADM: consecutive chunks of 5,000, in the given order."""
    p = _softmax(logits)
    return float(np.mean([_split_score(p[i : i + 5000]) for i in range(0, len(p), 5000)]))


def _torch_fidelity_is(logits: np.ndarray, splits: int = 10) -> float:
    """torch-fidelity: RandomState(2020) permutation, parts [i·N // splits, (i + 1)·N // splits)."""
    n = len(logits)
    p = _softmax(logits[np.random.RandomState(2020).permutation(n)])
    return float(np.mean([_split_score(p[i * n // splits : (i + 1) * n // splits]) for i in range(splits)]))


@pytest.mark.parametrize("n", [50_000, 10_000, 12_345])
def test_inception_score_follows_each_protocols_splits(n):
    logits = _logits(n)
    assert inception_score(logits, protocol="adm") == pytest.approx(_adm_is(logits), rel=1e-10)
    assert inception_score(logits, protocol="torch-fidelity", splits=10) == pytest.approx(
        _torch_fidelity_is(logits), rel=1e-10
    )
    bounds = is_split_bounds(n, "adm")
    assert len(bounds) == -(-n // 5000) and bounds[-1] == ((len(bounds) - 1) * 5000, n)


def test_inception_score_adm_differs_from_ten_splits_off_50k():
    logits = _logits(10_000, seed=1)
    assert inception_score(logits, protocol="adm") != pytest.approx(
        inception_score(logits, protocol="torch-fidelity"), rel=1e-3
    )


def test_inception_score_of_a_saturated_softmax_uses_zero_log_zero():
    n, k = 300, 3
    logits = np.full((n, 10), -np.inf)
    logits[np.arange(n), np.arange(n) % k] = 0.0  # exactly one-hot posteriors over k classes
    assert inception_score(logits, protocol="adm") == pytest.approx(k, rel=1e-12)
    big = np.where(np.isinf(logits), -1e4, 1e4)  # saturated in any float format
    assert inception_score(big, protocol="adm") == pytest.approx(k, rel=1e-12)
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        inception_score(np.full((4, 3), np.inf))
    with pytest.raises(ValueError, match="eval.protocol"):
        inception_score(big, protocol="fid")


def _pr_reference(real: np.ndarray, fake: np.ndarray, k: int, dist) -> tuple[float, float]:
    """Kynkäänniemi et al.: radius = distance to the k-th nearest other point of the same set."""
    rr = np.sort(dist(real, real), axis=1)[:, k]
    fr = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = (dist(fake, real) <= rr[None]).any(1).mean()
    recall = (dist(real, fake) <= fr[None]).any(1).mean()
    return float(precision), float(recall)


def _sq16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ADM's float16 block: every result rounded to float16, the reductions accumulated in float32 first."""
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    f32, f16 = np.float32, np.float16
    with np.errstate(over="ignore"):
        na = (a16 * a16).astype(f32).sum(1, keepdims=True).astype(f16)
        nb = (b16 * b16).astype(f32).sum(1)[None].astype(f16)
        ab = (a16.astype(f32) @ b16.astype(f32).T).astype(f16)
        d = np.maximum(na - f16(2) * ab + nb, f16(0)).astype(np.float32)
    return d if np.isfinite(d).all() else _sq32(a, b)


def _sq32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return ((a[:, None, :] - b[None]) ** 2).sum(-1)


@pytest.mark.parametrize("dim", [1, 3])
def test_precision_recall_under_both_distance_precisions(dim):
    rng = np.random.default_rng(0)
    real = (rng.normal(size=(300, dim)) * 10).astype(np.float32)
    fake = (rng.normal(size=(300, dim)) * 10 + 2).astype(np.float32)
    adm = precision_recall(real, fake, k=3, protocol="adm")
    tf = precision_recall(real, fake, k=3, protocol="torch-fidelity")
    assert adm == pytest.approx(_pr_reference(real, fake, 3, _sq16), abs=0)
    assert tf == pytest.approx(_pr_reference(real, fake, 3, _sq32), abs=0)
    if dim == 1:  # on these points the precisions disagree somewhere
        assert adm != tf  # |x|² ~ 100 - 2xy + |y|²: float16 spacing 0.06 against k-NN radii ~ 0.01


def test_precision_recall_adm_falls_back_to_float32_per_block_on_overflow():
    rng = np.random.default_rng(1)
    real = (rng.normal(size=(40, 3)) * 200).astype(np.float32)  # squared norms > 65504 overflow float16
    fake = (rng.normal(size=(40, 3)) * 200 + 30).astype(np.float32)
    ref = _pr_reference(real, fake, 3, _sq32)
    assert precision_recall(real, fake, protocol="adm") == pytest.approx(ref, abs=0)
    # tiled: each tile decides on its own; the result does not depend on the tiling here
    assert precision_recall(real, fake, protocol="adm", block=7) == pytest.approx(ref, abs=0)
    assert precision_recall(real, fake, protocol="torch-fidelity", block=7) == pytest.approx(ref, abs=0)


def test_fortran_and_strided_images_are_copied_once(tmp_path, caplog):
    imgs = np.random.default_rng(2).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    fortran = np.asfortranarray(imgs)
    np.savez(tmp_path / "f.npz", arr_0=fortran)
    with caplog.at_level(logging.INFO, logger="pae_fast.eval.images"):
        src = ImageSource(tmp_path / "f.npz")
    assert "Fortran-ordered" in caplog.text
    assert np.array_equal(torch.cat(list(src.batches(2))).permute(0, 2, 3, 1).numpy(), imgs)
    strided = np.concatenate([imgs, imgs], axis=2)[:, :, ::2]  # a non-contiguous view
    with caplog.at_level(logging.INFO, logger="pae_fast.eval.images"):
        src = ImageSource(strided)
    assert "non-contiguous" in caplog.text
    assert np.array_equal(src.read_all(), strided)


def test_reference_stats_with_arr_0_are_an_adm_reference_batch(tmp_path):
    imgs = np.random.default_rng(3).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    p = save_reference_stats(tmp_path / "ref.npz", {"mu": np.zeros(2), "sigma": np.eye(2)}, images=imgs)
    with np.load(p) as f:  # ADM reads arr_0 (images) plus mu / sigma from one reference npz
        assert set(f.files) == {"arr_0", "mu", "sigma"} and np.array_equal(f["arr_0"], imgs)

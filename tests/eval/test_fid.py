"""FID / sFID / IS / precision-recall / FD_DINOv2 and the ADM npz + image-folder inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from pae_fast.eval.fid import (
    evaluate_generation,
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_features,
    inception_score,
    load_dino,
    precision_recall,
)
from pae_fast.eval.images import (
    ImageSource,
    load_image_folder,
    load_npz_arrays,
    load_npz_images,
    save_npz_images,
)
from pae_fast.eval.inception import FIDInceptionV3, load_inception, load_state_dict_file, tf1_resize_bilinear


@pytest.fixture(scope="module")
def inception() -> FIDInceptionV3:
    torch.manual_seed(0)
    return FIDInceptionV3(input_size=75).eval().requires_grad_(False)


def _images(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))  # per-image colour + noise: images differ in feature space
    return np.clip(base + rng.integers(-60, 60, (n, size, size, 3)), 0, 255).astype(np.uint8)


def _textbook_fd(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 48)) @ rng.normal(size=(48, 48))
    b = rng.normal(size=(300, 48)) @ rng.normal(size=(48, 48)) * 0.7 + 0.3
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    ref = _textbook_fd(mu1, s1, mu2, s2)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)
    # torch inputs, float32 included, give the same value
    t = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu2), torch.from_numpy(s2))
    assert t == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-6)  # symmetric


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(20, 64))  # 20 samples in 64-d: covariance of rank 19
    mu, sigma = feature_statistics(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    # near-singular but different: finite and non-negative
    mu2, sigma2 = feature_statistics(feats + rng.normal(scale=0.1, size=feats.shape))
    d = frechet_distance(mu, sigma, mu2, sigma2)
    assert np.isfinite(d) and d > 0


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_known_answers():
    k, n = 10, 1000
    logits = torch.full((n, 1008), -50.0)
    logits[torch.arange(n), torch.arange(n) % k] = 50.0  # confident, uniform over k classes (balanced per split)
    assert inception_score(logits, splits=10) == pytest.approx(k, rel=1e-6)
    same = torch.randn(1, 1008).expand(n, -1)
    assert inception_score(same, splits=10) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits[:5], protocol="torch-fidelity", splits=10)


def test_precision_recall_known_answers():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(200, 16))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # half of the samples on the real manifold, half far away: precision 1/2; the real set is still covered
    # only where samples are, so recall stays high but the far half adds nothing
    mixed = np.concatenate([real[:100], far[:100]])
    p, r = precision_recall(real, mixed)
    assert p == pytest.approx(0.5)
    assert 0.4 < r <= 1.0
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real[:3], real[:3])


def test_tf1_resize_matches_tf_legacy_bilinear():
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    y = tf1_resize_bilinear(x, 4)
    # TF-1 (align_corners=False, no half-pixel): source rows/cols 0, .5, 1, 1.5 (clamped to 1)
    expected_row0 = torch.tensor([0.0, 5.0, 10.0, 10.0])
    assert torch.allclose(y[0, 0, 0], expected_row0)
    assert torch.allclose(y[0, 0, :, 0], torch.tensor([0.0, 10.0, 20.0, 20.0]))
    assert torch.equal(tf1_resize_bilinear(x, 2), x)


def test_inception_layout_and_feature_shapes():
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()  # 299 input: the ADM feature sizes
    sd = model.state_dict()
    # names of the pytorch-fid port of the TF graph
    for key in (
        "Conv2d_1a_3x3.conv.weight",
        "Mixed_6d.branch1x1.bn.running_var",
        "Mixed_7c.branch3x3dbl_3b.conv.weight",
    ):
        assert key in sd
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8))
    assert out["pool"].shape == (1, 2048)
    assert out["logits"].shape == (1, 1008)
    assert out["spatial"].shape == (1, 17 * 17 * 7)  # first 7 channels of mixed_6/conv, NHWC-flattened
    assert torch.isfinite(out["pool"]).all() and out["pool"].abs().sum() > 0


def test_load_inception_from_local_file(tmp_path, inception):
    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in inception.state_dict().items()}, str(path))
    loaded = load_inception(path, input_size=75)
    x = torch.from_numpy(_images(2)).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x)["pool"], inception(x)["pool"])
    pth = tmp_path / "wrapped.pth"  # .pth files load with weights_only=True; a {"state_dict": ...} wrapper is unwrapped
    torch.save({"state_dict": {"fc.bias": inception.fc.bias}}, pth)
    assert torch.equal(load_state_dict_file(pth)["fc.bias"], inception.fc.bias)
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        load_inception(None)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_inception(tmp_path / "nope.pth")
    bad = tmp_path / "bad.safetensors"
    save_file({"conv.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="missing"):
        load_inception(bad)


def test_frechet_distance_features_matches_the_statistics_path():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(30, 64)), rng.normal(size=(40, 64)) * 1.3 + 0.2  # N < D: the sample-space formula
    ref = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert frechet_distance_features(a, b) == pytest.approx(ref, rel=1e-7)
    assert frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-10)
    big = rng.normal(size=(100, 8))  # N > D: the statistics path
    assert frechet_distance_features(big, big[::-1]) == pytest.approx(0.0, abs=1e-10)


def test_fid_of_a_set_against_itself_is_zero(inception):
    imgs = _images(24)
    m = evaluate_generation(imgs, imgs.copy(), inception=inception, batch_size=8, device="cpu", is_splits=2)
    assert abs(m["fid"]) < 1e-6 and abs(m["sfid"]) < 1e-6
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["is"] >= 1.0
    other = extract_features([torch.from_numpy(_images(24, seed=5) // 2).permute(0, 3, 1, 2)], inception)
    assert (
        frechet_distance_features(
            other["pool"], extract_features([torch.from_numpy(imgs).permute(0, 3, 1, 2)], inception)["pool"]
        )
        > 1e-3
    )


def test_npz_roundtrip_reference_stats_and_folders(tmp_path, inception):
    from PIL import Image

    imgs = _images(12)
    p = save_npz_images(tmp_path / "samples.npz", imgs)
    assert np.array_equal(load_npz_images(p), imgs)
    samples = save_npz_images(tmp_path / "other.npz", _images(12, seed=7))
    with pytest.raises(ValueError, match="uint8"):
        save_npz_images(tmp_path / "bad.npz", imgs.astype(np.float32))
    # arr_0 is streamed from the archive in batches, compressed npz included
    np.savez_compressed(tmp_path / "c.npz", arr_0=imgs)
    src = ImageSource(tmp_path / "c.npz")
    assert len(src) == 12 and src.has_images
    streamed = torch.cat(list(src.batches(5)))
    assert streamed.shape == (12, 3, 48, 48) and np.array_equal(streamed.permute(0, 2, 3, 1).numpy(), imgs)
    # float tensors in [0, 1] are converted to ADM uint8
    save_npz_images(tmp_path / "t.npz", torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    assert np.array_equal(load_npz_images(tmp_path / "t.npz"), imgs)

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / ("sub" if i % 2 else "") / f"{i:03d}.png")
    assert load_image_folder(folder).shape == imgs.shape

    # reference statistics written once, then used without the images
    stats_path = tmp_path / "ref_stats.npz"
    full = evaluate_generation(samples, folder, inception=inception, device="cpu", reference_stats_out=stats_path)
    assert set(load_npz_arrays(stats_path)) == {"mu", "sigma", "mu_s", "sigma_s"}
    from_stats = evaluate_generation(samples, stats_path, inception=inception, device="cpu")
    assert from_stats["fid"] == pytest.approx(full["fid"], rel=1e-5)  # statistics path vs sample-space path
    assert "precision" not in from_stats and "precision/recall" in from_stats["skipped"]

    # a folder of mixed sizes is read in same-size batches
    Image.fromarray(_images(1, size=40)[0]).save(folder / "zz_small.png")
    sizes = [tuple(b.shape) for b in ImageSource(folder).batches(100)]
    assert sizes == [(12, 3, 48, 48), (1, 3, 40, 40)]
    with pytest.raises(FileNotFoundError):
        ImageSource(tmp_path / "missing")


def test_fd_dinov2_with_a_tiny_random_vit(tmp_path):
    kwargs = dict(depth=1, embed_dim=32, num_heads=2, init_values=1.0)  # DINOv2's layer scale starts at 1e-5
    with pytest.raises(FileNotFoundError, match="dino_weights"):
        load_dino("vit_small_patch14_dinov2", None, input_size=28, **kwargs)
    dino = load_dino("vit_small_patch14_dinov2", None, input_size=28, allow_random=True, **kwargs)
    with torch.no_grad():  # timm's small init makes a 1-block CLS token nearly input-independent
        for p in dino.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in dino.model.state_dict().items()}, str(path))
    again = load_dino("vit_small_patch14_dinov2", path, input_size=28, **kwargs)
    x = torch.from_numpy(_images(20, size=32)).permute(0, 3, 1, 2)
    f1 = extract_features(x.split(8), dino=dino)["dino"]
    f2 = extract_features(x.split(8), dino=again)["dino"]
    assert f1.shape == (20, 32)
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-6)
    mu, sigma = feature_statistics(f1)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    mu2, sigma2 = feature_statistics(extract_features([x.flip(-1) // 3], dino=dino)["dino"])
    assert frechet_distance(mu, sigma, mu2, sigma2) > 1e-4

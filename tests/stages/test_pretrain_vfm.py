"""MAE pre-training of the demo VFM: the loss falls, the features get better than random, the file loads into timm."""

import subprocess
import sys

import pytest
import torch

from pae_fast.data.demo_images import build_demo_images
from pae_fast.stages import pretrain_vfm as P
from pae_fast.weights import load_weights, read_state_dict


@pytest.fixture(scope="module")
def data():
    return build_demo_images(train_per_class=48, heldout_per_class=32, seed=0)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vfm") / "vit_tiny_mae.safetensors"
    cfg = P.MAEConfig(steps=60, batch_size=32, lr=3e-3, seed=0)
    d = data
    res = P.pretrain_vfm(out, cfg, d.train.images, d.train.labels, d.heldout.images, d.heldout.labels, progress=False)
    return res, cfg


def test_encoder_path_matches_timm_forward_features():
    torch.manual_seed(0)
    mae = P.MaskedAutoencoder(P.build_vit_tiny()).eval()
    x = P._normalize(torch.rand(3, 3, 64, 64))
    assert torch.allclose(mae.encode(x), mae.encoder.forward_features(x), atol=1e-6)
    keep = mae.random_keep(3, 0.75, torch.Generator().manual_seed(0))
    assert keep.shape == (3, 16) and all(len(set(k.tolist())) == 16 for k in keep)
    assert mae.encode(x, keep).shape == (3, 17, 128)
    # a visible-only encoding is the full encoding of an image whose other patches do not exist: check via patchify
    p = mae.patchify(x)
    assert p.shape == (3, 64, 192)
    assert torch.equal(p[0, 9], x[0, :, 8:16, 8:16].permute(1, 2, 0).reshape(-1))


def test_mae_loss_falls(trained):
    res, cfg = trained
    assert len(res.losses) == cfg.steps and not res.skipped
    assert all(torch.isfinite(torch.tensor(res.losses)))
    # predicting zeros gives ~1 on per-patch normalised targets: the model must do clearly better than that
    assert res.final_loss < 0.7 and res.final_loss < 0.6 * res.initial_loss
    assert res.heldout_loss < 0.7


def test_weights_load_strictly_into_timm_vit(trained):
    from timm.models.vision_transformer import VisionTransformer

    res, cfg = trained
    fresh = VisionTransformer(**P.VIT_TINY_KWARGS)
    state, meta = read_state_dict(res.path)
    assert set(state) == set(fresh.state_dict())
    fresh.load_state_dict(state, strict=True)
    meta = load_weights(VisionTransformer(**P.VIT_TINY_KWARGS), res.path, strict=True)
    assert meta["format"] == P.WEIGHTS_FORMAT and meta["encoder"] == "ViT-tiny"
    assert int(meta["steps"]) == cfg.steps and abs(float(meta["final_loss"]) - res.final_loss) < 1e-5
    assert not any(k.startswith(("decoder", "mask_token", "encoder.")) for k in state)


def test_pretrained_features_beat_random_init(trained, data):
    """The point of pre-training: a linear probe on held-out crops does clearly better than on random features."""
    from timm.models.vision_transformer import VisionTransformer

    res, _ = trained
    vit = VisionTransformer(**P.VIT_TINY_KWARGS)
    load_weights(vit, res.path)
    tr, te = data.train, data.heldout
    acc = P.probe_accuracy(P.mean_patch_features(vit, tr.images), tr.labels, P.mean_patch_features(vit, te.images),
                           te.labels)
    assert acc == pytest.approx(res.probe_accuracy, abs=1e-6)  # the saved weights are the trained ones
    torch.manual_seed(1)
    rand = P.build_vit_tiny()
    acc_rand = P.probe_accuracy(P.mean_patch_features(rand, tr.images), tr.labels,
                                P.mean_patch_features(rand, te.images), te.labels)
    assert acc > max(acc_rand, res.probe_accuracy_init) + 0.08, (acc, acc_rand, res.probe_accuracy_init)


def _tiny(data, n=16):
    idx = torch.arange(0, len(data.train), len(data.train) // n)
    hidx = torch.arange(0, len(data.heldout), len(data.heldout) // n)
    return data.train.images[idx], data.train.labels[idx], data.heldout.images[hidx], data.heldout.labels[hidx]


def test_deterministic_and_reused(tmp_path, data):
    cfg = P.MAEConfig(steps=3, batch_size=8, seed=5)
    a = P.pretrain_vfm(tmp_path / "a.safetensors", cfg, *_tiny(data), progress=False)
    b = P.pretrain_vfm(tmp_path / "b.safetensors", cfg, *_tiny(data), progress=False)
    sa, _ = read_state_dict(a.path)
    sb, _ = read_state_dict(b.path)
    assert a.losses == b.losses and all(torch.equal(sa[k], sb[k]) for k in sa)
    state = torch.get_rng_state()
    again = P.pretrain_vfm(tmp_path / "a.safetensors", cfg, *_tiny(data), progress=False)
    assert again.skipped and again.final_loss == pytest.approx(a.final_loss, abs=1e-6) and not again.losses
    assert torch.equal(torch.get_rng_state(), state)
    changed = P.pretrain_vfm(tmp_path / "a.safetensors", P.MAEConfig(steps=4, batch_size=8, seed=5), *_tiny(data),
                             progress=False)
    assert not changed.skipped and len(changed.losses) == 4


def test_bad_input_is_named(tmp_path, data):
    x, y, hx, hy = _tiny(data)
    with pytest.raises(ValueError, match=r"train_images has shape \(16, 3, 32, 32\)"):
        P.pretrain_vfm(tmp_path / "w.safetensors", P.MAEConfig(steps=1), x[:, :, :32, :32], y, hx, hy)
    with pytest.raises(ValueError, match="mask_ratio=1.0"):
        P.pretrain_vfm(tmp_path / "w.safetensors", P.MAEConfig(mask_ratio=1.0), x, y, hx, hy)
    with pytest.raises(ValueError, match="both"):
        P.pretrain_vfm(tmp_path / "w.safetensors", P.MAEConfig(steps=1), x, y)
    assert not (tmp_path / "w.safetensors").exists()


def test_cli(tmp_path):
    out = tmp_path / "vfm.safetensors"
    cmd = [sys.executable, "-m", "pae_fast", "pretrain-vfm", "--out", str(out), "--steps", "2", "--batch-size", "8",
           "--images-per-class", "8", "--log-every", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "linear probe" in r.stdout and "step 2/2" in r.stderr
    bad = subprocess.run(cmd[:4] + ["--mask-ratio", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "mask_ratio=0.0" in bad.stderr

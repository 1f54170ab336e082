"""LPIPS fast path (docs/method.md § LPIPS fast path): the features / distance split keeps the values of the original
forward (a naive transcription of it below), detached features are anchors, the compute-dtype trunk without per-call
weight casts, and the tokenizer step running the trunk on exactly 4 image batches (the real ones without grad)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pae_fast.losses.lpips import LPIPS
from pae_fast.losses.recon import lpips_loss
from pae_fast.losses.total import PriorTargets, TokenizerLoss


def naive_lpips(model: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The LPIPS forward as it was written before the fast path: fp32, contiguous, the heads as 1x1 convolutions."""
    ends = set(model.stage_ends)

    def feats(t):
        t = ((t * 2 - 1) - model.shift) / model.scale
        out = []
        for i, layer in enumerate(model.net):
            t = layer(t)
            if i in ends:
                out.append(t)
        return out

    total = x.new_zeros(x.shape[0])
    for lin, a, b in zip(model.lins, feats(x), feats(y)):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((a - b).pow(2), lin.weight).mean((1, 2, 3))
    return total


def _images(B, S, seed):
    return torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("net, size", [("vgg", 32), ("alex", 67)])
@pytest.mark.parametrize("backend, channels_last", [("torch", False), ("triton", False), ("triton", True)])
def test_forward_and_input_grads_match_the_original_forward(net, size, backend, channels_last):
    torch.manual_seed(0)
    naive_model = LPIPS(net)  # NCHW fp32, as before the fast path
    model = copy.deepcopy(naive_model)
    if channels_last:
        model.to_compute_dtype(torch.float32)
    assert model.channels_last == channels_last
    x, y = _images(2, size, 1), _images(2, size, 2)
    xa, ya = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    xb, yb = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    up = torch.tensor([1.0, -3.0])  # different weights per image: per-image values must land in their own slot
    got = model.distance(model.features(xa, backend=backend), model.features(ya, backend=backend), backend=backend)
    want = naive_lpips(naive_model, xb, yb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model(x, y), want, rtol=1e-5, atol=1e-7)
    (got * up).sum().backward()
    (want * up).sum().backward()
    assert (xa.grad - ya.grad).abs().max() > 0  # the two sides' gradients differ: each must reach its own input
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ya.grad, yb.grad, rtol=1e-4, atol=1e-7)


class _OpLog(TorchDispatchMode):
    """Names of every op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("channels_last", [False, True])
def test_vgg_pools_run_the_index_free_kernel_with_torchs_values(channels_last):
    """VGG-16's four 2x2 pools run ``pae_fast::maxpool2x2``; the features and input gradient equal the torch trunk's
    (its own ``nn.MaxPool2d`` layers) bit for bit in fp32, so the held-out metric does not move; 37 px images give odd
    grids (37 and 9) where floor mode drops a row and a column. The layers and state-dict keys stay torchvision's."""
    torch.manual_seed(0)
    model = LPIPS("vgg")
    keys = list(model.state_dict())
    if channels_last:
        model.to_compute_dtype(torch.float32)
    assert all(isinstance(model.net[i], torch.nn.MaxPool2d) for i in (4, 9, 16, 23))
    assert list(model.state_dict()) == keys
    x = _images(2, 37, 1)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with _OpLog() as log:
        fa = model.features(xa, backend="triton")
    assert log.names.count("pae_fast::maxpool2x2") == 4 and "aten::max_pool2d_with_indices" not in log.names
    t = ((xb * 2 - 1) - model.shift) / model.scale
    t = t.contiguous(memory_format=torch.channels_last) if channels_last else t
    fb = []
    for i, layer in enumerate(model.net):  # the torchvision trunk as it is, nn.MaxPool2d included
        t = layer(t)
        if i in model.stage_ends:
            fb.append(t)
    assert [f.shape[-1] for f in fa] == [37, 18, 9, 4, 2]
    for a, b in zip(fa, fb):
        assert torch.equal(a, b)
    ups = [torch.randn(f.shape, generator=torch.Generator().manual_seed(i)) for i, f in enumerate(fa)]
    torch.autograd.backward(fa, ups)
    torch.autograd.backward(fb, ups)
    assert torch.equal(xa.grad, xb.grad)  # the same routing through every pool


def test_features_distance_runs_stage_ends_with_their_pools():
    """In the loss's pass, stages 1-4 end in one ``lpips_relu_distance_pool`` each (ReLU, distance and the next pool),
    stage 5 in ``lpips_relu_distance``; no separate pool runs. Values and input gradient equal the unfused
    ``features`` + ``distance`` on 37 px images (odd grids 37 and 9)."""
    torch.manual_seed(0)
    model = LPIPS("vgg").to_compute_dtype(torch.float32)
    x, y = _images(2, 37, 1), _images(2, 37, 2)
    anchor = model.features(y)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with _OpLog() as log:
        fa, da = model.features_distance(xa, anchor, backend="triton")
        (da @ torch.tensor([1.0, -2.0])).backward()
    assert log.names.count("pae_fast::lpips_relu_distance_pool") == 4
    assert log.names.count("pae_fast::lpips_relu_distance_pool_backward") == 4
    assert log.names.count("pae_fast::lpips_relu_distance") == 1
    assert not {"pae_fast::maxpool2x2", "aten::max_pool2d_with_indices"} & set(log.names)
    fb = model.features(xb, backend="torch")
    db = model.distance(fb, anchor, backend="torch")
    (db @ torch.tensor([1.0, -2.0])).backward()
    for a, b in zip(fa, fb):
        assert torch.equal(a, b)
    torch.testing.assert_close(da, db, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-8)


def test_alexnet_pools_stay_on_torch():
    """AlexNet's 3x3 / 2 pools are not 2x2: they stay torch's."""
    model = LPIPS("alex")
    with _OpLog() as log:
        model.features(_images(1, 67, 1), backend="triton")
    assert "pae_fast::maxpool2x2" not in log.names and "aten::max_pool2d_with_indices" in log.names


def test_features_and_distance_compose_to_the_forward():
    torch.manual_seed(0)
    model = LPIPS("vgg")
    x, y = _images(3, 32, 1), _images(3, 32, 2)
    fx, fy = model.features(x), model.features(y)
    assert [tuple(f.shape[1:]) for f in fx] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    torch.testing.assert_close(model.distance(fx, fy), model(x, y), rtol=1e-6, atol=0)
    assert float(lpips_loss(model, x, y)) == pytest.approx(float(model(x, y).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="5 stage features"):
        model.distance(fx[:4], fy[:4])


@pytest.mark.parametrize("backend, channels_last", [("torch", False), ("triton", False), ("triton", True)])
def test_features_distance_is_features_then_distance_to_a_detached_anchor(backend, channels_last):
    """The fused pass (each stage's ReLU with its distance) gives the features, distances and input gradient of
    ``distance(features(x), [f.detach() for f in features(y)])``, also with extra upstream gradients on two stage
    features (the fused op adds them to the next layer's and the distance's); the anchor gets no gradient."""
    torch.manual_seed(0)
    model = LPIPS("vgg")
    if channels_last:
        model.to_compute_dtype(torch.float32)
    x, y = _images(3, 32, 1), _images(3, 32, 2)
    anchor = [f.requires_grad_(True) for f in model.features(y)]  # detached inside: no gradient may reach them
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fa, da = model.features_distance(xa, anchor, backend=backend)
    fb = model.features(xb)
    db = model.distance(fb, [f.detach() for f in anchor], backend="torch")
    torch.testing.assert_close(da, db, rtol=1e-5, atol=1e-7)
    for a, b in zip(fa, fb):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    up = torch.tensor([1.0, -2.0, 0.5])
    extra = [torch.randn(f.shape, generator=torch.Generator().manual_seed(i)) * 1e-3 for i, f in enumerate(fa)]
    torch.autograd.backward([da @ up] + fa[2:4], [None] + extra[2:4])
    torch.autograd.backward([db @ up] + fb[2:4], [None] + extra[2:4])
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-8)
    assert all(f.grad is None for f in anchor)
    with pytest.raises(ValueError, match="5 anchor stage features"):
        model.features_distance(x, anchor[:4])


class _CastLog(TorchDispatchMode):
    """Shapes of every tensor cast (``aten._to_copy``) while active."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_compute_dtype_trunk_keeps_one_bf16_copy_and_casts_no_weight_per_call():
    torch.manual_seed(0)
    fp32 = LPIPS("vgg")
    bf16 = LPIPS("vgg")
    bf16.load_state_dict(fp32.state_dict())
    assert bf16.to_compute_dtype(torch.bfloat16) is bf16 and bf16.compute_dtype == torch.bfloat16
    convs = [m for m in bf16.net if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.dtype == torch.bfloat16 and c.bias.dtype == torch.bfloat16 for c in convs)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert all(lin.weight.dtype == torch.float32 for lin in bf16.lins)  # the heads stay fp32 (read by the distance)
    assert not any(p.requires_grad for p in bf16.parameters())
    weight_shapes = {tuple(c.weight.shape) for c in convs}
    x, y = _images(2, 32, 1), _images(2, 32, 2)
    for model, casts_weights in ((bf16, False), (fp32, True)):  # fp32 under autocast: every conv casts its weight
        with _CastLog() as log, torch.autocast("cpu", dtype=torch.bfloat16):
            d = model(x, y)
        assert d.dtype == torch.float32
        assert bool(weight_shapes & set(log.shapes)) == casts_weights, log.shapes
    f = bf16.features(x)
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous(memory_format=torch.channels_last) for t in f)
    torch.testing.assert_close(bf16(x, y), fp32(x, y), rtol=5e-2, atol=1e-3)  # bf16 trunk, fp32 distance


def test_compute_dtype_on_the_meta_device():
    with torch.device("meta"):
        model = LPIPS("vgg").to_compute_dtype(torch.bfloat16)
    x = torch.empty(2, 3, 32, 32, device="meta", requires_grad=True)
    d = model(x, torch.empty(2, 3, 32, 32, device="meta"))
    assert d.shape == (2,) and d.dtype == torch.float32
    d.sum().backward()
    assert x.grad.shape == x.shape


def test_tokenizer_step_runs_the_trunk_on_four_image_batches(parts):
    """L1 + LPIPS + GAN (adaptive weight) + cascaded MCR: the trunk sees the real images once without grad and each
    decoded batch once with grad (4 batches, not 6); the LPIPS term equals the module's own distance of (recon,
    images)."""
    B, C, G = 2, 8, 4  # 16 x 16 images: VGG-16's five stages down to 1 x 1
    torch.manual_seed(0)
    lp = LPIPS("vgg")
    seen: list[tuple[int, bool, bool]] = []  # (batch, grad enabled, input requires grad) of every trunk pass
    lp.net[0].register_forward_pre_hook(lambda m, a: seen.append((a[0].shape[0], torch.is_grad_enabled(),
                                                                    a[0].requires_grad)))  # fmt: skip
    cfg = parts.tok_cfg(lpips_weights="vgg", lambda_gan=0.5, gan_start_step=0, mcr=True, mcr_cascade="cascaded",
                        ssr=False, scr=False)  # fmt: skip
    loss = TokenizerLoss(cfg, lpips=lp, discriminator=parts.tiny_disc(), kernel_backend="torch")
    dec = parts.TinyDecoder(channels=C)
    z = parts.rms1(B, G, G, C).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    images = torch.rand(B, 3, 4 * G, 4 * G)
    out = loss.generator_loss(images, z, dec, 10, seed=7, last_layer=dec.last.weight, targets=PriorTargets())
    assert seen == [(B, False, False)] + [(B, True, True)] * 3
    assert {"lpips", "gan_weight", "mcr_medium", "mcr_large"} <= set(out.terms)
    assert float(out.terms["lpips"]) == pytest.approx(float(lp(out.recon.detach(), images).mean()), rel=1e-5)
    out.total.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()

"""The discriminator's precision (docs/method.md § Precision policies): under ``train.precision=bf16`` its frozen
backbone is held once in bf16 (``use_compute_dtype``, called by ``engine.precision.compute_weights``), its heads stay
fp32; the fp32 path is the previous code bit for bit; the state dict keeps its fp32 format."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pae_fast.engine.precision import compute_weights
from pae_fast.losses.gan import hinge_d_loss


def _old_logits(d, images: torch.Tensor) -> torch.Tensor:
    """The discriminator's forward as it was before the bf16 backbone (a transcription): fp32 all the way (``d``'s
    attention is timm's, :func:`_timm_attention`)."""
    x = images.float()
    if x.shape[-2:] != (d.input_size, d.input_size):
        x = F.interpolate(x, size=(d.input_size, d.input_size), mode="bilinear", align_corners=False)
    x = (x - d.mean) / d.std
    feats = d.backbone.forward_intermediates(x, indices=list(d.blocks), intermediates_only=True, output_fmt="NLC",
                                             stop_early=True)  # fmt: skip
    return torch.cat([head(f) for head, f in zip(d.heads, feats)], dim=1)


def _timm_attention(d):
    """``d`` with timm's own attention forward again (undoes ``timm_vit.patch_attention``: the code before it)."""
    for m in d.backbone.modules():
        if type(m).__name__ == "Attention" and "forward" in m.__dict__:
            del m.__dict__["forward"]
    return d


def _sn(d) -> list:
    """The spectral-norm parametrizations of the heads (their ``_u`` / ``_v`` buffers)."""
    return [m.parametrizations.weight[0] for m in d.heads.modules() if hasattr(m, "parametrizations")]


class _Casts(TorchDispatchMode):
    """Records the storage of every tensor a ``_to_copy`` (a dtype cast) reads."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.read.append(args[0].untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def _d_step(d, opt, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """One discriminator step as the engine runs it under bf16 (autocast; the heads' fp32 AdamW)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_real, logits_fake = d(real), d(fake)
        loss = hinge_d_loss(logits_real, logits_fake)
    loss.float().backward()
    opt.step()
    return logits_real


def test_fp32_path_is_the_previous_code_bit_for_bit(parts):
    """fp32: logits, the image gradient, the heads' gradients and the power iteration's u / v equal the previous code's
    (timm's attention, fp32 features) exactly; the backbone's attention now runs through the registry with the packed
    q / k / v gradient (``kernels.qkv_heads``): the same values."""
    torch.manual_seed(0)
    d = parts.tiny_disc()
    assert compute_weights(d, "fp32") is None and d.compute_dtype == torch.float32
    old = _timm_attention(copy.deepcopy(d))
    assert all("forward" in m.__dict__ for m in d.backbone.modules() if type(m).__name__ == "Attention")
    x = torch.rand(3, 3, 24, 24)  # resized to 32 inside
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = d(xa), _old_logits(old, xb)  # training mode: one power iteration each
    (la * torch.arange(la.shape[1])).sum().backward()
    (lb * torch.arange(lb.shape[1])).sum().backward()
    assert torch.equal(la, lb) and torch.equal(xa.grad, xb.grad)
    for pa, pb in zip(d.heads.parameters(), old.heads.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    for sa, sb in zip(_sn(d), _sn(old)):
        assert torch.equal(sa._u, sb._u) and torch.equal(sa._v, sb._v)


def test_bf16_backbone_is_one_copy_never_cast_heads_stay_fp32(parts):
    """Under bf16: backbone parameters bf16, cast once (same storage over two steps, no cast of a backbone matrix in
    them), heads and their spectral-norm u / v fp32, logits fp32 under autocast. The fp32 backbone under the same
    autocast (the ``bf16-autocast`` way, and this module's before) casts its matrices every step."""
    torch.manual_seed(0)
    d = parts.tiny_disc()
    fp32 = copy.deepcopy(d)
    assert compute_weights(d, "bf16") is None  # no compute copy: the module itself trains
    assert d.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in d.backbone.parameters())
    assert all(p.dtype == torch.float32 for p in d.trainable_parameters())
    assert _sn(d) and all(s._u.dtype == s._v.dtype == torch.float32 for s in _sn(d))
    matrices = {n: p for n, p in d.backbone.named_parameters() if p.ndim >= 2}
    ptrs = {n: p.data_ptr() for n, p in matrices.items()}
    real, fake = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    for module, expect_casts in ((d, False), (fp32, True)):
        opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
        u0 = [s._u.clone() for s in _sn(module)]
        for _ in range(2):
            with _Casts() as casts:
                logits = _d_step(module, opt, real, fake)
            cast = {n for n, p in dict(module.backbone.named_parameters()).items()
                    if p.ndim >= 2 and p.untyped_storage().data_ptr() in casts.read}  # fmt: skip
            assert bool(cast) == expect_casts, cast
            assert logits.dtype == torch.float32
        assert not all(torch.equal(a, s._u) for a, s in zip(u0, _sn(module)))  # the power iteration ran, in fp32
        assert all(s._u.dtype == torch.float32 for s in _sn(module))
    assert {n: p.data_ptr() for n, p in matrices.items()} == ptrs  # the same single copy after two steps
    assert all(p.dtype == torch.bfloat16 for p in d.backbone.parameters())
    assert all(p.dtype == torch.float32 for p in d.trainable_parameters())
    d.use_compute_dtype(torch.bfloat16)  # again: nothing moves
    assert {n: p.data_ptr() for n, p in matrices.items()} == ptrs


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_backbone_gradient_to_the_image_flows_in_bf16_and_matches_fp32(parts, seed):
    """The image enters the backbone in bf16 and its gradient comes back through it in bf16; the heads see fp32
    tokens. Logits within 2 % and the image gradient within 15 % (relative L2; cosine > 0.99) of the fp32 path on
    the tiny random backbone (bf16's 8-bit mantissa; measured 0.6 % and 3.5-7.5 %, as large as fp32 weights under
    bf16 autocast give: 4-8 %)."""
    torch.manual_seed(seed)
    d32 = parts.tiny_disc().eval()  # eval: no power iteration, both see the same spectral norms
    d16 = copy.deepcopy(d32)
    d16.use_compute_dtype(torch.bfloat16)
    seen: dict[str, torch.dtype] = {}

    def into_backbone(m, args):
        seen["input"] = args[0].dtype
        args[0].register_hook(lambda g: seen.__setitem__("grad", g.dtype))

    d16.backbone.patch_embed.register_forward_pre_hook(into_backbone)
    d16.heads[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("head", args[0].dtype))
    x = torch.rand(3, 3, 24, 24)
    out = {}
    for name, d in (("fp32", d32), ("bf16", d16)):
        xi = x.clone().requires_grad_()
        logits = d(xi)
        (logits * torch.linspace(-1, 1, logits.shape[1])).sum().backward()  # a weight per token: not symmetric
        out[name] = (logits.detach(), xi.grad)
    assert seen == {"input": torch.bfloat16, "grad": torch.bfloat16, "head": torch.float32}
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    assert l16.dtype == g16.dtype == torch.float32
    assert (l16 - l32).norm() / l32.norm() < 0.02
    assert (g16 - g32).norm() / g32.norm() < 0.15
    assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99


def test_state_dict_keeps_its_fp32_format_and_resume_restores_the_bf16_backbone(parts):
    """``disc.safetensors`` keys and dtypes do not change under bf16 (the backbone widened to fp32, exactly); loading
    it into a fresh discriminator then ``use_compute_dtype`` gives the same bf16 backbone and the same heads."""
    torch.manual_seed(0)
    d = parts.tiny_disc()
    before = {k: (v.shape, v.dtype) for k, v in d.state_dict().items()}
    d.use_compute_dtype(torch.bfloat16)
    sd = d.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in sd.items()} == before
    assert all(torch.equal(sd[f"backbone.{n}"], p.float()) for n, p in d.backbone.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in d.backbone.parameters())  # saving widened a copy only
    torch.manual_seed(1)
    fresh = parts.tiny_disc()  # other random weights, as a resumed run builds it before loading
    fresh.load_state_dict(sd)
    fresh.use_compute_dtype(torch.bfloat16)
    for (n, a), b in zip(d.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert all(torch.equal(a, b) for a, b in zip(d.backbone.parameters(), fresh.backbone.parameters()))


def test_spectral_norm_runs_outside_autocast_once_per_forward(parts):
    """Under the engine's autocast the heads' convs run under it, but every spectral-norm weight (power iteration and
    sigma: ``mv`` / ``vdot``, which CUDA autocast would run in bf16) is computed with autocast off, once per forward."""
    d = parts.tiny_disc()
    d.use_compute_dtype(torch.bfloat16)
    sn_calls: list[bool] = []
    conv_calls: list[bool] = []
    for s in _sn(d):
        s.register_forward_pre_hook(lambda m, args: sn_calls.append(torch.is_autocast_enabled("cpu")))
    convs = [m for m in d.heads.modules() if isinstance(m, torch.nn.Conv1d)]
    for c in convs:
        c.register_forward_pre_hook(lambda m, args: conv_calls.append(torch.is_autocast_enabled("cpu")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d(torch.rand(2, 3, 32, 32))
    assert len(sn_calls) == len(_sn(d)) == len(convs) and not any(sn_calls)
    assert len(conv_calls) == len(convs) and all(conv_calls)

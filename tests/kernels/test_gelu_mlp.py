"""gelu_mlp: the GELU MLP with the GELU in Triton GEMM epilogues against its F.linear -> F.gelu -> F.linear reference
and against a naive transcription of the GELU formulas, forward and all five gradients; no-grad forward, meta / fake
tensors, autocast, the op-table entry and its counting."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pae_fast import kernels
from pae_fast.kernels import OPS, gelu_mlp, gelu_mlp_ref
from pae_fast.kernels._dispatch import counting_only
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches
from pae_fast.kernels.tools.traffic import TrafficCounter

OP = OPS["gelu_mlp"]
APPROX = ["none", "tanh"]


def _inputs(lead=(2, 19), D=40, H=24, b1=True, b2=True, dtype=torch.float32, seed=0, needs=(True,) * 5, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, D, generator=g) * scale
    w1 = torch.randn(H, D, generator=g) * D**-0.5
    bias1 = torch.randn(H, generator=g) * 0.5 if b1 else None
    w2 = torch.randn(D, H, generator=g) * H**-0.5
    bias2 = torch.randn(D, generator=g) * 0.5 if b2 else None
    ts = [t.to(dtype).requires_grad_(n) if t is not None else None for t, n in zip((x, w1, bias1, w2, bias2), needs)]
    return tuple(ts)


def _gelu_naive(u: torch.Tensor, approximate: str) -> torch.Tensor:
    """The two GELU formulas, transcribed (Hendrycks & Gimpel 2016)."""
    if approximate == "tanh":
        return 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    return u * 0.5 * (1 + torch.erf(u / math.sqrt(2)))


def _gelu_grad_naive(u: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        t = torch.tanh(k * (u + 0.044715 * u**3))
        return 0.5 * (1 + t) + 0.5 * u * (1 - t**2) * k * (1 + 3 * 0.044715 * u**2)
    return 0.5 * (1 + torch.erf(u / math.sqrt(2))) + u * torch.exp(-(u**2) / 2) / math.sqrt(2 * math.pi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b1", [True, False])
@pytest.mark.parametrize("approximate", APPROX)
def test_odd_shapes_all_gradients(approximate, b1, dtype):
    # 257 rows, width 72, hidden 97: partial tiles in M, N and K (interpreter tiles 32 x 16 x 16)
    args = _inputs(lead=(257,), D=72, H=97, b1=b1, b2=not b1, dtype=dtype)
    atol, rtol = OP.tolerances[dtype]
    res = assert_op_matches(gelu_mlp, gelu_mlp_ref, args, {"approximate": approximate}, atol=atol, rtol=rtol,
                            ref_dtype=torch.float64, atol_rms=True)  # fmt: skip
    assert len([r for r in res.rows if r.what.startswith("grad")]) == 4  # x, w1, w2 and one bias


@pytest.mark.parametrize("approximate", APPROX)
def test_forward_and_b1_gradient_follow_the_gelu_formulas(approximate):
    """Against the transcribed formulas: y = gelu(x w1^T + b1) w2^T + b2 and db1 = column sums of (g w2) * gelu'(pre)
    (the kernel's derivative, independent of autograd); inputs of scale 2, where exact and tanh GELU differ by more
    than the tolerance."""
    x, w1, b1, w2, b2 = _inputs(scale=2.0)
    y = gelu_mlp(x, w1, b1, w2, b2, approximate=approximate, backend="triton")
    x64, w164, b164, w264, b264 = (t.detach().double() for t in (x, w1, b1, w2, b2))
    pre = x64 @ w164.T + b164
    want = _gelu_naive(pre, approximate) @ w264.T + b264
    torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=2e-5)
    other = _gelu_naive(pre, "tanh" if approximate == "none" else "none") @ w264.T + b264
    assert not torch.allclose(other, want, atol=2e-5, rtol=2e-5)  # the other approximation fails the check above
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (db1,) = torch.autograd.grad(y, [b1], g)
    want_db1 = ((g.double() @ w264) * _gelu_grad_naive(pre, approximate)).sum(0).sum(0)
    torch.testing.assert_close(db1.double(), want_db1, atol=1e-4, rtol=1e-4)


def test_gelu_grad_naive_is_the_derivative():
    """The transcribed derivatives above are d/du of the transcribed GELUs (so the check above pins gelu')."""
    u = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    for approximate in APPROX:
        (d,) = torch.autograd.grad(_gelu_naive(u, approximate).sum(), [u])
        torch.testing.assert_close(_gelu_grad_naive(u.detach(), approximate), d)


@pytest.mark.parametrize("which", [0, 1, 2, 3, 4])
def test_gradient_to_one_input_only(which):
    needs = tuple(i == which for i in range(5))
    args = _inputs(needs=needs)
    assert_op_matches(gelu_mlp, gelu_mlp_ref, args, {}, atol=2e-5, rtol=2e-5, ref_dtype=torch.float64)
    grads = torch.autograd.grad(gelu_mlp(*args, backend="triton").sum(), [args[which]])
    assert grads[0].shape == args[which].shape


def test_gradcheck_reference_float64():
    args = _inputs(lead=(3,), D=5, H=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: gelu_mlp_ref(*a, approximate="tanh"), args)


def test_no_grad_forward_writes_no_pre_activation():
    """Under no_grad (a frozen encoder) the forward op saves nothing: it writes y only, and y is unchanged."""
    x, w1, b1, w2, b2 = _inputs()
    with_grad = gelu_mlp(x, w1, b1, w2, b2, backend="triton")
    with torch.no_grad(), TrafficCounter() as tc:
        y = gelu_mlp(x, w1, b1, w2, b2, backend="triton")
    assert not y.requires_grad
    torch.testing.assert_close(y, with_grad.detach(), atol=0, rtol=0)
    row = {r["op"]: r for r in tc.summary()["rows"]}["pae_fast::gelu_mlp"]
    assert row["written_bytes"] == y.numel() * 4
    assert row["read_bytes"] + row["written_bytes"] == OP.min_bytes((x, w1, b1, w2, b2), {"save": False}, True)
    # frozen weights, x without grad: nothing to save either
    xs = [t.detach() if t is not None else None for t in (x, w1, b1, w2, b2)]
    with TrafficCounter() as tc:
        gelu_mlp(*xs, backend="triton")
    assert {r["op"]: r for r in tc.summary()["rows"]}["pae_fast::gelu_mlp"]["written_bytes"] == y.numel() * 4


def test_autocast_casts_like_f_linear_and_matches_reference():
    """fp32 weights and input under (CPU) fp16 autocast: every GEMM input in fp16, the output in fp16, the weight
    gradients back in fp32 (through autocast's casts), as the F.linear chain gives."""
    args = _inputs(lead=(2, 9))
    ref_args = [t.detach().clone().requires_grad_() for t in args]
    with torch.autocast("cpu", dtype=torch.float16):
        y = gelu_mlp(*args, backend="triton")
        y_ref = gelu_mlp_ref(*ref_args)
    assert y.dtype == y_ref.dtype == torch.float16
    torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)
    g = torch.randn(y.shape).half()
    y.backward(g)
    y_ref.backward(g)
    for t, r in zip(args, ref_args):
        assert t.grad.dtype == torch.float32
        torch.testing.assert_close(t.grad, r.grad, atol=2e-2, rtol=2e-2)


def test_dtype_mismatch_outside_autocast_and_shape_errors():
    x, w1, b1, w2, b2 = _inputs()
    with pytest.raises(ValueError, match="share a dtype outside autocast"):
        gelu_mlp(x, w1.half(), b1, w2, b2, backend="triton")
    with pytest.raises(ValueError, match=r"w1 must be \(H, D=40\)"):
        gelu_mlp(x, w1[:, :39], b1, w2)
    with pytest.raises(ValueError, match=r"w2 must be \(D, H\) = \(40, 24\)"):
        gelu_mlp(x, w1, b1, w2.t())
    with pytest.raises(ValueError, match=r"b1 must be \(24,\)"):
        gelu_mlp(x, w1, b1[:23], w2)
    with pytest.raises(ValueError, match=r"b2 must be \(40,\)"):
        gelu_mlp(x, w1, b1, w2, b2[:39])
    with pytest.raises(ValueError, match="approximate must be one of none, tanh"):
        gelu_mlp(x, w1, b1, w2, approximate="erf")


def test_scope_switches_to_the_reference_exactly():
    x, w1, b1, w2, b2 = _inputs()
    with kernels.use_backend("torch"):
        assert torch.equal(gelu_mlp(x, w1, b1, w2, b2, approximate="tanh"),
                           gelu_mlp_ref(x, w1, b1, w2, b2, approximate="tanh"))  # fmt: skip


def test_meta_device_model_size_forward_backward():
    D, H = 1024, 4096
    shapes = ((32, 257, D), (H, D), (H,), (D, H), (D,))
    args = [torch.empty(s, device="meta", dtype=torch.bfloat16, requires_grad=True) for s in shapes]
    y = gelu_mlp(*args, backend="triton")
    assert y.shape == (32, 257, D) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    y.sum().backward()
    for t in args:
        assert t.grad.shape == t.shape and t.grad.dtype == torch.bfloat16


def test_fake_tensors_under_autocast_give_autocast_dtype():
    with FakeTensorMode(allow_non_fake_inputs=True), counting_only(), kernels.use_backend("triton"):
        shapes = ((2, 16, 64), (96, 64), (96,), (64, 96), (64,))
        args = [torch.empty(s, requires_grad=True) for s in shapes]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = gelu_mlp(*args)
        assert y.dtype == torch.bfloat16 and y.shape == (2, 16, 64)
        y.float().sum().backward()
        assert all(t.grad.dtype == torch.float32 and t.grad.shape == t.shape for t in args)


def test_flops_and_min_bytes():
    M, D, H = 6, 8, 12
    x, w1, b1, w2, b2 = torch.empty(2, 3, D), torch.empty(H, D), torch.empty(H), torch.empty(D, H), torch.empty(D)
    args = (x, w1, b1, w2, b2)
    fwd = 2 * M * D * H + 2 * M * H * D
    assert OP.flops(args, {}, False) == fwd
    assert OP.flops(args, {}, True) == 3 * fwd  # backward = 2 x forward
    # the backward op's flags drop the GEMMs it skips: only dW2 and dh -> d_pre for the fc1 bias gradient
    named = {"x": x, "w2": w2, "need_x": False, "need_w1": False, "need_b1": True, "need_w2": True, "need_b2": True}
    assert OP.flops((), named, True) - fwd == 2 * (2 * M * D * H)
    # only dx: dh and d_pre w1
    named = {"x": x, "w2": w2, "need_x": True, "need_w1": False, "need_b1": False, "need_w2": False, "need_b2": False}
    assert OP.flops((), named, True) - fwd == 2 * (2 * M * D * H)
    w = (H * D + H + D * H + D) * 4
    assert OP.min_bytes(args, {}, False) == M * D * 4 + w + (M * D + 2 * M * H) * 4
    bwd = (M * D + M * D + H * D + D * H + 2 * M * H + M * D) * 4 + w
    assert OP.min_bytes(args, {}, True) == OP.min_bytes(args, {}, False) + bwd
    # the forward op's schema-bound arguments of a call with nothing to differentiate (save=False): y only
    named = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "approximate": "none", "save": False}
    assert OP.min_bytes((), named, True) == M * D * 4 + w + M * D * 4


def test_counter_charges_gemm_flops_and_boundary_bytes():
    """The traffic counter sees one matmul op each way, with the unfused GEMMs' FLOPs (the MFU numerator does not
    change) and bytes equal to the op's declared minimum; no bandwidth-bound bytes, where the reference has the GELU
    passes and the fc2 bias gradient's sum."""
    meta = torch.device("meta")
    D, H = 64, 96

    def leaves():
        return [torch.empty(s, device=meta, dtype=torch.bfloat16, requires_grad=True)
                for s in ((4, 16, D), (H, D), (H,), (D, H), (D,))]  # fmt: skip

    counts = {}
    for backend in ("triton", "torch"):
        args = leaves()
        with TrafficCounter() as tc:
            y = gelu_mlp(*args, backend=backend)
            with tc.paused():
                g = torch.ones_like(y)
            y.backward(g)
        counts[backend] = tc.summary()
    fused, ref = counts["triton"], counts["torch"]
    assert fused["matmul_flops"] == ref["matmul_flops"] == OP.flops(tuple(leaves()), {}, True)
    assert fused["other_bytes"] == 0 < ref["other_bytes"]
    assert {"gelu", "gelu_backward"} <= {r["op"] for r in ref["rows"]}
    assert fused["matmul_bytes"] == OP.min_bytes(tuple(leaves()), {}, True)
    rows = {(r["phase"], r["op"]): r for r in fused["rows"]}
    assert rows[("forward", "pae_fast::gelu_mlp")]["category"] == "matmul"
    assert rows[("backward", "pae_fast::gelu_mlp_backward")]["model_flops"] == 2 * OP.flops(tuple(leaves()), {},
                                                                                              False)  # fmt: skip
    assert sorted((c["phase"], c["calls"]) for c in fused["fused_gemm"]) == [("backward", 1), ("forward", 1)]


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_fp32_on_a_gpu_keeps_cublas_gemms(device):
    """On a CUDA device (fake tensors here), and on the fake CPU tensors that stand for CUDA ones while counting, fp32
    runs the reference (aten GEMMs, one aten GELU between); half inputs run the Triton GEMMs with the GELU in their
    epilogues."""
    with FakeTensorMode(allow_non_fake_inputs=True), counting_only():
        args = [torch.empty(*s, device=device) for s in ((2, 19, 40), (24, 40), (24,), (40, 24), (40,))]
        ops = {}
        for dtype in (torch.float32, torch.float16):
            a = [t.to(dtype) for t in args]
            with TrafficCounter() as tc:
                y = kernels.gelu_mlp(*a, backend="triton")
            assert y.shape == (2, 19, 40) and y.dtype == dtype
            ops[dtype] = {r["op"] for r in tc.summary()["rows"]}
    assert "gelu" in ops[torch.float32] and "pae_fast::gelu_mlp" not in ops[torch.float32]
    assert "pae_fast::gelu_mlp" in ops[torch.float16] and "gelu" not in ops[torch.float16]


def test_shared_tiles_with_swiglu_mlp():
    """Both GEMM-epilogue ops run on the one tile machinery (_gemm_epilogue): its configs, its launcher."""
    from pae_fast.kernels import _gelu_mlp_kernels as G
    from pae_fast.kernels import _gemm_epilogue as E
    from pae_fast.kernels import _swiglu_mlp_kernels as S

    assert S.GPU_CONFIGS is E.GPU_CONFIGS and G.launch is S.launch is E.launch
    assert G._fwd_tuned.configs == E.GPU_CONFIGS == G._bwd_tuned.configs
    assert E.block_m() == E.INTERPRET_CONFIG["BLOCK_M"]  # this test file runs under TRITON_INTERPRET=1


def test_zero_rows_give_zero_bias_and_weight_gradients():
    """No rows: no program runs; the bias partials are zeros (not uninitialised memory), every gradient is zero."""
    args = _inputs(lead=(0,))
    y = gelu_mlp(*args, backend="triton")
    assert y.shape == (0, 40)
    grads = torch.autograd.grad(y.sum(), list(args))
    assert [tuple(g.shape) for g in grads] == [tuple(a.shape) for a in args]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)

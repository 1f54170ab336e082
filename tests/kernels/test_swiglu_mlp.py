"""swiglu_mlp: the SwiGLU MLP with the gate in Triton GEMM epilogues against its F.linear -> swiglu -> F.linear
reference, forward and all four gradients; meta / fake tensors, autocast, the op-table entry and its counting."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from pae_fast import kernels
from pae_fast.kernels import OPS, swiglu_mlp, swiglu_mlp_ref
from pae_fast.kernels._dispatch import counting_only
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches
from pae_fast.kernels.tools.traffic import TrafficCounter

OP = OPS["swiglu_mlp"]


def _inputs(lead=(2, 19), D=40, H=24, bias=True, dtype=torch.float32, seed=0, needs=(True, True, True, True)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, D, generator=g)
    w12 = torch.randn(2 * H, D, generator=g) * D**-0.5
    b12 = torch.randn(2 * H, generator=g) * 0.5 if bias else None
    w3 = torch.randn(D, H, generator=g) * H**-0.5
    ts = [t.to(dtype).requires_grad_(n) if t is not None else None for t, n in zip((x, w12, b12, w3), needs)]
    return tuple(ts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("H", [24, 40])
def test_odd_shapes_all_gradients_fp32(H, bias):
    # 38 rows, width 40, hidden 24 / 40: partial tiles in M, N and K (interpreter tiles 32 x 16 x 16)
    args = _inputs(H=H, bias=bias)
    res = assert_op_matches(swiglu_mlp, swiglu_mlp_ref, args, {}, atol=2e-5, rtol=2e-5, ref_dtype=torch.float64)
    assert len([r for r in res.rows if r.what.startswith("grad")]) == (4 if bias else 3)


def test_matches_the_unfused_linear_chain_exactly_in_spirit():
    """The reference is the LightningDiT SwiGLU without w3's bias: F.linear(silu(a) * b, w3)."""
    x, w12, b12, w3 = _inputs()
    a, b = F.linear(x, w12, b12).chunk(2, dim=-1)
    torch.testing.assert_close(swiglu_mlp_ref(x, w12, b12, w3), F.linear(F.silu(a) * b, w3))
    torch.testing.assert_close(swiglu_mlp(x, w12, b12, w3, backend="triton"), F.linear(F.silu(a) * b, w3),
                               atol=2e-5, rtol=2e-5)  # fmt: skip


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_gradient_to_one_input_only(which):
    needs = tuple(i == which for i in range(4))
    args = _inputs(needs=needs)
    assert_op_matches(swiglu_mlp, swiglu_mlp_ref, args, {}, atol=2e-5, rtol=2e-5, ref_dtype=torch.float64)
    grads = torch.autograd.grad(swiglu_mlp(*args, backend="triton").sum(), [args[which]])
    assert grads[0].shape == args[which].shape


def test_gradcheck_reference_float64():
    args = _inputs(lead=(3,), D=5, H=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(swiglu_mlp_ref, args)


def test_autocast_casts_like_f_linear_and_matches_reference():
    """fp32 weights and input under (CPU) fp16 autocast: every GEMM input in fp16, the output in fp16, the weight
    gradients back in fp32 (through autocast's casts), as the F.linear chain gives."""
    args = _inputs(lead=(2, 9))
    ref_args = [t.detach().clone().requires_grad_() for t in args]
    with torch.autocast("cpu", dtype=torch.float16):
        y = swiglu_mlp(*args, backend="triton")
        y_ref = swiglu_mlp_ref(*ref_args)
    assert y.dtype == y_ref.dtype == torch.float16
    torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)
    g = torch.randn(y.shape).half()
    y.backward(g)
    y_ref.backward(g)
    for t, r in zip(args, ref_args):
        assert t.grad.dtype == torch.float32
        torch.testing.assert_close(t.grad, r.grad, atol=2e-2, rtol=2e-2)


def test_dtype_mismatch_outside_autocast_and_shape_errors():
    x, w12, b12, w3 = _inputs()
    with pytest.raises(ValueError, match="share a dtype outside autocast"):
        swiglu_mlp(x, w12.half(), b12, w3, backend="triton")
    with pytest.raises(ValueError, match=r"w12 must be \(2H, D=40\)"):
        swiglu_mlp(x, w12[:, :39], b12, w3)
    with pytest.raises(ValueError, match=r"w12 must be"):
        swiglu_mlp(x, w12[:47], None, w3)
    with pytest.raises(ValueError, match=r"w3 must be \(D, H\) = \(40, 24\)"):
        swiglu_mlp(x, w12, b12, w3.t())
    with pytest.raises(ValueError, match=r"b12 must be \(48,\)"):
        swiglu_mlp(x, w12, b12[:24], w3)


def test_scope_switches_to_the_reference_exactly():
    x, w12, b12, w3 = _inputs()
    with kernels.use_backend("torch"):
        assert torch.equal(swiglu_mlp(x, w12, b12, w3), swiglu_mlp_ref(x, w12, b12, w3))


def test_meta_device_model_size_forward_backward():
    D, H = 1152, 3072
    x = torch.empty(32, 256, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w12 = torch.empty(2 * H, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    b12 = torch.empty(2 * H, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w3 = torch.empty(D, H, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = swiglu_mlp(x, w12, b12, w3, backend="triton")
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and y.device.type == "meta"
    y.sum().backward()
    for t in (x, w12, b12, w3):
        assert t.grad.shape == t.shape and t.grad.dtype == torch.bfloat16


def test_fake_tensors_under_autocast_give_autocast_dtype():
    with FakeTensorMode(allow_non_fake_inputs=True), counting_only(), kernels.use_backend("triton"):
        x, w12, b12, w3 = (torch.empty(s, requires_grad=True) for s in ((2, 16, 64), (192, 64), (192,), (64, 96)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = swiglu_mlp(x, w12, b12, w3)
        assert y.dtype == torch.bfloat16 and y.shape == (2, 16, 64)
        y.float().sum().backward()
        assert all(t.grad.dtype == torch.float32 and t.grad.shape == t.shape for t in (x, w12, b12, w3))


def test_flops_and_min_bytes():
    M, D, H = 6, 8, 12
    x, w12, b12, w3 = torch.empty(2, 3, D), torch.empty(2 * H, D), torch.empty(2 * H), torch.empty(D, H)
    fwd = 2 * M * D * 2 * H + 2 * M * H * D
    assert OP.flops((x, w12, b12, w3), {}, False) == fwd
    assert OP.flops((x, w12, b12, w3), {}, True) == 3 * fwd  # backward = 2 x forward
    # the backward op's flags drop the GEMMs it skips: only dW3 and dh -> d[a|b] for the bias gradient
    named = {"x": x, "w3": w3, "need_x": False, "need_w12": False, "need_b12": True, "need_w3": True}
    assert OP.flops((), named, True) - fwd == 2 * (2 * M * D * H)
    w = (2 * H * D + 2 * H + D * H) * 4
    assert OP.min_bytes((x, w12, b12, w3), {}, False) == M * D * 4 + w + (M * D + 3 * M * H) * 4
    bwd = (M * D + M * D + 2 * H * D + D * H + 3 * M * H + M * D) * 4 + w
    assert OP.min_bytes((x, w12, b12, w3), {}, True) == OP.min_bytes((x, w12, b12, w3), {}, False) + bwd


def test_counter_charges_gemm_flops_and_boundary_bytes():
    """The traffic counter sees one matmul op each way, with the unfused GEMMs' FLOPs (the MFU numerator does not
    change) and bytes equal to the op's declared minimum; no bandwidth-bound bytes but w3's absence."""
    meta = torch.device("meta")
    D, H = 64, 96

    def leaves():
        return [torch.empty(s, device=meta, dtype=torch.bfloat16, requires_grad=True)
                for s in ((4, 16, D), (2 * H, D), (2 * H,), (D, H))]  # fmt: skip

    counts = {}
    for backend in ("triton", "torch"):
        args = leaves()
        with TrafficCounter() as tc:
            y = swiglu_mlp(*args, backend=backend)
            with tc.paused():
                g = torch.ones_like(y)
            y.backward(g)
        counts[backend] = tc.summary()
    fused, ref = counts["triton"], counts["torch"]
    assert fused["matmul_flops"] == ref["matmul_flops"] == OP.flops(tuple(leaves()), {}, True)
    assert fused["other_bytes"] == 0 < ref["other_bytes"]
    assert fused["matmul_bytes"] == OP.min_bytes(tuple(leaves()), {}, True)
    rows = {(r["phase"], r["op"]): r for r in fused["rows"]}
    assert rows[("forward", "pae_fast::swiglu_mlp")]["category"] == "matmul"
    assert rows[("backward", "pae_fast::swiglu_mlp_backward")]["model_flops"] == 2 * OP.flops(tuple(leaves()), {},
                                                                                                False)  # fmt: skip
    assert sorted((c["phase"], c["calls"]) for c in fused["fused_gemm"]) == [("backward", 1), ("forward", 1)]
    assert sum(c["bytes"] * c["calls"] for c in fused["fused_gemm"]) == fused["matmul_bytes"]


def test_interpreter_and_gpu_tile_configs():
    """GPU configs: BLOCK_M fixed (the bias partials' count), tl.dot-friendly blocks; the interpreter's tile is small
    and leaves partial tiles on the test shapes."""
    from pae_fast.kernels import _swiglu_mlp_kernels as K

    assert all(c.kwargs["BLOCK_M"] == K.GPU_BLOCK_M == 128 for c in K.GPU_CONFIGS)
    assert {c.kwargs["BLOCK_N"] for c in K.GPU_CONFIGS} == {64, 128} and len(K.GPU_CONFIGS) >= 3
    assert all(min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) >= 16 for c in K.GPU_CONFIGS)
    cfg = K.INTERPRET_CONFIG
    assert min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) >= 16 and 38 % cfg["BLOCK_M"] and 24 % cfg["BLOCK_N"]
    assert K.block_m() == cfg["BLOCK_M"]  # this test file runs under TRITON_INTERPRET=1


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_swiglu_layer_is_the_fused_op_plus_w3_bias(backend):
    """models.layers.SwiGLU: forward = swiglu_mlp(x, w12, b12, w3) + w3's bias = W3(silu(x W1) * x W2) + b3,
    forward and every parameter gradient (the triton backend runs the interpreter's GEMMs)."""
    from pae_fast.models.layers import SwiGLU

    torch.manual_seed(0)
    m = SwiGLU(40, 24)
    x = torch.randn(2, 19, 40, requires_grad=True)
    with kernels.use_backend(backend):
        y = m(x)
    a, b = m.w12(x).chunk(2, -1)
    y_ref = m.w3(F.silu(a) * b)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    params = [x, *m.parameters()]
    g = torch.randn(y.shape)
    for got, want in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g)):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)


def test_fp32_on_a_gpu_keeps_cublas_gemms_around_the_fused_gate():
    """On a CUDA device (fake tensors here) fp32 runs two aten GEMMs with the fused ``swiglu`` kernel between them;
    half inputs run the Triton GEMMs with the gate in their epilogues."""
    with FakeTensorMode(allow_non_fake_inputs=True), counting_only():
        args = [torch.empty(*s, device="cuda") for s in ((2, 19, 40), (48, 40), (48,), (40, 24))]
        ops = {}
        for dtype in (torch.float32, torch.float16):
            a = [t.to(dtype) for t in args]
            with TrafficCounter() as tc:
                y = kernels.swiglu_mlp(*a, backend="triton")
            assert y.shape == (2, 19, 40) and y.dtype == dtype
            ops[dtype] = {r["op"] for r in tc.summary()["rows"]}
    assert "pae_fast::swiglu" in ops[torch.float32] and "pae_fast::swiglu_mlp" not in ops[torch.float32]
    assert "pae_fast::swiglu_mlp" in ops[torch.float16] and "pae_fast::swiglu" not in ops[torch.float16]

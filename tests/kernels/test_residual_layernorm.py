"""residual_layernorm: fused residual (+LayerScale) + LayerNorm against its reference and a naive transcription,
both outputs and every gradient, gradients flowing into y and n."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from pae_fast.kernels import OPS, residual_layernorm, residual_layernorm_ref
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches

OP = OPS["residual_layernorm"]
BWD = importlib.import_module("pae_fast.kernels._residual_layernorm_bwd")  # block sizes, the tile-size knob


def rnd(*shape, dtype=torch.float32, scale=1.0, offset=0.0, grad=True):
    return (torch.randn(*shape) * scale + offset).to(dtype).requires_grad_(grad)


def check(args, kwargs, dtype=torch.float32):
    atol, rtol = OP.tolerances[dtype]
    return assert_op_matches(residual_layernorm, residual_layernorm_ref, args, kwargs, atol=atol, rtol=rtol,
                             ref_dtype=torch.float64, atol_rms=OP.atol_rms)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_registered_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("D,eps", [(72, 1e-6), (1024, 1e-12), (97, 1e-12)])
@pytest.mark.parametrize("gamma", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_odd_shapes_gamma_affine(D, eps, gamma, affine, dtype):
    # rows 257 (a prime: no row block is full), gradients into both y and n (compare_op feeds both)
    kw = {"eps": eps}
    if gamma:
        kw["gamma"] = rnd(D, dtype=dtype, scale=0.5)
    if affine:
        kw["weight"], kw["bias"] = rnd(D, dtype=dtype, scale=0.1, offset=1.0), rnd(D, dtype=dtype, scale=0.5)
    check((rnd(1, 257, D, dtype=dtype, scale=2.0, offset=0.3), rnd(1, 257, D, dtype=dtype)), kw, dtype)


@pytest.mark.parametrize("D", [72, 97])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plain_layernorm(D, dtype):
    x, w, b = rnd(257, D, dtype=dtype, scale=3.0, offset=-1.0), rnd(D, dtype=dtype, offset=1.0), rnd(D, dtype=dtype)
    check((x, None), {"weight": w, "bias": b, "eps": 1e-6}, dtype)
    y, n = residual_layernorm(x, None, None, w, b, 1e-6, backend="triton")
    assert y is x  # no residual: y is the input itself, nothing written


def test_many_programs_reduce_partial_sums(monkeypatch):
    # 4-row tiles at width 33 (BLOCK_C 64): 65 rows = 17 row blocks, two programs looping over 9 blocks each
    monkeypatch.setattr(BWD, "MAX_BLOCK_ELEMS", 256)
    assert BWD.fwd_blocks(65, 33)[:2] == BWD.bwd_blocks(65, 33)[:2] == (4, 64)
    assert BWD.bwd_programs(1, 17, torch.device("cpu")) == (2, 9)
    check((rnd(5, 13, 33), rnd(5, 13, 33)), {"gamma": rnd(33), "weight": rnd(33, offset=1.0), "bias": rnd(33)})


def naive(x, branch, gamma, w, b, eps):
    """The formulas written out in fp64: y = x + gamma * branch, n = (y - mean) / sqrt(var + eps) * w + b."""
    y = x.double() + gamma.double() * branch.double()
    mean = y.sum(-1, keepdim=True) / y.shape[-1]
    var = ((y - mean) ** 2).sum(-1, keepdim=True) / y.shape[-1]
    nh = (y - mean) / torch.sqrt(var + eps)
    return y, nh, nh * w.double() + b.double()


def test_matches_naive_formulas_forward_and_backward():
    # x and branch have different scales and gamma != 1: swapping x and branch, or gamma and w, changes every output
    R, D, eps = 19, 40, 1e-6
    x, br = rnd(R, D, scale=3.0, offset=1.0), rnd(R, D, scale=0.5)
    gamma, w, b = rnd(D, scale=0.5, offset=0.2), rnd(D, scale=0.2, offset=1.5), rnd(D)
    y, n = residual_layernorm(x, br, gamma, w, b, eps, backend="triton")
    y64, nh, n64 = naive(x, br, gamma, w, b, eps)
    torch.testing.assert_close(y.double(), y64, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(n.double(), n64, atol=1e-5, rtol=1e-5)
    gy, gn = torch.randn(R, D), torch.randn(R, D)
    dx, dbr, dgamma, dw, db = torch.autograd.grad((y, n), (x, br, gamma, w, b), (gy, gn))
    # dy_tot = gy + rstd * (g - mean(g) - n̂ mean(g n̂)), g = gn * w
    g = gn.double() * w.double()
    rstd = 1.0 / torch.sqrt(((y64 - y64.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True) + eps)
    d = gy.double() + rstd * (g - g.mean(-1, keepdim=True) - nh * (g * nh).mean(-1, keepdim=True))
    torch.testing.assert_close(dx.double(), d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dbr.double(), gamma.double() * d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dgamma.double(), (d * br.double()).sum(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dw.double(), (gn.double() * nh).sum(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(db.double(), gn.double().sum(0), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("use", ["y", "n"])
def test_gradient_from_one_output_only(use):
    leaves = [rnd(3, 7, 24, scale=2.0), rnd(3, 7, 24), rnd(24), rnd(24, offset=1.0), rnd(24)]
    grads = []
    for fn, kw in ((residual_layernorm, {"backend": "triton"}), (residual_layernorm_ref, {})):
        ls = [t.detach().clone().requires_grad_(True) for t in leaves]
        y, n = fn(*ls, eps=1e-6, **kw)
        out = y if use == "y" else n
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum(), ls,
                                         allow_unused=True))  # fmt: skip
    for a, b in zip(*grads):
        if b is None:  # the reference's graph does not reach w / b from y
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("gamma", [True, False])
def test_frozen_parameters(gamma):
    # a frozen backbone's block: gamma / w / b without grad, gradients to x and branch only (branch is then not read
    # by the backward, its gradient still gamma * d)
    D = 40
    params = (rnd(D, scale=0.5, grad=False) if gamma else None, rnd(D, offset=1.0, grad=False), rnd(D, grad=False))
    check((rnd(3, 11, D, scale=2.0), rnd(3, 11, D)), dict(zip(("gamma", "weight", "bias"), params)))


def test_no_gamma_branch_gradient_is_the_residual_gradient():
    # without LayerScale, d branch = d x: the backward writes one tensor for both (as autograd's add)
    x, br = rnd(5, 33), rnd(5, 33)
    y, n = residual_layernorm(x, br, None, None, None, 1e-5, backend="triton")
    dx, dbr = torch.autograd.grad((y.sum() + (n * torch.randn(5, 33)).sum()), (x, br))
    torch.testing.assert_close(dx, dbr, atol=0, rtol=0)


def test_bad_inputs_raise_one_clear_line():
    x = rnd(2, 5, 8)
    with pytest.raises(ValueError, match="branch must be a floating-point tensor of x's shape"):
        residual_layernorm(x, rnd(2, 5, 9), backend="triton")
    with pytest.raises(ValueError, match="gamma .* without a branch"):
        residual_layernorm(x, None, rnd(8), backend="triton")
    with pytest.raises(ValueError, match=r"weight must be a floating-point \(8,\) tensor"):
        residual_layernorm(x, rnd(2, 5, 8), None, rnd(7), backend="triton")


def test_min_bytes_floor():
    # (4, 8) fp32 with gamma and affine: forward reads x, branch (2 x 128 B) + 3 params (3 x 32 B), writes y, n;
    # backward reads dy, dn, y, branch + gamma, w, b and writes dx, dbranch + 3 parameter gradients
    x, br, p = torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(8)
    fwd = OP.min_bytes((x, br, p, p, p), {}, False)
    assert fwd == 4 * 128 + 3 * 32
    assert OP.min_bytes((x, br, p, p, p), {}, True) - fwd == 6 * 128 + 6 * 32
    # plain LayerNorm without affine: read x, write n; backward read dn, x, write dx
    assert OP.min_bytes((x, None), {}, True) == 5 * 128


@pytest.mark.parametrize("gamma", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_branch_bias_fold_matches_naive(gamma, dtype):
    """``branch_bias``: ``y = x + gamma * (branch + bb)`` against a naive transcription (the bias added to the branch
    first, as a biased Linear returns it), every gradient incl. ``d bb = sum_rows gamma * dy`` (rows 257, width 97:
    no full tile). ``bb`` and ``gamma`` are distinct random vectors, so swapping them (or adding bb after the scale)
    changes y."""
    D = 97
    x, br = rnd(1, 257, D, dtype=dtype, scale=2.0, offset=0.3), rnd(1, 257, D, dtype=dtype)
    kw = {"branch_bias": rnd(D, dtype=dtype, scale=0.5, offset=0.2), "weight": rnd(D, dtype=dtype, offset=1.0),
          "bias": rnd(D, dtype=dtype), "eps": 1e-6}  # fmt: skip
    if gamma:
        kw["gamma"] = rnd(D, dtype=dtype, scale=0.5, offset=0.5)
    check((x, br), kw, dtype)

    def naive(x, br, branch_bias, weight, bias, eps, gamma=None):
        y = x + (gamma if gamma is not None else 1.0) * (br + branch_bias)
        return y, F.layer_norm(y, (D,), weight, bias, eps)

    assert_op_matches(residual_layernorm, naive, (x, br), kw,
                      atol=OP.tolerances[dtype][0], rtol=OP.tolerances[dtype][1], ref_dtype=torch.float64,
                      atol_rms=True)  # fmt: skip


def test_branch_bias_needs_a_branch_and_its_width():
    x = rnd(2, 5, 8)
    with pytest.raises(ValueError, match="branch_bias"):
        residual_layernorm(x, None, branch_bias=rnd(8))
    with pytest.raises(ValueError, match="branch_bias"):
        residual_layernorm(x, rnd(2, 5, 8), branch_bias=rnd(7))


def test_branch_bias_frozen_parameters_only_bias_trains(monkeypatch):
    """The fold where only the branch bias trains (gamma / w / b frozen): its gradient still comes, from several
    programs' partials (small tiles), and matches the reference."""
    monkeypatch.setattr(BWD, "MAX_BLOCK_ELEMS", 256)
    kw = {"branch_bias": rnd(33), "gamma": rnd(33, grad=False), "weight": rnd(33, offset=1.0, grad=False)}
    check((rnd(5, 13, 33), rnd(5, 13, 33)), kw)

"""gram_loss (SSR): the tiled Triton kernels against the PyTorch reference, loss and both gradients, fp32 and fp16.

The default loss is a mean over B N^2 entries, so its gradients are tiny (~1e-5); the comparisons below multiply loss
and reference by the reduction's denominator (B N^2, B N or B: the sum of squares) so the gradients are O(1) and
absolute tolerances actually bite. The reductions and the raw / cosine Grams are also pinned to a naive formula.
"""

import importlib

import pytest
import torch

from pae_fast.kernels import OPS, gram_loss, gram_loss_ref, use_backend
from pae_fast.kernels.tools.testing import assert_cases_match, assert_op_matches

OP = OPS["gram_loss"]
# the package exports the function under the module's name: fetch the module itself for monkeypatching
gram_module = importlib.import_module("pae_fast.kernels.gram_loss")
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3)}  # on the B N^2-scaled loss and its gradients


def _check(z, target, normalize=True, dtype=torch.float32, reduction="mean"):
    """Fused vs fp64 reference on the summed loss (loss * den): value, grad z and grad target (if required)."""
    B, N, _ = z.shape
    k = float({"mean": B * N * N, "row_mean": B * N, "sum": B}[reduction])
    atol, rtol = TOL[dtype]
    assert_op_matches(
        lambda a, b, normalize, reduction, backend: gram_loss(a, b, normalize, backend, reduction) * k,
        lambda a, b, normalize, reduction: gram_loss_ref(a, b, normalize, reduction) * k,
        (z, target), {"normalize": normalize, "reduction": reduction}, atol=atol, rtol=rtol, ref_dtype=torch.float64,
        name=f"gram_loss {tuple(z.shape)} vs {tuple(target.shape)} normalize={normalize} {reduction} {dtype}",
    )  # fmt: skip


def _rnd(*shape, dtype=torch.float32, grad=True):
    """Tokens with norm ~1, so raw (normalize=False) Gram entries are O(1) like cosine ones."""
    return (torch.randn(*shape) / shape[-1] ** 0.5).to(dtype).requires_grad_(grad)


@pytest.mark.parametrize(
    "B, N, C1, C2, normalize, target_grad",
    [
        (1, 256, 32, 768, True, False),  # the PAE shapes: 32-d latent vs a 768-d structural target
        (3, 257, 33, 65, True, True),  # odd tokens and channels, both gradients
        (2, 257, 32, 768, False, True),  # raw inner products
    ],
)
def test_matches_reference_fp32(B, N, C1, C2, normalize, target_grad):
    _check(_rnd(B, N, C1), _rnd(B, N, C2, grad=target_grad), normalize)


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_fp16(normalize):
    _check(_rnd(2, 256, 65, dtype=torch.float16), _rnd(2, 256, 33, dtype=torch.float16), normalize, torch.float16)


@pytest.mark.parametrize("normalize", [True, False])
def test_small_tiles_multi_block(monkeypatch, normalize):
    """16-wide tiles: several (i, j) tiles (triangle weighting), K loops with masked tails, several channel blocks
    (the two-pass normalisation backward) and an all-zero token (norm below eps)."""
    monkeypatch.setattr(gram_module, "_tile_sizes", lambda N, C1, C2: (16, 16, 16, 16))
    z, t = torch.randn(1, 20, 33), torch.randn(1, 20, 20)
    z[0, 5] = 0.0
    t[0, 19] = 0.0
    _check(z.requires_grad_(), t.requires_grad_(), normalize)


@pytest.mark.parametrize("reduction", ["row_mean", "sum"])
@pytest.mark.parametrize("normalize", [True, False])
def test_reductions_match_reference(reduction, normalize):
    """The reductions are one scale of the same sum (forward and backward share the denominator): odd shapes, both
    gradients, fp32 and fp16."""
    _check(_rnd(2, 37, 33), _rnd(2, 37, 20), normalize, reduction=reduction)
    _check(_rnd(1, 41, 24, dtype=torch.float16), _rnd(1, 41, 17, dtype=torch.float16), normalize, torch.float16,
           reduction)  # fmt: skip


def _naive(z, t, gram, reduction):
    """The SSR formula written out: Grams of the (cosine: l2-normalised) tokens, squared differences summed over the
    N^2 entries of each sample, then / (B N^2) (mean), / (B N) (row_mean) or / B (sum)."""
    B, N = z.shape[:2]
    total = 0.0
    for b in range(B):
        x, y = z[b], t[b]
        if gram == "cosine":
            x = x / x.norm(dim=-1, keepdim=True)
            y = y / y.norm(dim=-1, keepdim=True)
        gz = torch.stack([torch.stack([x[i] @ x[j] for j in range(N)]) for i in range(N)])
        gt = torch.stack([torch.stack([y[i] @ y[j] for j in range(N)]) for i in range(N)])
        total = total + ((gz - gt) ** 2).sum()
    return total / {"mean": B * N * N, "row_mean": B * N, "sum": B}[reduction]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gram_and_reduction_options_match_the_naive_formula(backend):
    """Value and gradient of every (gram, reduction) pair against :func:`_naive`, on tokens whose norms vary (so raw
    and cosine differ) and B = 2, N = 5 (so the three reductions differ: factors N and N^2 = 5 and 25)."""
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(2, 5, 3, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0, 1.5, 0.7]).view(1, 5, 1)
    t0 = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    values = {}
    for gram in ("cosine", "raw"):
        for reduction in ("mean", "row_mean", "sum"):
            z = z0.clone().requires_grad_()
            want_z = z0.clone().requires_grad_()
            want = _naive(want_z, t0, gram, reduction)
            (gw,) = torch.autograd.grad(want, want_z)
            dtype = torch.float64 if backend == "torch" else torch.float32
            zz = z.to(dtype)
            got = gram_loss(zz, t0.to(dtype), normalize=gram == "cosine", reduction=reduction, backend=backend)
            (gg,) = torch.autograd.grad(got, z)
            tol = 1e-10 if backend == "torch" else 1e-5
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=0)
            torch.testing.assert_close(gg, gw, rtol=tol, atol=tol * float(gw.abs().max()))
            values[gram, reduction] = float(want.detach())
    for gram in ("cosine", "raw"):  # the reductions differ by exactly N and N^2 on the same Grams
        assert values[gram, "row_mean"] == pytest.approx(5 * values[gram, "mean"], rel=1e-12)
        assert values[gram, "sum"] == pytest.approx(25 * values[gram, "mean"], rel=1e-12)
    assert abs(values["raw", "mean"] / values["cosine", "mean"] - 1) > 0.1  # raw and cosine really differ here


def test_bad_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction must be one of mean, row_mean, sum, got 'avg'"):
        gram_loss(torch.randn(1, 4, 3), torch.randn(1, 4, 2), reduction="avg")


def test_op_table_cases_with_declared_tolerances():
    for dtype in (torch.float32, torch.float16):
        assert_cases_match(OP, dtype)


def test_non_contiguous_and_mixed_dtypes():
    z = torch.randn(40, 2, 33).transpose(0, 1).requires_grad_()  # token stride 2 * 33
    t = torch.randn(2, 24, 40).transpose(1, 2)  # channel stride 40
    _check(z, t.requires_grad_())
    z16, t32 = torch.randn(1, 20, 32, dtype=torch.float16), torch.randn(1, 20, 48)
    loss = gram_loss(z16, t32, backend="triton")
    assert loss.dtype == torch.float32 and gram_loss_ref(z16, t32).dtype == torch.float32
    torch.testing.assert_close(loss, gram_loss_ref(z16.double(), t32.double()).float(), atol=1e-7, rtol=1e-5)


def test_loss_values_and_invariances():
    z = torch.randn(2, 17, 32)
    # identical token geometry: zero loss, whatever the channel counts (cosine Gram is rotation/scale invariant)
    q, _ = torch.linalg.qr(torch.randn(64, 64))
    target = torch.cat([z, torch.zeros(2, 17, 32)], -1) @ q * 3.0
    assert gram_loss(z, target, backend="triton").abs().item() < 1e-6
    # an explicit value: one sample, two tokens, G_z = [[1, 0], [0, 1]], G_T = [[1, 1], [1, 1]] -> mean = 2 / 4
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    b = torch.tensor([[[1.0, 1.0, 0.0], [2.0, 2.0, 0.0]]])
    assert gram_loss(a, b, backend="triton").item() == pytest.approx(0.5, abs=1e-6)
    assert gram_loss_ref(a.double(), b.double()).item() == pytest.approx(0.5, abs=1e-12)


def test_only_the_required_gradients_are_computed(monkeypatch):
    calls = []
    real = gram_module._grad_of
    monkeypatch.setattr(gram_module, "_grad_of", lambda which_t, *a: calls.append(which_t) or real(which_t, *a))
    z = torch.randn(1, 20, 16, requires_grad=True)
    gram_loss(z, torch.randn(1, 20, 24), backend="triton").backward()
    assert calls == [False] and z.grad is not None
    t = torch.randn(1, 20, 24, requires_grad=True)
    gram_loss(torch.randn(1, 20, 16), t, backend="triton").backward()
    assert calls == [False, True] and t.grad is not None


def test_scope_switches_to_the_reference_exactly():
    z, t = torch.randn(2, 9, 33), torch.randn(2, 9, 5)
    with use_backend("torch"):
        assert torch.equal(gram_loss(z, t), gram_loss_ref(z, t))
        assert torch.equal(gram_loss(z, t, normalize=False), gram_loss_ref(z, t, normalize=False))


def test_reference_gradcheck_float64():
    z = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: gram_loss_ref(a, b, True), (z, t))
    assert torch.autograd.gradcheck(lambda a, b: gram_loss_ref(a, b, False), (z, t))


def test_meta_device_forward_backward():
    z = torch.empty(2, 257, 32, device="meta", requires_grad=True)
    t = torch.empty(2, 257, 768, device="meta", dtype=torch.float16, requires_grad=True)
    loss = gram_loss(z, t, backend="triton")
    assert loss.shape == () and loss.device.type == "meta" and loss.dtype == torch.float32
    loss.backward()
    assert z.grad.shape == z.shape and t.grad.shape == t.shape and t.grad.dtype == torch.float16


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match=r"share \(B, N\)"):
        gram_loss(torch.randn(2, 8, 4), torch.randn(2, 9, 4))
    with pytest.raises(ValueError, match=r"target must have shape \(B, N, C\)"):
        gram_loss(torch.randn(2, 8, 4), torch.randn(16, 4))
    with pytest.raises(TypeError, match="z must be a floating-point tensor"):
        gram_loss(torch.ones(2, 8, 4, dtype=torch.long), torch.randn(2, 8, 4))

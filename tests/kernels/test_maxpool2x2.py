"""maxpool2x2: 2x2 stride-2 max-pool without saved indices, against ``F.max_pool2d(x, 2, 2)`` and a naive
transcription of torch's window scan (row-major, replace on greater or NaN): output and input gradient bit-exact,
odd shapes (floor mode), ties, NaN, both layouts, fp32 and fp16."""

import pytest
import torch

from pae_fast.kernels import OPS, maxpool2x2, maxpool2x2_ref, use_backend
from pae_fast.kernels.tools.testing import assert_cases_match

OP = OPS["maxpool2x2"]
NAN = float("nan")


def _naive(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y and dx by the rule written out: scan each window top-left, top-right, bottom-left, bottom-right; an element
    replaces the running max when greater or NaN; dx = dy at the chosen element, 0 elsewhere (odd edges: 0)."""
    B, C, H, W = x.shape
    y = torch.empty(B, C, H // 2, W // 2, dtype=x.dtype)
    dx = torch.zeros(B, C, H, W, dtype=x.dtype)
    for n in range(B):
        for c in range(C):
            for i in range(H // 2):
                for j in range(W // 2):
                    best, arg = None, None
                    for dh, dw in ((0, 0), (0, 1), (1, 0), (1, 1)):
                        v = float(x[n, c, 2 * i + dh, 2 * j + dw])
                        if best is None or v > best or v != v:
                            best, arg = v, (2 * i + dh, 2 * j + dw)
                    y[n, c, i, j] = best
                    dx[n, c, arg[0], arg[1]] = dy[n, c, i, j]
    return y, dx


def _fused(x: torch.Tensor, dy: torch.Tensor, backend: str = "triton") -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = maxpool2x2(x, backend=backend)
    y.backward(dy)
    return y, x.grad


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal values with NaN in the same places (max-pool only copies elements)."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cases_match_reference(dtype):
    assert_cases_match(OP, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C", [3, 5, 64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_odd_shapes_bit_exact_against_torch(C, channels_last, dtype):
    """H, W = 7, 9: the last row and column belong to no window (floor mode) and get a zero gradient."""
    g = torch.Generator().manual_seed(C)
    x = torch.randn(2, C, 7, 9, generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    dy = torch.randn(2, C, 3, 4, generator=g).to(dtype)
    y, dx = _fused(x, dy)
    y_ref, dx_ref = _fused(x, dy, backend="torch")
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert (dx[:, :, 6, :] == 0).all() and (dx[:, :, :, 8] == 0).all()
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert dx.stride() == x.stride() and y.dtype == dx.dtype == dtype


def test_naive_rule_with_ties_and_nan():
    """One window per rule: all equal (first wins), equal pairs in every two positions, NaN first / middle / last /
    twice (NaN out, gradient to the LAST NaN), -inf only; checked against the naive scan and against torch."""
    windows = [
        [1, 1, 1, 1], [0, 2, 2, 1], [2, 0, 2, 1], [2, 1, 0, 2], [0, 1, 2, 2], [-0.0, 0.0, 0.0, -0.0],
        [NAN, 5, 1, 1], [2, NAN, 5, 1], [1, 2, 3, NAN], [NAN, 1, NAN, 0], [1, NAN, 3, NAN],
        [-float("inf")] * 4, [3, 1, 4, 1],
    ]  # fmt: skip
    k = len(windows)
    x = torch.zeros(1, 1, 2, 2 * k)
    for i, w in enumerate(windows):
        x[0, 0, :, 2 * i : 2 * i + 2] = torch.tensor(w, dtype=torch.float32).view(2, 2)
    x = x.repeat(2, 3, 1, 1)  # a few channels and images, same windows
    dy = torch.arange(1.0, 1.0 + x.numel() // 4).view(2, 3, 1, k)  # distinct: a misrouted gradient shows
    want_y, want_dx = _naive(x, dy)
    for dtype in (torch.float32, torch.float16):
        for cl in (False, True):
            xi = x.to(dtype)
            xi = xi.contiguous(memory_format=torch.channels_last) if cl else xi
            y, dx = _fused(xi, dy.to(dtype))
            assert _same(y.float(), want_y) and torch.equal(dx.float(), want_dx), (dtype, cl)
            y_ref, dx_ref = _fused(xi, dy.to(dtype), backend="torch")  # the naive rule is torch's
            assert _same(y_ref.float(), want_y) and torch.equal(dx_ref.float(), want_dx), (dtype, cl)
    assert torch.equal(torch.signbit(y[0, 0, 0, 5]), torch.tensor(True))  # -0.0 first among +-0: kept bit-exact


def test_random_against_naive_rule_with_many_ties():
    """Values in {-1, 0, 1} on a 5 x 7 grid: most windows tie; naive scan, fused and torch agree bit for bit."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-1, 2, (2, 3, 5, 7), generator=g).float()
    dy = torch.randn(2, 3, 2, 3, generator=g)
    want_y, want_dx = _naive(x, dy)
    y, dx = _fused(x.contiguous(memory_format=torch.channels_last), dy)
    assert torch.equal(y, want_y) and torch.equal(dx, want_dx)
    assert torch.equal(dx, _fused(x, dy, backend="torch")[1])


def test_strided_views_and_expanded_gradient():
    """A permuted view as input (odd strides) and ``y.sum().backward()`` (a stride-0 upstream gradient)."""
    base = torch.randn(2, 9, 7, 5, generator=torch.Generator().manual_seed(1))
    x = base.permute(0, 3, 1, 2).requires_grad_(False)  # (2, 5, 9, 7), neither layout
    x1, x2 = x.clone().requires_grad_(True), x.detach().requires_grad_(True)
    maxpool2x2(x2, backend="triton").sum().backward()
    maxpool2x2_ref(x1).sum().backward()
    assert torch.equal(x2.grad, x1.grad)
    assert torch.equal(maxpool2x2(x, backend="triton"), maxpool2x2_ref(x))


def test_saves_no_indices():
    """What autograd keeps for backward is x alone (no int64 index tensor, as torch's max_pool2d saves)."""
    saved: list[torch.Tensor] = []
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        maxpool2x2(x, backend="triton")
    assert len(saved) == 1 and saved[0].dtype == x.dtype and saved[0].shape == x.shape
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        maxpool2x2_ref(x)
    assert any(t.dtype == torch.int64 for t in saved)  # the hook does see torch's indices


def test_bad_input_and_scope():
    with pytest.raises(ValueError, match="H and W must be >= 2"):
        maxpool2x2(torch.randn(1, 2, 1, 4))
    with pytest.raises(ValueError, match="floating"):
        maxpool2x2(torch.ones(1, 2, 4, 4, dtype=torch.int64))
    x = torch.randn(2, 3, 5, 4)
    with use_backend("torch"):
        assert torch.equal(maxpool2x2(x), maxpool2x2_ref(x))
    assert maxpool2x2(x.double(), backend="triton").dtype == torch.float64  # fp64: the reference


def test_meta_device_forward_backward():
    x = torch.empty(2, 64, 9, 8, device="meta").contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = maxpool2x2(x, backend="triton")
    assert y.shape == (2, 64, 4, 4) and y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.stride() == x.stride()

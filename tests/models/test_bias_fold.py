"""The branch-bias fold in the generator blocks: ``forward_unbiased`` of the branch modules, the gated residual with a
bias (fused and plain), and whole models whose gradients match the unfolded computation
(docs/method.md § Gated-residual bias fold)."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pae_fast import kernels
from pae_fast.kernels import interpreter_enabled, use_backend
from pae_fast.models.layers import Attention, Mlp, NextNorm, RMSNorm, SwiGLU, gated_residual

BACKENDS = ["torch"] + (["triton"] if interpreter_enabled() else [])


def _unfold(module_cls):
    """Patch ``forward_unbiased`` to return the biased output and no bias: the computation before the fold."""
    return mock.patch.object(module_cls, "forward_unbiased", lambda self, *a: (self(*a), None))


@pytest.mark.parametrize(
    "make,args",
    [
        (lambda: Attention(48, 4, qk_norm=True), lambda: (torch.randn(2, 5, 48), kernels.rope_2d_tables(1, 5, 12))),
        (lambda: Attention(48, 4), lambda: (torch.randn(2, 5, 48),)),
        (lambda: SwiGLU(48, 40), lambda: (torch.randn(2, 5, 48),)),
        (lambda: Mlp(48, 2.0), lambda: (torch.randn(2, 5, 48),)),
    ],
)
def test_forward_unbiased_is_forward_without_the_last_bias(make, args):
    torch.manual_seed(0)
    m, a = make(), args()
    last = m.proj if isinstance(m, Attention) else m.w3 if isinstance(m, SwiGLU) else m.fc2
    with torch.no_grad():
        last.bias.normal_()
    calls = []
    m.register_forward_hook(lambda *_: calls.append(1))  # module hooks (profilers, FLOP counters) still fire
    with use_backend("torch"):
        y, b = m.forward_unbiased(*a)
        full = m(*a)
    assert b is last.bias and len(calls) == 2
    torch.testing.assert_close(y + b, full, atol=1e-6, rtol=1e-6)
    assert (full - y).sub(b).abs().max() < 1e-5 and b.abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_kind", ["sample", "token"])
@pytest.mark.parametrize("fused", [True, False])
def test_gated_residual_with_bias(backend, gate_kind, fused):
    B, N, D = 2, 5, 40
    gate_shape = (B, D) if gate_kind == "sample" else (B, N, D)
    leaves = [torch.randn(B, N, D), torch.randn(B, N, D), torch.randn(*gate_shape), torch.randn(D)]
    x, y, gate, bias = (t.requires_grad_(True) for t in leaves)
    norm = RMSNorm(D)
    nxt = NextNorm(norm, torch.randn(B, D), torch.randn(B, D) * 0.5) if fused else None
    with use_backend(backend):
        r, h = gated_residual(x, y, gate, nxt, bias)
    g = gate.unsqueeze(1) if gate.dim() == 2 else gate
    r_want = x + g * (y + bias)
    torch.testing.assert_close(r, r_want, atol=1e-5, rtol=1e-5)
    if fused:
        h_want = norm(r_want) * (1 + nxt.scale[:, None]) + nxt.shift[:, None]
        torch.testing.assert_close(h, h_want, atol=1e-5, rtol=1e-5)
    else:
        assert h is None
        h, h_want = r, r_want
    up = torch.randn(B, N, D)
    got = torch.autograd.grad((r * up).sum() + h.sum(), (x, y, gate, bias))
    want = torch.autograd.grad((r_want * up).sum() + h_want.sum(), (x, y, gate, bias))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", [("LightningDiT-B/2", {}), ("LightningDiT-B/2", {"use_swiglu": False}),
                                     ("DiTDH-S", {"wo_shift": True})])  # fmt: skip
def test_folded_model_matches_the_unfolded_one(tiny, inputs, backend, name, kw):
    """Output and every parameter gradient (the folded biases' included) equal the bias-in-the-linear model's."""
    m = tiny(name, **kw).train()
    x, t, y = inputs(m)
    results = []
    for unfold in (False, True):
        torch.manual_seed(3)  # the same label dropout
        ctx = contextlib.ExitStack()
        if unfold:
            for cls in (Attention, SwiGLU, Mlp):
                ctx.enter_context(_unfold(cls))
        with ctx, use_backend(backend):
            v = m(x, t, y)
            params = [p for p in m.parameters() if p.requires_grad]
            grads = torch.autograd.grad((v * torch.linspace(-1, 1, v.shape[-1])).sum(), params, allow_unused=True)
        results.append((v, grads))
    (v, g), (v_ref, g_ref) = results
    torch.testing.assert_close(v, v_ref, atol=2e-5, rtol=1e-4)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any(n.endswith("attn.proj.bias") for n in names) and any(n.endswith(("w3.bias", "fc2.bias")) for n in names)
    for n, a, e in zip(names, g, g_ref):
        if e is None:
            assert a is None, n
        else:
            torch.testing.assert_close(a, e, atol=5e-5, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")


class _BackwardSums(TorchDispatchMode):
    """Shapes of the tensors reduced by ``sum`` while autograd runs backward."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("sum") and torch._C._current_graph_task_id() != -1:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_no_backward_bias_sum_over_the_rows_of_proj_or_w3():
    """The biases of ``attn.proj`` and ``mlp.w3`` get their gradients from the fused residual's backward: no
    ``sum`` over a ``(B*N, D)`` gradient in the block (counted on meta with the fused ops' fake implementations)."""
    from pae_fast.kernels._dispatch import counting_only
    from pae_fast.registry import create_generator

    B, D = 2, 64
    with torch.device("meta"):
        m = create_generator("LightningDiT-B/2", depth=2, hidden_size=D, num_heads=4, in_channels=4, input_size=8,
                             num_classes=3).train()  # fmt: skip
    x, t = torch.empty(B, 4, 8, 8, device="meta"), torch.empty(B, device="meta")
    y = torch.zeros(B, dtype=torch.long, device="meta")
    sums = _BackwardSums()
    with use_backend("triton"), counting_only():
        v = m(x, t, y)
        with sums:
            v.sum().backward()
    N = 16
    assert sums.shapes, "the backward still reduces the qkv / adaLN biases"
    assert not [s for s in sums.shapes if s[-1] == D and (s[0] * (s[1] if len(s) > 2 else 1)) == B * N], sums.shapes
    assert m.blocks[0].attn.proj.bias.grad is not None and m.blocks[0].mlp.w3.bias.grad is not None

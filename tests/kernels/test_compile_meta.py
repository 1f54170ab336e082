"""Every registered op (``pae_fast.kernels.OPS``) on the meta device and under ``torch.compile(fullgraph=True)``.

(a) forward + backward on the meta device with ``backend="triton"`` (the fake implementations) gives the
    reference's output shapes/dtypes and gradients shaped like their inputs, for every "small" case;
(b) ``torch.compile(fullgraph=True, backend="aot_eager")`` of a function calling the op with ``backend="triton"``
    traces without graph breaks and matches eager, forward and every gradient (CPU, Triton interpreter).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pae_fast.kernels import OPS
from pae_fast.kernels.tools.testing import assert_op_matches, flatten_tensors

NAMES = sorted(OPS)


def _to_meta(x: Any, dtype: torch.dtype | None = None) -> Any:
    """Meta copy keeping shape, strides (views of a bigger buffer stay views) and requires_grad."""
    if isinstance(x, torch.Tensor):
        dt = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
        base = torch.empty_strided(x.shape, x.stride(), dtype=dt, device="meta")
        return base.requires_grad_(x.requires_grad and x.is_floating_point())
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _to_meta(v, dtype) for k, v in x.items()}
    return x


def _leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [t for t in flatten_tensors(list(args)) + flatten_tensors(list(kwargs.values())) if t.requires_grad]


def _meta_grads(outs: list[torch.Tensor], leaves: list[torch.Tensor]) -> list[torch.Tensor | None]:
    outs = [o for o in outs if o.requires_grad]
    if not outs or not leaves:
        return []
    return list(torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs], allow_unused=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_meta_forward_backward_matches_reference_shapes(name, dtype):
    spec = OPS[name]
    for label, args, kwargs in spec.cases("small", torch.device("cpu"), torch.float32):
        f_args, f_kw = _to_meta(args, dtype), _to_meta(kwargs, dtype)
        r_args, r_kw = _to_meta(args, dtype), _to_meta(kwargs, dtype)
        f_out = flatten_tensors(spec.fn(*f_args, **f_kw, backend="triton"))
        r_out = flatten_tensors(spec.ref(*r_args, **r_kw))
        assert [(tuple(o.shape), o.dtype) for o in f_out] == [(tuple(o.shape), o.dtype) for o in r_out], label
        assert all(o.device.type == "meta" for o in f_out), label
        f_leaves, r_leaves = _leaves(f_args, f_kw), _leaves(r_args, r_kw)
        f_grads, r_grads = _meta_grads(f_out, f_leaves), _meta_grads(r_out, r_leaves)
        for leaf, g, rg in zip(f_leaves, f_grads, r_grads):
            if rg is None:  # the reference's graph does not reach this input: the fused one need not either
                continue
            assert g is not None, f"{name} {label}: no gradient for an input of shape {tuple(leaf.shape)}"
            assert (g.shape, g.dtype, g.device.type) == (leaf.shape, leaf.dtype, "meta"), label


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_matches_eager(name):
    spec = OPS[name]
    label, args, kwargs = spec.cases("small", torch.device("cpu"), torch.float32)[0]

    def call(*a, **kw):
        return spec.fn(*a, **kw, backend="triton")

    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def recording_aot_eager(gm, example_inputs):  # aot_eager, keeping the Dynamo graph for the checks below
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend=recording_aot_eager)

    def run_compiled(*a, **kw):
        torch.manual_seed(0)  # ops that draw noise see the same stream on both sides
        return compiled(*a, **kw)

    def run_eager(*a, **kw):
        torch.manual_seed(0)
        return call(*a, **kw)

    atol, rtol = spec.tolerances[torch.float32]
    assert_op_matches(run_compiled, run_eager, args, kwargs, atol=atol, rtol=rtol, name=f"{name} {label} compiled",
                      fused_kwargs={})  # fmt: skip
    assert len(graphs) == 1, f"{name}: expected one graph, got {len(graphs)}"
    # the graph and its subgraphs (an autograd.Function traces to a higher-order op with forward/backward bodies)
    code = "\n".join(m.code for m in graphs[0].modules() if isinstance(m, torch.fx.GraphModule))
    if name in dir(torch.ops.pae_fast):  # a custom op pae_fast::<name> stays one opaque node in the graph
        assert f"pae_fast.{name}" in code, f"{name}: the custom op is not in the traced graph:\n{code}"

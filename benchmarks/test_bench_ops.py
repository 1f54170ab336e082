"""pytest-benchmark suite: every fused op against its reference and ``torch.compile`` of the reference.

Forward (inputs requiring grad, so it is the training forward) and forward + backward (gradients of every input
that requires them, upstream gradient of ones), per case of :mod:`bench_ops_cases`. On CUDA each call ends with
``torch.cuda.synchronize()``. ``extra_info`` holds the op's minimum traffic (``OpSpec.min_bytes``) and the
bandwidth that traffic implies at the median time (``floor_GBps``: how close the op runs to the memory roofline).
Parametrised in ``conftest.py`` over op cases x ``fused | reference | compiled`` x ``fwd | fwd+bwd``.

    make bench                                   # CPU: references only, small cases
    pytest benchmarks/test_bench_ops.py -m benchmark --benchmark-enable --benchmark-json ops.json   # on a GPU
"""

from __future__ import annotations

import pytest
import torch
from bench_ops_cases import OpCase, leaves_of, op_callable

pytestmark = pytest.mark.benchmark

INTERPRETER_SKIP = (
    "Triton timing needs CUDA: on CPU the fused kernels run in the Triton interpreter, "
    "a correctness tool that is not a speed path (validated by tests, timed on GPUs only)"
)


def test_op(benchmark, op_case: OpCase, impl: str, mode: str) -> None:
    from pae_fast import kernels
    from pae_fast.kernels.tools.testing import flatten_tensors

    if impl == "fused" and op_case.device.type != "cuda":
        pytest.skip(INTERPRETER_SKIP)
    spec = kernels.OPS[op_case.op]
    fn = op_callable(op_case, impl)
    args, kwargs = op_case.args, op_case.kwargs
    leaves = leaves_of(op_case)
    cuda = op_case.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(op_case.device)

    # untimed first call: compilation, autotuning, allocator warm-up; also gives the output shapes
    try:
        outs = [o for o in flatten_tensors(fn(*args, **kwargs)) if o.requires_grad]
    except Exception as e:
        if impl != "compiled":
            raise
        # e.g. a reference that launches a Triton kernel cannot be traced under the CPU interpreter
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        pytest.skip(f"torch.compile of {op_case.op}_ref failed: {type(e).__name__}: {msg}")
    grads = [torch.ones_like(o) for o in outs]
    backward = mode == "fwd+bwd" and bool(outs and leaves)
    if mode == "fwd+bwd" and not backward:
        pytest.skip(f"{op_case.id}: no differentiable output/input in this case")
    if backward:
        torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    del outs
    sync()

    def run_fwd() -> None:
        fn(*args, **kwargs)
        sync()

    def run_fwd_bwd() -> None:
        o = [t for t in flatten_tensors(fn(*args, **kwargs)) if t.requires_grad]
        torch.autograd.grad(o, leaves, grads, allow_unused=True)
        sync()

    benchmark.group = f"{op_case.id} {mode}"
    min_bytes = int(spec.min_bytes(args, kwargs, backward))
    benchmark.extra_info.update(
        op=op_case.op, case=op_case.label, impl=impl, mode=mode, device=str(op_case.device),
        dtype=str(op_case.dtype).replace("torch.", ""), min_bytes=min_bytes,
    )  # fmt: skip
    benchmark(run_fwd_bwd if backward else run_fwd)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info["floor_GBps"] = min_bytes / stats.stats.median / 1e9

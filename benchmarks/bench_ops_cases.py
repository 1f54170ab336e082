"""The op cases the pytest-benchmark suite times: every op of ``pae_fast.kernels.OPS`` on its own test cases.

CUDA: the "model" cases (real widths: 1152, 2048, head_dim 72/128, 256 tokens) in bf16, every case. CPU: the
"small" cases in fp32, first case only (the references and their compiled versions; Triton's interpreter is not
a speed path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

IMPLS = ("fused", "reference", "compiled")
MODES = ("fwd", "fwd+bwd")


@dataclass
class OpCase:
    id: str
    op: str
    index: int
    label: str
    args: tuple
    kwargs: dict
    device: torch.device
    dtype: torch.dtype
    compiled: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def __repr__(self) -> str:  # keeps pytest's output short
        return self.id


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--bench-device cuda was asked for but no CUDA device is available")
    return torch.device(device)


def collect_cases(
    size: str = "auto", max_cases: int | None = None, ops: str | None = None, device: str = "auto"
) -> list[OpCase]:
    """Build (on the device) the cases of every selected op; see the module docstring for the defaults."""
    from pae_fast import kernels

    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    size = ("model" if on_cuda else "small") if size == "auto" else size
    dtype = torch.bfloat16 if on_cuda else torch.float32
    max_cases = (None if on_cuda else 1) if max_cases is None else max_cases
    names = sorted(kernels.OPS)
    if ops:
        wanted = [o.strip() for o in ops.split(",") if o.strip()]
        bad = [o for o in wanted if o not in kernels.OPS]
        if bad:
            raise ValueError(f"--bench-ops: unknown op(s) {bad}; valid: {', '.join(names)}")
        names = wanted
    out = []
    for name in names:
        spec = kernels.OPS[name]
        for i, (label, args, kwargs) in enumerate(spec.cases(size, dev, dtype)[:max_cases]):
            out.append(OpCase(f"{name}[{i}]", name, i, label, args, kwargs, dev, dtype))
    return out


def leaves_of(case: OpCase) -> list[torch.Tensor]:
    from pae_fast.kernels.tools.testing import flatten_tensors

    tensors = flatten_tensors(list(case.args)) + flatten_tensors(list(case.kwargs.values()))
    return [t for t in tensors if t.requires_grad]


def op_callable(case: OpCase, impl: str) -> Callable[..., Any]:
    """``fused`` (``backend="triton"``), ``reference`` (``<op>_ref``) or ``compiled`` (``torch.compile(<op>_ref)``,
    one compiled function per case, shared by the forward and forward+backward benchmarks)."""
    from pae_fast import kernels

    spec = kernels.OPS[case.op]
    if impl == "fused":
        return lambda *a, **k: spec.fn(*a, **k, backend="triton")
    if impl == "reference":
        return spec.ref
    if impl == "compiled":
        if "fn" not in case.compiled:
            case.compiled["fn"] = torch.compile(spec.ref, dynamic=False)
        return case.compiled["fn"]
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

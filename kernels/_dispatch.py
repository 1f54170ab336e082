"""Backend dispatch for the fused ops: ``auto | triton | torch``, per call, per scope and per process.

Precedence: the ``backend=`` argument of a call, then the innermost ``use_backend(...)`` scope, then the process
default read once from ``PAE_FAST_KERNEL_BACKEND`` (default ``auto``).

- ``auto``: Triton on CUDA tensors, the PyTorch reference otherwise.
- ``torch``: always the reference ``<op>_ref``.
- ``triton``: always the fused kernel; raises :class:`BackendUnavailable` with the reason when it cannot run.
  Triton runs on CUDA tensors, on CPU tensors only under ``TRITON_INTERPRET=1`` (set before triton is imported),
  and on the meta device through each op's fake implementation (shape/traffic counting without memory).

State is plain module globals (no contextvars) so ``torch.compile`` can trace through the dispatch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailable",
    "OpSpec",
    "OPS",
    "register_op",
    "use_backend",
    "current_backend",
    "process_backend",
    "resolve_backend",
    "triton_unavailable_reason",
    "interpreter_enabled",
    "counting_only",
    "counting_active",
    "gemm_input_dtype",
]

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "PAE_FAST_KERNEL_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


_PROCESS_BACKEND: list[str] = []  # filled once from the environment
_SCOPE_STACK: list[str] = []
_TRITON_IMPORT_ERROR: list[str | None] = []  # cached result of the triton import check
_COUNTING: list[bool] = []  # non-empty inside counting_only()


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} ({where}); valid: {', '.join(BACKENDS)}")
    return name


def process_backend() -> str:
    """The process-wide default, read once from ``PAE_FAST_KERNEL_BACKEND``."""
    if not _PROCESS_BACKEND:
        _PROCESS_BACKEND.append(_check_name(os.environ.get(ENV_VAR, "auto") or "auto", f"environment {ENV_VAR}"))
    return _PROCESS_BACKEND[0]


def current_backend() -> str:
    """The backend in force for calls that pass no ``backend=``."""
    return _SCOPE_STACK[-1] if _SCOPE_STACK else process_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Scope the kernel backend: ``with pae_fast.kernels.use_backend("torch"): ...``."""
    _SCOPE_STACK.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _SCOPE_STACK.pop()


@contextlib.contextmanager
def counting_only() -> Iterator[None]:
    """Let ``triton`` resolve on any device, for counting under ``FakeTensorMode`` (no kernel ever runs).

    ``benchmarks/roofline.py`` counts a step on fake CPU tensors (CPU autocast stands in for CUDA's, which the meta
    device lacks); the fused ops' fake implementations then run as they would while tracing a CUDA model.
    """
    _COUNTING.append(True)
    try:
        yield
    finally:
        _COUNTING.pop()


def counting_active() -> bool:
    """True inside :func:`counting_only` (the fake tensors stand for CUDA ones, whatever their device)."""
    return bool(_COUNTING)


def gemm_input_dtype(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.dtype:
    """dtype of a fused op's output that feeds a GEMM: ``out_dtype`` when given, else the autocast dtype when autocast
    is on for ``x``'s device type (the GEMM would cast to it anyway: the op writes it directly), else ``x.dtype``."""
    if out_dtype is not None:
        return out_dtype
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except RuntimeError:  # a device type without autocast (meta)
        pass
    return x.dtype


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_import_error() -> str | None:
    if not _TRITON_IMPORT_ERROR:
        if importlib.util.find_spec("triton") is None:
            _TRITON_IMPORT_ERROR.append("the triton package is not installed (pip install triton)")
        else:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401

                _TRITON_IMPORT_ERROR.append(None)
            except Exception as e:  # a broken install should explain itself, not crash dispatch
                _TRITON_IMPORT_ERROR.append(f"importing triton failed: {e}")
    return _TRITON_IMPORT_ERROR[0]


def triton_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why Triton kernels cannot run on ``device`` (None when they can)."""
    err = _triton_import_error()
    if err is not None:
        return err
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if dev.type == "meta":
        return None  # fake implementations: shapes and traffic only
    if dev.type == "cpu":
        if interpreter_enabled():
            return None
        return (
            "Triton kernels need CUDA tensors; on CPU they run only under the interpreter "
            "(set TRITON_INTERPRET=1 in the environment before triton is imported)"
        )
    return f"Triton kernels do not run on device type {dev.type!r}"


def resolve_backend(backend: str | None, *tensors: torch.Tensor | None) -> str:
    """Return ``"triton"`` or ``"torch"`` for a call on ``tensors`` (the first tensor's device decides)."""
    name = _check_name(backend, "backend= argument") if backend is not None else current_backend()
    if name == "torch":
        return "torch"
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    if name == "triton":
        reason = triton_unavailable_reason("meta" if _COUNTING else device)
        if reason is not None:
            raise BackendUnavailable(f"kernel backend 'triton' cannot run on {device}: {reason}")
        return "triton"
    # auto: Triton on CUDA tensors, the reference otherwise.
    return "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "torch"


@dataclass
class OpSpec:
    """What the tools (info, validate, benchmarks, roofline) need to know about a fused op.

    Attributes:
        name: public name (``pae_fast.kernels.<name>``).
        fn: the public function (takes ``backend=``).
        ref: the PyTorch reference ``<name>_ref`` (the spec).
        min_bytes: ``min_bytes(args, kwargs, backward) -> int``: the op's minimum memory traffic, every input read
            once and every output written once (forward; with ``backward`` also the backward pass's).
        cases: ``cases(size, device, dtype) -> list[(label, args, kwargs)]``; ``size`` is "small" (tests,
            interpreter) or "model" (real widths, for GPU validation and benchmarks). Floating tensors that
            should receive gradients have ``requires_grad`` set.
        backends: ``backends() -> {backend: reason or None}``; defaults to triton/torch.
        tolerances: ``{dtype: (atol, rtol)}`` used by validate and tests.
        description: one line for ``python -m pae_fast.kernels.info``.
        flops: for an op that is mostly GEMM (its Triton kernels and cuBLAS calls do matrix products):
            ``flops(args, kwargs, backward) -> int``, the GEMM FLOPs (2 per multiply-accumulate) of the forward, or
            with ``backward`` of forward + backward (the convention of ``min_bytes``). The traffic counter then counts
            its custom ops in the ``matmul`` category: it calls ``flops((), named, False)`` on the forward op
            ``pae_fast::<name>`` and ``flops((), named, True) - flops((), named, False)`` on ``<name>_backward``,
            ``named`` being each op's schema-bound arguments (so their names must match the public function's).
            None: a bandwidth-bound op.
        atol_rms: compare with ``atol`` scaled by each reference tensor's RMS where it exceeds 1 (an op whose outputs
            or gradients are sums over many rows, e.g. a GEMM's weight gradient over all tokens: their rounding error
            grows with that scale, so a fixed ``atol`` cannot hold at model sizes in half precision).
    """

    name: str
    fn: Callable[..., Any]
    ref: Callable[..., Any]
    min_bytes: Callable[[tuple, dict, bool], int]
    cases: Callable[[str, torch.device, torch.dtype], list[tuple[str, tuple, dict]]]
    description: str = ""
    backends: Callable[[], dict[str, str | None]] | None = None
    flops: Callable[[tuple, dict, bool], int] | None = None
    atol_rms: bool = False
    tolerances: dict[torch.dtype, tuple[float, float]] = field(
        default_factory=lambda: {
            torch.float64: (1e-10, 1e-10),
            torch.float32: (1e-5, 1e-5),
            torch.float16: (2e-3, 2e-3),
            torch.bfloat16: (1.6e-2, 1.6e-2),
        }
    )

    def available_backends(self) -> dict[str, str | None]:
        if self.backends is not None:
            return self.backends()
        return {"triton": triton_unavailable_reason(), "torch": None}


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    """Add an op to the table used by ``info``, ``validate`` and the benchmarks."""
    if spec.name in OPS and OPS[spec.name].fn is not spec.fn:
        raise KeyError(f"kernel op {spec.name!r} registered twice")
    OPS[spec.name] = spec
    return spec


def tensor_bytes(*tensors: Any) -> int:
    """Bytes of the given tensors (None and non-tensors count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def declared_gemm_flops(name: str, named: dict[str, Any], backward: bool) -> int | None:
    """GEMM FLOPs of one call of op ``name`` whose ``OpSpec`` declares ``flops`` (a GEMM with a fused epilogue; None
    for any other op): the forward's, or with ``backward`` the backward op's (``flops(.., True) - flops(.., False)``),
    from the custom op's schema-bound arguments ``named``."""
    spec = OPS.get(name)
    if spec is None or spec.flops is None:
        return None
    fwd = int(spec.flops((), named, False))
    return int(spec.flops((), named, True)) - fwd if backward else fwd

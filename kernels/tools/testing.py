"""Compare a fused op with its reference, forward and every gradient, with verbose mismatch reports.

Used by the tests, by ``python -m pae_fast.kernels.validate`` and by anyone checking a kernel on new hardware.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Mismatch", "CompareResult", "compare_op", "assert_op_matches", "assert_cases_match", "flatten_tensors",
           "feature_maps", "lin_head"]


@dataclass
class Mismatch:
    """One compared tensor (an output or a gradient)."""

    what: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool
    detail: str = ""


@dataclass
class CompareResult:
    name: str
    rows: list[Mismatch]

    @property
    def ok(self) -> bool:
        """Every compared tensor within tolerance, and at least one tensor compared (an empty comparison fails)."""
        return bool(self.rows) and all(r.ok for r in self.rows)

    def report(self) -> str:
        lines = [f"{self.name}: {'OK' if self.ok else 'MISMATCH'}"]
        if not self.rows:
            lines.append("  [BAD] nothing was compared (neither side returned a tensor)")
        for r in self.rows:
            flag = "ok " if r.ok else "BAD"
            lines.append(
                f"  [{flag}] {r.what:<28} max|d|={r.max_abs:.3e} max rel={r.max_rel:.3e} "
                f"(atol={r.atol:.1e}, rtol={r.rtol:.1e}){' ' + r.detail if r.detail else ''}"
            )
        return "\n".join(lines)


def flatten_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_tensors(o)]
    return []


def _compare(
    what: str, a: torch.Tensor | None, b: torch.Tensor | None, atol: float, rtol: float, atol_rms: bool = False
) -> Mismatch:
    if a is None or b is None:
        ok = a is None and b is None
        return Mismatch(what, 0.0, 0.0, atol, rtol, ok, "" if ok else f"one side is None (fused={a is None})")
    if a.shape != b.shape:
        shapes = f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        return Mismatch(what, float("inf"), float("inf"), atol, rtol, False, shapes)
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    if atol_rms and b64.numel():  # atol relative to the reference's scale (sums over many rows: GEMM gradients)
        atol = atol * max(1.0, float(b64.nan_to_num(0.0).pow(2).mean().sqrt()))
    finite_a, finite_b = torch.isfinite(a64), torch.isfinite(b64)
    if not torch.equal(finite_a, finite_b):
        n = int((finite_a != finite_b).sum())
        return Mismatch(what, float("inf"), float("inf"), atol, rtol, False, f"{n} non-finite mismatches")
    diff = (a64 - b64).abs().nan_to_num(0.0)
    rel = diff / b64.abs().clamp_min(1e-12)
    bad = diff > atol + rtol * b64.abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float(rel.max()) if rel.numel() else 0.0
    detail = ""
    if bad.any():
        idx = int(torch.argmax(diff - (atol + rtol * b64.abs())))
        loc = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), diff.shape)) if diff.dim() else ()
        detail = (
            f"{int(bad.sum())}/{bad.numel()} elements out of tolerance; worst at {loc}: "
            f"fused={a64.flatten()[idx].item():.6g} ref={b64.flatten()[idx].item():.6g}"
        )
    return Mismatch(what, max_abs, max_rel, atol, rtol, not bool(bad.any()), detail)


def compare_op(
    fn: Callable[..., Any],
    ref: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    grad_atol: float | None = None,
    grad_rtol: float | None = None,
    name: str = "op",
    fused_kwargs: dict[str, Any] | None = None,
    ref_dtype: torch.dtype | None = None,
    seed: int = 0,
    check_grad: bool = True,
    atol_rms: bool = False,
) -> CompareResult:
    """Run ``fn(*args, **kwargs, **fused_kwargs)`` and ``ref(*args, **kwargs)`` on independent copies of the inputs.

    Floating tensors with ``requires_grad`` become leaves on both sides; gradients of every output (with one shared
    random upstream gradient per output) are compared for each of them. The result fails (``ok`` is False) when
    nothing was compared: no output tensors, or inputs that require grad but no gradient reached any.
    ``ref_dtype`` upcasts the reference's floating inputs (e.g. fp64) and the comparison casts the reference back to
    the fused output's dtype first. ``atol_rms`` scales ``atol`` by each reference tensor's RMS where it exceeds 1
    (:attr:`OpSpec.atol_rms`: outputs that are sums over many rows, whose rounding error grows with their scale).
    """
    kwargs = dict(kwargs or {})
    fused_kwargs = dict(fused_kwargs if fused_kwargs is not None else {"backend": "triton"})
    grad_atol = atol if grad_atol is None else grad_atol
    grad_rtol = rtol if grad_rtol is None else grad_rtol

    def copy(x: Any, dtype: torch.dtype | None) -> Any:
        if isinstance(x, torch.Tensor):
            y = x.detach().clone()
            if dtype is not None and y.is_floating_point():
                y = y.to(dtype)
            return y.requires_grad_(x.requires_grad and x.is_floating_point())
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v, dtype) for v in x)
        return x

    a_args, a_kw = copy(list(args), None), {k: copy(v, None) for k, v in kwargs.items()}
    b_args, b_kw = copy(list(args), ref_dtype), {k: copy(v, ref_dtype) for k, v in kwargs.items()}
    a_out = flatten_tensors(fn(*a_args, **a_kw, **fused_kwargs))
    b_out = flatten_tensors(ref(*b_args, **b_kw))
    rows: list[Mismatch] = []
    if not a_out and not b_out:
        return CompareResult(name, [Mismatch("outputs", 0, 0, atol, rtol, False, "neither side returned a tensor")])
    if len(a_out) != len(b_out):
        return CompareResult(name, [Mismatch("outputs", 0, 0, atol, rtol, False, f"{len(a_out)} vs {len(b_out)}")])
    for i, (a, b) in enumerate(zip(a_out, b_out)):
        rows.append(_compare(f"out[{i}]", a, b.to(a.dtype) if ref_dtype is not None else b, atol, rtol, atol_rms))
    if check_grad:
        a_leaves = [t for t in flatten_tensors(a_args) + flatten_tensors(list(a_kw.values())) if t.requires_grad]
        b_leaves = [t for t in flatten_tensors(b_args) + flatten_tensors(list(b_kw.values())) if t.requires_grad]
        flat_args = flatten_tensors(list(args))
        names = [f"arg{i}" for i, t in enumerate(flat_args) if t.requires_grad and t.is_floating_point()]
        names += [k for k, v in kwargs.items() for t in flatten_tensors(v) if t.requires_grad and t.is_floating_point()]
        # a custom op's outputs all require grad when any input does; the reference's may not (e.g. an output that
        # depends only on inputs without grad): compare gradients through outputs that carry one on both sides
        outs = [(a, b) for a, b in zip(a_out, b_out) if a.requires_grad and b.requires_grad and a.is_floating_point()]
        if a_leaves and not outs:
            detail = "inputs require grad but no output carries a gradient on both sides: nothing was compared"
            rows.append(Mismatch("gradients", 0.0, 0.0, grad_atol, grad_rtol, False, detail))
        if a_leaves and outs:
            g = torch.Generator(device="cpu").manual_seed(seed)
            # the upstream gradient is rounded to the fused output's dtype first, so both sides see the same values
            ups = [torch.randn(a.shape, generator=g, dtype=torch.float32).to(a.dtype) for a, _ in outs]
            ga = torch.autograd.grad(
                [a for a, _ in outs], a_leaves, [u.to(a.device, a.dtype) for u, (a, _) in zip(ups, outs)],
                allow_unused=True,
            )
            gb = torch.autograd.grad(
                [b for _, b in outs], b_leaves, [u.to(b.device, b.dtype) for u, (_, b) in zip(ups, outs)],
                allow_unused=True,
            )
            for n, x, y, leaf in zip(names, ga, gb, a_leaves):
                y = y.to(leaf.dtype) if (y is not None and ref_dtype is not None) else y
                rows.append(_compare(f"grad {n}", x, y, grad_atol, grad_rtol, atol_rms))
            if all(x is None and y is None for x, y in zip(ga, gb)):
                detail = "inputs require grad but every gradient is None on both sides: nothing was compared"
                rows.append(Mismatch("gradients", 0.0, 0.0, grad_atol, grad_rtol, False, detail))
    return CompareResult(name, rows)


def assert_op_matches(*args: Any, **kwargs: Any) -> CompareResult:
    """:func:`compare_op`, raising ``AssertionError`` with the full report on any mismatch."""
    res = compare_op(*args, **kwargs)
    if not res.ok:
        raise AssertionError("\n" + res.report())
    return res


def assert_cases_match(
    spec: Any,
    dtype: torch.dtype,
    size: str = "small",
    device: str | torch.device = "cpu",
    fused_kwargs: dict[str, Any] | None = None,
) -> None:
    """Every case of an op-table entry (:class:`~pae_fast.kernels._dispatch.OpSpec`) against the fp64 reference,
    forward and every gradient, at the entry's declared tolerances for ``dtype``."""
    atol, rtol = spec.tolerances[dtype]
    for label, args, kwargs in spec.cases(size, torch.device(device), dtype):
        assert_op_matches(spec.fn, spec.ref, args, kwargs, atol=atol, rtol=rtol, name=f"{spec.name} {label}",
                          ref_dtype=torch.float64, fused_kwargs=fused_kwargs,
                          atol_rms=getattr(spec, "atol_rms", False))  # fmt: skip


def feature_maps(B: int, C: int, H: int, W: int, channels_last: bool = False, dtype: torch.dtype = torch.float32,
                 seed: int = 0, relu_shift: float | None = None) -> torch.Tensor:
    """Random ``(B, C, H, W)`` maps from their own generator (tests never touch the global RNG); ``relu_shift``:
    ``relu(t) + relu_shift``, LPIPS-like non-negative features without all-zero pixels; ``channels_last``: that
    memory format (the LPIPS trunk's)."""
    t = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))
    if relu_shift is not None:
        t = t.relu() + relu_shift
    t = t.to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def lin_head(C: int, seed: int = 1) -> torch.Tensor:
    """Random non-negative ``(C,)`` LPIPS "lin" weights summing to about 1 (trained heads are non-negative)."""
    return torch.rand(C, generator=torch.Generator().manual_seed(seed)) * 2 / C

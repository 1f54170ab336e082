"""Memory-traffic, GEMM-FLOP and launch counting at op boundaries (a ``TorchDispatchMode``).

Every op that reaches the dispatcher is charged as if it were one kernel that reads each tensor input once and
writes each output once (the model behind "bandwidth-bound ops move N bytes"):

- aten ops: bytes read = all tensor inputs, bytes written = all tensor outputs. A broadcast (stride-0) input is
  charged for the elements it really addresses (a bias added to every row is read once). Inputs an op only
  overwrites (``copy_``'s destination, ``out=``, ``fill_``/``zero_``, ``*_like`` / ``new_*`` factories) are not
  charged as read; in-place ops that return nothing (``_foreach_*_``) are charged their mutated arguments as written.
- views and metadata ops (``view``, ``reshape`` when it is a view, ``permute``, ``expand``, ``t``, ``detach``,
  ``empty*``, ...) cost 0 bytes and 0 launches.
- ``pae_fast::*`` custom ops count as ONE op with their own inputs/outputs (the mode is switched off while an op
  runs, so it never sees the kernels or glue inside; a fused op's backward is its own ``*_backward`` op).
- GEMMs (mm/addmm/bmm/baddbmm/linear/convolution and their backward) are the ``matmul`` category; their FLOPs use
  ``torch.utils.flop_counter``'s formulas (2 FLOPs per multiply-accumulate).
- fused GEMM ops: a ``pae_fast::*`` op whose ``OpSpec`` declares ``flops`` (a GEMM with a fused epilogue, e.g.
  ``swiglu_mlp``) is also ``matmul``, with those FLOPs and its boundary bytes; each call's (FLOPs, bytes) is kept
  (``summary()["fused_gemm"]``) so a time model can charge it max(FLOPs at the GEMM rate, bytes at the bandwidth).
- attention is ONE op at flash-style traffic, whatever backend the device picks: every call of
  ``F.scaled_dot_product_attention`` is intercepted (a ``TorchFunctionMode``) and charged forward as read q, k, v
  (+ mask), write out + logsumexp (fp32, B·H·Nq); backward as read dout, q, k, v, out, logsumexp, write dq, dk, dv.
  The math it runs underneath (on meta: the unfused decomposition) is executed but not counted. FLOPs: forward
  2 GEMMs (QKᵀ, PV); backward 5 (flash recomputes QKᵀ) as ``attention_flops``, 4 as ``attention_model_flops``
  (the MFU convention: backward = 2 × forward). aten SDPA-family ops and ``pae_fast::*attention*`` ops met
  directly are charged the same way at their own boundaries.

Runs on any device, including ``meta`` (a whole model's forward + backward without memory)::

    with TrafficCounter() as tc:
        loss = model(x, t, y).float().pow(2).mean()
        loss.backward()
    s = tc.summary()   # matmul_flops, matmul_bytes, attention_flops, attention_bytes, other_bytes, launches, rows
    print(format_summary(s))

Rows are per (phase, op): phase is "forward" or "backward" (whether autograd's engine is running the op).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pae_fast.kernels._dispatch import declared_gemm_flops

__all__ = ["TrafficCounter", "OpRow", "format_summary", "footprint_bytes", "attention_flops", "FA2_HEAD_DIM_MULTIPLE"]

FA2_HEAD_DIM_MULTIPLE = 32  # FlashAttention-2 compiles head dims 32, 64, 96, ...: head_dim 72 runs as 96

# Ops that move no data and launch nothing (beyond what ``OpOverload.is_view`` already says).
_FREE_OPS = {
    "detach", "alias", "_unsafe_view", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "empty_permuted", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size",
    "stride", "storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "resize_", "set_",
    "_local_scalar_dense", "_resize_output_", "record_stream", "is_pinned", "_nested_tensor_size",
}  # fmt: skip
# In-place ops whose ``self`` is written without being read.
_OVERWRITE_OPS = {
    "copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "exponential_", "bernoulli_", "geometric_",
    "log_normal_", "cauchy_", "_foreach_copy_", "_foreach_zero_",
}  # fmt: skip
# Ops returning nothing that write only some of their mutable arguments (the rest are read): fused Adam(W) writes the
# parameters and both moments; its gradients are marked mutable (unscaled in place) but only written with grad_scale.
_PARTIAL_WRITE_OPS = {
    "_fused_adamw_": ("self", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
    "_fused_adam_": ("self", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
}
# Mutable arguments an op overwrites without reading them (not charged as read).
_WRITE_ONLY_ARGS = {"fused_adamw_ema_": ("copy",)}
_GEMM_OPS = {
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "linear", "matmul", "addmv", "mv", "convolution",
    "_convolution", "cudnn_convolution", "convolution_overrideable", "_slow_conv2d_forward",
    "_slow_conv2d_backward", "convolution_backward", "mkldnn_convolution",
}  # fmt: skip
_ATTENTION_OPS = {
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward", "_scaled_dot_product_fused_attention_overrideable",
}  # fmt: skip


def footprint_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel addresses in ``t``: dims with stride 0 (broadcast) count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


def attention_flops(q_shape: torch.Size, k_shape: torch.Size, v_shape: torch.Size) -> int:
    """Forward FLOPs of ``softmax(q kᵀ) v`` for ``(..., Nq, D)`` x ``(..., Nk, D)`` x ``(..., Nk, Dv)`` (two GEMMs)."""
    lead = 1
    for s in q_shape[:-2]:
        lead *= int(s)
    nq, d = int(q_shape[-2]), int(q_shape[-1])
    nk, dv = int(k_shape[-2]), int(v_shape[-1])
    return 2 * lead * nq * nk * d + 2 * lead * nq * nk * dv


@dataclass
class OpRow:
    """Totals of one op in one phase."""

    op: str
    category: str  # matmul | attention | other
    phase: str  # forward | backward
    calls: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    flops: int = 0  # executed FLOPs (GEMMs and attention)
    model_flops: int = 0  # FLOPs under the MFU convention (attention backward = 2 x forward)
    padded_flops: int = 0  # attention FLOPs with head_dim rounded up to a multiple of 32 (FlashAttention-2's tiles)
    launches: int = 0

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.written_bytes


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _phase() -> str:
    # autograd's engine sets a graph-task id while it runs backward functions (on its worker threads too)
    try:
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"
    except AttributeError:  # pragma: no cover - older torch
        return "forward"


class _SDPAInterceptor(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` through :class:`_CountedAttention` (one op each way)."""

    def __init__(self, counter: TrafficCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.counter._inside_op == 0:
            return _counted_sdpa(self.counter, *args, **kwargs)
        return func(*args, **kwargs)


def _counted_sdpa(counter: TrafficCounter, query, key, value, attn_mask=None, *rest, **kwargs):
    call_args = (attn_mask, *rest)

    def call(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, *call_args, **kwargs)

    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return _CountedAttention.apply(counter, call, attn_mask, query, key, value)
    with counter._suppressed():
        out = call(query, key, value)
        out = _like(out, query) if out.shape == query.shape else out
    counter._record_attention("forward", query, key, value, out, attn_mask)
    return out


class _CountedAttention(torch.autograd.Function):
    """SDPA as one counted op: runs the real call (uncounted) and keeps its graph for the backward."""

    @staticmethod
    def forward(ctx, counter, call, attn_mask, q, k, v):
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        with counter._suppressed(), torch.enable_grad():
            out = call(*leaves)
            # FlashAttention allocates its output like q (``empty_like(q)``): q laid out token-major, (B, N, H, hd)
            # memory seen as (B, H, N, hd), gives an output that ``transpose(1, 2).reshape(B, N, D)`` views without a
            # copy. The decomposition underneath may lay it out otherwise; it is re-laid out like q, uncounted.
            res = _like(out.detach(), q) if out.shape == q.shape else out.detach()
        ctx.counter, ctx.inner, ctx.mask = counter, (leaves, out), attn_mask
        counter._record_attention("forward", q, k, v, out, attn_mask)
        return res

    @staticmethod
    def backward(ctx, dout):
        counter = ctx.counter
        leaves, out = ctx.inner
        need = [t for t in leaves if t.requires_grad]
        with counter._suppressed():  # retain: a graph may be differentiated twice (e.g. an adaptive loss weight)
            got = iter(torch.autograd.grad(out, need, dout, allow_unused=True, retain_graph=True))
            # a fused kernel writes dq, dk, dv in the inputs' layout; the decomposition underneath may not, and
            # autograd would then charge a re-layout copy that no attention kernel makes
            grads = [_like(next(got), t) if t.requires_grad else None for t in leaves]
        counter._record_attention("backward", *leaves, out, ctx.mask, dout=dout)
        return (None, None, None, *grads)


def _like(g: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``g`` with the strides of ``x`` (a copy only when they differ)."""
    if g is None or g.stride() == x.stride():
        return g
    return torch.empty_like(x).copy_(g)


class TrafficCounter(TorchDispatchMode):
    """Count bytes read/written, GEMM and attention FLOPs and launches of everything run inside ``with``.

    Use on real tensors or on the ``meta`` device; see the module docstring for the counting rules.
    """

    def __init__(self) -> None:
        super().__init__()
        self._rows: dict[tuple[str, str], OpRow] = {}
        self._suppress = 0
        self._inside_op = 0
        self._paused = 0
        self._fn_mode = _SDPAInterceptor(self)
        self._fused_gemm: dict[tuple[str, str, int, int], int] = {}  # (phase, op, flops, bytes) -> calls

    # ------------------------------------------------------------------ context
    def __enter__(self) -> TrafficCounter:
        self._fn_mode.__enter__()
        try:
            super().__enter__()
        except BaseException:
            self._fn_mode.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            return super().__exit__(exc_type, exc, tb)
        finally:
            self._fn_mode.__exit__(exc_type, exc, tb)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run ops without counting them (e.g. making upstream gradients)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def _suppressed(self) -> Iterator[None]:
        self._suppress += 1
        try:
            yield
        finally:
            self._suppress -= 1

    def reset(self) -> None:
        self._rows.clear()
        self._fused_gemm.clear()

    # ------------------------------------------------------------------ counting
    def _row(self, op: str, category: str) -> OpRow:
        key = (_phase(), op)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = OpRow(op=op, category=category, phase=key[0])
        return row

    def _record_attention(self, kind: str, q, k, v, out, mask, dout=None) -> None:
        if self._paused or self._suppress:
            return
        lse = q.numel() // q.shape[-1] * 4  # fp32 logsumexp per query row
        fwd_flops = attention_flops(q.shape, k.shape, v.shape)
        hd = int(q.shape[-1])
        pad = -(-hd // FA2_HEAD_DIM_MULTIPLE) * FA2_HEAD_DIM_MULTIPLE
        qkv = footprint_bytes(q) + footprint_bytes(k) + footprint_bytes(v)
        mask_b = footprint_bytes(mask) if isinstance(mask, torch.Tensor) else 0
        name = "attention" if kind == "forward" else "attention_backward"
        row = self._row(name, "attention")
        row.calls += 1
        row.launches += 1
        if dout is None:
            row.read_bytes += qkv + mask_b
            row.written_bytes += footprint_bytes(out) + lse
            row.flops += fwd_flops
            row.model_flops += fwd_flops
            row.padded_flops += fwd_flops * pad // hd
        else:
            row.read_bytes += footprint_bytes(dout) + qkv + footprint_bytes(out) + lse + mask_b
            row.written_bytes += qkv
            row.flops += fwd_flops * 5 // 2  # QKᵀ recomputed, dP, dV, dQ, dK
            row.model_flops += fwd_flops * 2
            row.padded_flops += fwd_flops * 5 // 2 * pad // hd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._inside_op += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self._inside_op -= 1
        if not (self._paused or self._suppress):
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        packet = getattr(func, "_overloadpacket", None)
        if packet is None:  # not an operator overload (e.g. a higher-order op): nothing to charge
            return
        name = packet.__name__
        ns = getattr(func, "namespace", "aten")
        if ns == "aten" and (func.is_view or name in _FREE_OPS):
            return
        schema_args = func._schema.arguments
        values = list(args) + [kwargs.get(a.name) for a in schema_args[len(args) :]]
        written = [(i, a, v) for i, (a, v) in enumerate(zip(schema_args, values))
                   if a.alias_info is not None and a.alias_info.is_write]  # fmt: skip
        outs = _tensors(out)
        if not outs:  # in-place ops returning nothing (``_foreach_*_``) write their mutated arguments
            only = _PARTIAL_WRITE_OPS.get(name)
            if only is not None and kwargs.get("grad_scale") is None:
                written = [(i, a, v) for i, a, v in written if a.name in only]
            outs = _tensors([v for _, _, v in written])
            if not outs:
                return  # a metadata query
        full = name if ns == "aten" else f"{ns}::{name}"
        base = name[: -len("_backward")] if name.endswith("_backward") else name
        if base in _ATTENTION_OPS or (ns != "aten" and "attention" in name):
            category = "attention"
        elif name in _GEMM_OPS:
            category = "matmul"
        else:
            category = "other"
        named = {a.name: v for a, v in zip(schema_args, values)}
        gemm_flops = declared_gemm_flops(base, named, name != base) if ns == "pae_fast" else None
        if gemm_flops is not None:
            category = "matmul"
        row = self._row(full, category)
        row.calls += 1
        row.launches += 1
        written_b = sum(footprint_bytes(t) for t in outs)
        read_b = 0
        if not (name.endswith("_like") or name.startswith("new_")):  # factories only use the input's metadata
            # arguments that are only overwritten: ``out=`` and the destination of copy_/fill_/zero_/...
            skip = {id(v) for i, a, v in written if a.kwarg_only or (i == 0 and name in _OVERWRITE_OPS)
                    or a.name in _WRITE_ONLY_ARGS.get(name, ())}  # fmt: skip
            read_b = sum(footprint_bytes(t) for v in values if id(v) not in skip for t in _tensors(v))
        row.written_bytes += written_b
        row.read_bytes += read_b
        if gemm_flops is not None:
            row.flops += gemm_flops
            row.model_flops += gemm_flops
            key = (row.phase, full, gemm_flops, read_b + written_b)
            self._fused_gemm[key] = self._fused_gemm.get(key, 0) + 1
        elif category != "other":
            flops, model = self._flops(func, packet, name, args, kwargs, out, category)
            row.flops += flops
            row.model_flops += model

    @staticmethod
    def _flops(func, packet, name: str, args, kwargs, out, category: str) -> tuple[int, int]:
        from torch.utils.flop_counter import flop_registry

        formula = flop_registry.get(packet)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
        elif name in ("linear", "matmul"):
            flops = 2 * args[0].shape[-1] * sum(t.numel() for t in _tensors(out))  # 2·K per output element
        elif category == "attention":
            t4 = [t for t in _tensors(args) if t.dim() >= 3]
            if len(t4) < 3:
                return 0, 0
            if name.endswith("_backward"):
                # (dout, q, k, v, ...) by convention; fall back to the first three operands when dout is absent
                q, k, v = (t4[1], t4[2], t4[3]) if len(t4) >= 4 else t4[:3]
                f = attention_flops(q.shape, k.shape, v.shape)
                return f * 5 // 2, f * 2
            q, k, v = t4[:3]
            f = attention_flops(q.shape, k.shape, v.shape)
            return f, f
        else:
            flops = 0
        if category == "attention" and "backward" in name:
            return flops, flops * 4 // 5
        return flops, flops

    # ------------------------------------------------------------------ results
    def rows(self) -> list[OpRow]:
        """Per (phase, op) rows, most bytes first."""
        return sorted(self._rows.values(), key=lambda r: (-r.bytes, -r.flops, r.phase, r.op))

    def summary(self) -> dict[str, Any]:
        """Totals per category, per phase, and per-op rows.

        Returns:
            ``{"matmul_flops", "matmul_bytes", "attention_flops", "attention_model_flops", "attention_bytes",
            "other_bytes", "total_bytes", "launches", "phases": {phase: same totals}, "rows": [OpRow as dict],
            "fused_gemm": [{"phase", "op", "flops", "bytes", "calls"}]}`` (``fused_gemm``: the calls of fused GEMM
            ops, grouped by equal FLOPs and bytes per call; they are included in ``matmul_flops`` / ``matmul_bytes``).
        """
        out = _totals(self._rows.values())
        out["phases"] = {p: _totals(r for r in self._rows.values() if r.phase == p) for p in ("forward", "backward")}
        out["rows"] = [dict(asdict(r), bytes=r.bytes) for r in self.rows()]
        out["fused_gemm"] = [{"phase": p, "op": op, "flops": f, "bytes": b, "calls": n}
                             for (p, op, f, b), n in sorted(self._fused_gemm.items())]  # fmt: skip
        return out


def _totals(rows) -> dict[str, int]:
    t = dict.fromkeys(
        ("matmul_flops", "matmul_bytes", "attention_flops", "attention_model_flops", "attention_padded_flops",
         "attention_bytes", "other_bytes", "total_bytes", "launches"), 0,
    )  # fmt: skip
    for r in rows:
        if r.category == "matmul":
            t["matmul_flops"] += r.flops
            t["matmul_bytes"] += r.bytes
        elif r.category == "attention":
            t["attention_flops"] += r.flops
            t["attention_model_flops"] += r.model_flops
            t["attention_padded_flops"] += r.padded_flops or r.flops
            t["attention_bytes"] += r.bytes
        else:
            t["other_bytes"] += r.bytes
        t["total_bytes"] += r.bytes
        t["launches"] += r.launches
    return t


def format_summary(summary: dict[str, Any], top: int = 15) -> str:
    """Human-readable totals and the ``top`` rows by bytes."""
    s = summary
    lines = [
        f"matmul:    {s['matmul_flops'] / 1e12:9.3f} TFLOP  {s['matmul_bytes'] / 1e9:9.3f} GB",
        f"attention: {s['attention_flops'] / 1e12:9.3f} TFLOP  {s['attention_bytes'] / 1e9:9.3f} GB",
        f"other:     {'':>15} {s['other_bytes'] / 1e9:9.3f} GB   launches: {s['launches']}",
        f"{'phase':<9} {'op':<40} {'calls':>6} {'read GB':>9} {'write GB':>9} {'GFLOP':>10}",
    ]
    for r in s["rows"][:top]:
        lines.append(
            f"{r['phase']:<9} {r['op'][:40]:<40} {r['calls']:>6} {r['read_bytes'] / 1e9:>9.4f} "
            f"{r['written_bytes'] / 1e9:>9.4f} {r['flops'] / 1e9:>10.2f}"
        )
    return "\n".join(lines)

"""One generator training step counted as the engine runs it, on fake tensors (no GPU, no memory); and the per-op
table's counts (:func:`op_traffic`: one fused op vs its reference on its cases, meta device).

The step is the engine's (``pae_fast/engine/loop.py``): the flow-matching loss of the training task
(:class:`pae_fast.flow.loss.FlowLoss`, docs/method.md § Flow matching) under the precision policy
(:mod:`pae_fast.engine.precision`), backward, the non-finite check, the optimizer step (``train.optimizer``) and the
EMA update. It runs under ``FakeTensorMode`` on the CPU device with CPU autocast standing in for CUDA's (the meta
device has no autocast; the two autocast op lists agree on everything these models run: GEMMs and SDPA in bf16,
norms and reductions in fp32), and every op is charged by :class:`pae_fast.kernels.tools.traffic.TrafficCounter`.

``backend="fused"`` selects the Triton ops explicitly (``use_backend("triton")`` inside ``counting_only()``: their
fake implementations run); ``backend="reference"`` the PyTorch references. Attention is SDPA on both sides, charged
flash-style once per call.

Op types (bandwidth-bound bytes; fused GEMM ops listed apart) and the minimum each could move (the report's floor):

=====================  ======================================================================================
``fused:<op>``         a ``pae_fast::<op>`` custom op, forward + backward; minimum: ``OpSpec.min_bytes`` of its calls
``gemm:<op>``          a fused GEMM op (``OpSpec.flops``: counted as ``matmul``, timed as max(FLOPs, bytes)); listed
                       with its bytes but not part of the bandwidth-bound total; minimum: ``OpSpec.min_bytes``
``casts``              ``_to_copy`` (autocast's weight casts and their gradients, dtype changes); minimum 0 (bf16
                       compute weights come from the optimizer; activations leave their producer in GEMM dtype)
``bias-grad sums``     ``sum`` in backward (a Linear's bias gradient); minimum 0 (folded into a backward kernel
                       or the GEMM epilogue that reads the same gradient)
``copies``             ``clone``, ``copy_``, ``stack``, ``cat``, layout changes; minimum 0
``optimizer + EMA``    the update after backward; minimum 36 B per trainable param (fp32 p, m, v, ema read and
                       written, a bf16 gradient read, the bf16 compute copy written; one fused kernel)
``other``              everything else (embeddings, the loss, small elementwise); minimum: as counted
=====================  ======================================================================================
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

OPTIMIZER_EMA_MIN_BYTES_PER_PARAM = 36
STEP_OP_TYPES = ("casts", "bias-grad sums", "copies", "optimizer + EMA", "other")
_COPY_OPS = {"clone", "copy_", "stack", "cat", "contiguous", "_foreach_copy_", "constant_pad_nd", "slice_backward",
             "select_backward", "as_strided_scatter", "unbind_backward"}  # fmt: skip


def op_type(row: dict[str, Any], update: bool = False) -> str:
    """The op type of a counter row (see the module docstring)."""
    op = row["op"]
    if update:
        return "optimizer + EMA"
    if op.startswith("pae_fast::"):
        name = op.split("::", 1)[1]
        kind = "gemm:" if row["category"] == "matmul" else "fused:"
        return kind + (name[: -len("_backward")] if name.endswith("_backward") else name)
    if op == "_to_copy":
        return "casts"
    if op == "sum" and row["phase"] == "backward":
        return "bias-grad sums"
    if op in _COPY_OPS:
        return "copies"
    return "other"


class _FusedMinimum(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums ``OpSpec.min_bytes`` (forward + backward) over the forward calls of the fused ops."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = {}
        self.unknown: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", "") == "pae_fast" and not func.__name__.split(".")[0].endswith("_backward"):
            from pae_fast import kernels

            name = func.__name__.split(".")[0]
            spec = kernels.OPS.get(name)
            named = dict(zip([a.name for a in func._schema.arguments], args))
            named.update(kwargs)
            n = None
            for a in ((), tuple(args)):  # by the schema's argument names, else positionally as well
                try:
                    n = int(spec.min_bytes(a, named, True)) if spec is not None else None
                    break
                except Exception:  # a schema whose arguments differ from the public function's: no floor
                    continue
            if n is None:
                self.unknown.add(name)
            else:
                self.bytes[name] = self.bytes.get(name, 0) + n
        return func(*args, **kwargs)


# What ``train.optimizer: auto`` sees on the counted machine: one H100 with Triton (the engine's default run).
H100_RUN = dict(device_type="cuda", triton_reason=None, distributed="ddp", world_size=1)


def engine_optimizer(requested: str, precision: str, backend: str = "fused") -> str:
    """The optimizer the engine builds for ``train.optimizer=requested`` on one H100 with Triton
    (:func:`pae_fast.engine.optim_choice.choose_optimizer`): ``auto`` -> ``fused_adamw_ema`` with the fused kernels,
    ``adamw`` for the reference (``train.kernel_backend=torch``); an explicit name as it is."""
    from pae_fast.engine.optim_choice import choose_optimizer

    if backend not in ("fused", "reference"):
        raise ValueError(f"backend must be 'fused' or 'reference', got {backend!r}")
    kernel_backend = "auto" if backend == "fused" else "torch"
    return choose_optimizer(requested, kernel_backend=kernel_backend, precision=precision, **H100_RUN).name


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def count_step(
    build: Callable[[], nn.Module],
    batch: int,
    backend: str = "fused",
    precision: str = "bf16",
    optimizer: str = "auto",
    ema_decay: float = 0.9999,
    grad_clip: float = 0.0,
) -> dict[str, Any]:
    """Count one training step of ``build()`` at ``batch`` as the engine runs it.

    Args:
        build: constructs the generator (fp32, as the engine receives it).
        batch: samples per step (one micro-batch).
        backend: ``fused`` or ``reference``.
        precision: ``train.precision`` (``bf16 | bf16-autocast | fp32``).
        optimizer: ``train.optimizer`` (``adamw``: torch's fused AdamW + foreach EMA; ``fused_adamw_ema``: the one
            Triton kernel, charged at its fake implementation; ``auto``: what the engine picks on one H100 for this
            ``backend``, :func:`engine_optimizer`).
        ema_decay: ``train.ema_decay``.
        grad_clip: ``train.grad_clip`` (0 = off): the global-norm clip, counted in the update as the engine runs it
            (:func:`pae_fast.engine.optim.clip_gradients`: inside ``fused_adamw_ema``, or torch's on fp32 masters).

    Returns:
        ``{"step": TrafficCounter summary of forward + backward, "update": summary of the optimizer + EMA,
        "optimizer" (the one counted), "params", "trainable_params", "input", "fused_min_bytes": {op: bytes},
        "fused_min_unknown": [op]}``; both summaries carry rows.
    """
    from pae_fast import kernels
    from pae_fast.config import FlowConfig, TrainConfig
    from pae_fast.engine.precision import autocast_dtype, compute_weights
    from pae_fast.flow.loss import FlowLoss
    from pae_fast.kernels._dispatch import counting_only
    from pae_fast.kernels.tools.traffic import TrafficCounter

    if backend not in ("fused", "reference"):
        raise ValueError(f"backend must be 'fused' or 'reference', got {backend!r}")
    dt = autocast_dtype(precision)
    if precision == "fp16":
        raise ValueError("precision fp16 (gradient scaler) is not counted; use bf16, bf16-autocast or fp32")
    optimizer = engine_optimizer(optimizer, precision, backend)
    cfg = TrainConfig(precision=precision, optimizer=optimizer, ema_decay=ema_decay, grad_clip=grad_clip)
    cpu = torch.device("cpu")
    with fake_mode(), warnings.catch_warnings():
        # deep copies of fake modules (the EMA, the compute copy) touch data_ptr: harmless here
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        master = build().train()
        spec = _input_spec(master)
        compute = compute_weights(master, precision)
        model = compute.module if compute is not None else master
        opt, ema = prepare_update(master, compute, cfg)
        loss_fn = FlowLoss.from_config(FlowConfig())
        x1 = torch.empty(batch, spec["in_channels"], spec["input_size"], spec["input_size"], device=cpu)
        y = torch.zeros(batch, dtype=torch.long, device=cpu)
        scope = contextlib.ExitStack()
        scope.enter_context(kernels.use_backend("triton" if backend == "fused" else "torch"))
        scope.enter_context(kernels.use_attention_backend("sdpa"))
        if backend == "fused":
            scope.enter_context(counting_only())
        amp = torch.autocast("cpu", dtype=dt) if dt is not None else contextlib.nullcontext()
        floor = _FusedMinimum()
        with scope:
            with TrafficCounter() as tc_step, floor:
                with amp:
                    loss, _ = loss_fn(model, (x1, y), 0)
                loss.float().backward()
            with TrafficCounter() as tc_update:
                run_update(master, compute, opt, ema, cfg, torch.isfinite(loss.detach()))
        params = sum(p.numel() for p in master.parameters())
        trainable = sum(p.numel() for p in master.parameters() if p.requires_grad)
    return {"step": tc_step.summary(), "update": tc_update.summary(), "params": params, "input": spec,
            "optimizer": optimizer, "trainable_params": trainable, "grad_clip": grad_clip,
            "fused_min_bytes": floor.bytes, "fused_min_unknown": sorted(floor.unknown)}  # fmt: skip


def prepare_update(master: nn.Module, compute: Any, cfg: Any, with_ema: bool = True) -> tuple[Any, nn.Module | None]:
    """The optimizer (``cfg.optimizer`` as the engine builds it for CUDA, attached to the ``compute`` copy) and the EMA
    of ``master``, wired as the engine wires them, after one uncounted step (steady state: the state exists)."""
    from pae_fast.engine.optim import build_optimizer, make_ema

    opt = build_optimizer(master, cfg, torch.device("cuda"))  # the CUDA choice (fused), run on fake / meta tensors
    if compute is not None:
        compute.attach(opt)
    ema = make_ema(master) if with_ema else None
    if ema is not None and hasattr(opt, "set_ema"):  # fused_adamw_ema updates the EMA's parameters in its kernel
        opt.set_ema(ema, master, cfg.ema_decay)
    for p in master.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt, ema


def run_update(master: nn.Module, compute: Any, opt: Any, ema: nn.Module | None, cfg: Any, ok: torch.Tensor) -> None:
    """The engine's update after backward (``engine/loop.py``): gradients to the masters where something reads them,
    clipping (``train.grad_clip``, :func:`pae_fast.engine.optim.clip_gradients`), the skip flag, the optimizer step
    and the EMA; a steady-state step (no norm logged)."""
    from pae_fast.engine.optim import clip_gradients, ema_update, master_grads_read

    if compute is not None:
        compute.grads_to_master(needed=master_grads_read(opt, cfg.grad_clip, want_norm=False))
    norm = clip_gradients(opt, [p for p in master.parameters() if p.requires_grad], cfg.grad_clip, False)
    if norm is not None:
        ok = ok & torch.isfinite(norm)
    opt.grad_scale, opt.found_inf = None, (~ok).float()
    opt.step()
    if ema is not None:
        ema_update(ema, master, cfg.ema_decay, ok, params=not getattr(opt, "updates_ema", False))


def _input_spec(model: nn.Module) -> dict[str, int]:
    from pae_fast.config import GeneratorConfig

    d = GeneratorConfig()
    return {
        "in_channels": int(getattr(model, "in_channels", d.in_channels)),
        "input_size": int(getattr(model, "input_size", d.input_size)),
        "num_classes": int(getattr(model, "num_classes", d.num_classes)),
    }


def by_op_type(counted: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Bandwidth-bound bytes, launches and the minimum per op type of one :func:`count_step` result."""
    out: dict[str, dict[str, Any]] = {}
    for update, summary in ((False, counted["step"]), (True, counted["update"])):
        for r in summary["rows"]:
            if r["category"] != "other" and not (r["category"] == "matmul" and r["op"].startswith("pae_fast::")):
                continue
            t = out.setdefault(op_type(r, update), {"bytes": 0, "launches": 0})
            t["bytes"] += r["bytes"]
            t["launches"] += r["launches"]
    for name, t in out.items():
        if name.startswith(("fused:", "gemm:")):
            t["min_bytes"] = counted["fused_min_bytes"].get(name.split(":", 1)[1])
        elif name == "optimizer + EMA":
            t["min_bytes"] = OPTIMIZER_EMA_MIN_BYTES_PER_PARAM * counted.get("trainable_params", counted["params"])
        elif name == "other":
            t["min_bytes"] = t["bytes"]
        else:
            t["min_bytes"] = 0
    return out


def op_traffic(spec: Any, dtype: torch.dtype = torch.bfloat16, size: str = "model") -> list[dict[str, Any]]:
    """Fused vs reference vs minimum bytes of one :class:`OpSpec` on its ``size`` cases (meta device).

    Each case runs forward and backward (upstream gradients of ones, not counted) once per side.
    """
    meta = torch.device("meta")
    rows = []
    for label, args, kwargs in spec.cases(size, meta, dtype):
        row: dict[str, Any] = {"op": spec.name, "case": label}
        try:
            fused = _count_call(spec.fn, args, kwargs, {"backend": "triton"})
            ref = _count_call(spec.ref, args, kwargs, {})
            row.update(
                fused_bytes=fused["total_bytes"], fused_fwd_bytes=fused["phases"]["forward"]["total_bytes"],
                fused_launches=fused["launches"],
                reference_bytes=ref["total_bytes"], reference_fwd_bytes=ref["phases"]["forward"]["total_bytes"],
                reference_launches=ref["launches"],
                min_bytes=int(spec.min_bytes(args, kwargs, True)),
                min_fwd_bytes=int(spec.min_bytes(args, kwargs, False)),
            )  # fmt: skip
        except Exception as e:  # one broken op must not hide the others: the row says what failed
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def _count_call(fn: Callable[..., Any], args: tuple, kwargs: dict, extra: dict) -> dict[str, Any]:
    from pae_fast.kernels.tools.testing import flatten_tensors
    from pae_fast.kernels.tools.traffic import TrafficCounter

    leaves = [t for t in flatten_tensors(list(args)) + flatten_tensors(list(kwargs.values())) if t.requires_grad]
    with TrafficCounter() as tc:
        outs = [o for o in flatten_tensors(fn(*args, **kwargs, **extra)) if o.requires_grad]
        if outs and leaves:
            with tc.paused():
                grads = [torch.ones_like(o) for o in outs]
            torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    return tc.summary()

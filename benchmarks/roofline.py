"""Roofline of one generator training step, counted at op boundaries on the meta device (no GPU, no memory).

For each model, one flow-matching training step (forward + loss + backward, bf16 weights and activations) runs on
the ``meta`` device under :class:`pae_fast.kernels.tools.traffic.TrafficCounter` twice: with the fused kernels
(``use_backend("triton")``: the custom ops' fake implementations run) and with the PyTorch references
(``use_backend("torch")``, attention kept on SDPA as in the authors' eager code; attention is charged as one
flash-style op either way). The counts become a predicted step time:

    matmul     = GEMM FLOPs / (70% x 989 TFLOP/s)
    attention  = attention FLOPs / (70% x 989 TFLOP/s) + attention bytes / bandwidth
    bandwidth  = bytes of every other op / bandwidth          (H100 3.35 TB/s, H200 4.8 TB/s)
    step = matmul + attention + bandwidth;   MFU = model FLOPs / (step x 989 TFLOP/s)

Kernels run one after another, so the parts add (no overlap is assumed). Also per fused op (its "model" cases):
reference bytes / fused bytes / minimum bytes (``OpSpec.min_bytes``) for forward + backward.

    python benchmarks/roofline.py                       # LightningDiT-XL/1 and DiTDH-XL, batch 32, bf16
    python benchmarks/roofline.py --models DiTDH-S --batch 8 --out-dir /tmp/r

Writes ``roofline.md`` and ``roofline.json`` to ``--out-dir`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import RESULTS_DIR, environment  # noqa: E402

DEFAULT_MODELS = ("LightningDiT-XL/1", "DiTDH-XL")
GEMM_EFFICIENCY = 0.70
TARGET_BANDWIDTH_RATIO = 0.20  # fused bandwidth-bound bytes <= 20% of the reference's
TARGET_MFU = 0.45  # predicted H100 MFU
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    bandwidth: float  # HBM bytes/s


HARDWARE = {
    "H100": Hardware("H100 SXM", 989e12, 3.35e12),
    "H200": Hardware("H200 SXM", 989e12, 4.8e12),
}


# ----------------------------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------------------------


def predict(summary: dict[str, Any], hw: Hardware, gemm_efficiency: float = GEMM_EFFICIENCY) -> dict[str, float]:
    """Predicted seconds per part of the step and the implied MFU on ``hw`` (see the module docstring)."""
    rate = gemm_efficiency * hw.peak_flops
    matmul_s = summary["matmul_flops"] / rate
    attention_s = summary["attention_flops"] / rate + summary["attention_bytes"] / hw.bandwidth
    bandwidth_s = summary["other_bytes"] / hw.bandwidth
    step_s = matmul_s + attention_s + bandwidth_s
    model_flops = summary["matmul_flops"] + summary["attention_model_flops"]
    return {
        "matmul_s": matmul_s,
        "attention_s": attention_s,
        "bandwidth_s": bandwidth_s,
        "step_s": step_s,
        "model_flops": model_flops,
        "mfu": model_flops / (step_s * hw.peak_flops) if step_s > 0 else 0.0,
    }


# ----------------------------------------------------------------------------------------------------------------
# Counting on the meta device
# ----------------------------------------------------------------------------------------------------------------


def model_input_spec(model: nn.Module) -> dict[str, int]:
    """``in_channels``, ``input_size`` and ``num_classes`` of a generator (its attributes, else the
    :class:`pae_fast.config.GeneratorConfig` defaults)."""
    from pae_fast.config import GeneratorConfig

    d = GeneratorConfig()
    return {
        "in_channels": int(getattr(model, "in_channels", d.in_channels)),
        "input_size": int(getattr(model, "input_size", d.input_size)),
        "num_classes": int(getattr(model, "num_classes", d.num_classes)),
    }


def _scopes(backend: str):
    """Kernel scope for ``backend`` ("fused" or "reference"); the reference keeps attention on SDPA."""
    import contextlib

    from pae_fast import kernels

    stack = contextlib.ExitStack()
    stack.enter_context(kernels.use_backend("triton" if backend == "fused" else "torch"))
    if backend == "reference" and hasattr(kernels, "use_attention_backend"):
        stack.enter_context(kernels.use_attention_backend("sdpa"))
    return stack


def step_traffic(
    build: Callable[[], nn.Module], batch: int, dtype: torch.dtype = torch.bfloat16, backend: str = "fused"
) -> dict[str, Any]:
    """Count one training step (flow-matching forward, loss, backward) of ``build()`` on the meta device.

    Args:
        build: constructs the generator (called under ``torch.device("meta")``).
        batch: batch size.
        dtype: weights and activations (the step is not autocast: a bf16 model, fp32 time and loss).
        backend: ``"fused"`` (``use_backend("triton")``) or ``"reference"`` (``use_backend("torch")``).

    Returns:
        The :meth:`TrafficCounter.summary` plus ``params`` and ``input`` (the model's input spec).
    """
    from pae_fast.kernels.tools.traffic import TrafficCounter

    if backend not in ("fused", "reference"):
        raise ValueError(f"backend must be 'fused' or 'reference', got {backend!r}")
    meta = torch.device("meta")
    with meta:
        model = build()
    model = model.to(device=meta, dtype=dtype).train()
    spec = model_input_spec(model)
    B, C, S = batch, spec["in_channels"], spec["input_size"]
    x1 = torch.empty(B, C, S, S, device=meta, dtype=dtype)
    y = torch.empty(B, device=meta, dtype=torch.long)
    with _scopes(backend), TrafficCounter() as tc:
        # x_t = t x1 + (1 - t) x0, v = x1 - x0 (t = 1 data); loss = MSE + mean(1 - cos) in fp32
        # (docs/method.md § Flow matching)
        t = torch.rand(B, device=meta)
        x0 = torch.randn_like(x1)
        tb = t.to(dtype).view(B, 1, 1, 1)
        x_t = tb * x1 + (1 - tb) * x0
        v = x1 - x0
        v_hat = model(x_t, t, y).float()
        vf = v.float()
        loss = torch.nn.functional.mse_loss(v_hat, vf)
        loss = loss + (1 - torch.nn.functional.cosine_similarity(v_hat, vf, dim=1)).mean()
        loss.backward()
    out = tc.summary()
    out["params"] = sum(p.numel() for p in model.parameters())
    out["input"] = spec
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


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def analyse_model(build: Callable[[], nn.Module], batch: int, dtype: torch.dtype, top: int = 10) -> dict[str, Any]:
    """Fused and reference step counts, predictions on every :data:`HARDWARE` and the targets."""
    res: dict[str, Any] = {}
    for backend in ("fused", "reference"):
        s = step_traffic(build, batch, dtype, backend)
        res["params"], res["input"] = s.pop("params"), s.pop("input")
        s["top_rows"] = [r for r in s.pop("rows") if r["category"] == "other"][:top]
        s["predicted"] = {k: predict(s, hw) for k, hw in HARDWARE.items()}
        res[backend] = s
    f, r = res["fused"], res["reference"]
    ratio = f["other_bytes"] / r["other_bytes"] if r["other_bytes"] else float("nan")
    mfu = f["predicted"]["H100"]["mfu"]
    res["targets"] = {
        "bandwidth_ratio": ratio,
        "bandwidth_ratio_target": TARGET_BANDWIDTH_RATIO,
        "bandwidth_ratio_met": bool(ratio <= TARGET_BANDWIDTH_RATIO),
        "h100_mfu": mfu,
        "h100_mfu_target": TARGET_MFU,
        "h100_mfu_met": bool(mfu >= TARGET_MFU),
    }
    # optimizer + EMA traffic per step, outside the counted forward + backward: fused AdamW on fp32 master
    # weights reads param, grad, m, v and writes param, m, v (28 B/param); EMA reads ema + param, writes ema (12 B)
    n = res["params"]
    res["optimizer_ema_bytes"] = 40 * n
    res["optimizer_ema_h100_s"] = 40 * n / HARDWARE["H100"].bandwidth
    return res


def _target_text(t: dict[str, Any]) -> tuple[str, str]:
    r, m = t["bandwidth_ratio"], t["h100_mfu"]
    rt, mt = t["bandwidth_ratio_target"], t["h100_mfu_target"]
    bw = (
        f"met ({r:.1%} <= {rt:.0%})"
        if t["bandwidth_ratio_met"]
        else f"missed: {r:.1%} of the reference ({(r - rt) * 100:.1f} points over {rt:.0%})"
    )
    mfu = f"met ({m:.1%} >= {mt:.0%})" if t["h100_mfu_met"] else f"missed: {m:.1%} ({(mt - m) * 100:.1f} points short)"
    return bw, mfu


def to_markdown(result: dict[str, Any]) -> str:
    env, a = result["environment"], result["assumptions"]
    lines = [
        "# Roofline: one training step (forward + backward), counted on the meta device",
        "",
        f"Counted {result['date']} on {env['machine']['node']} (torch {env['versions']['torch']}, git "
        f"{(env['git'].get('commit') or 'uncommitted')[:12]}); batch {a['batch']}, {a['dtype']}; GEMMs at "
        f"{a['gemm_efficiency']:.0%} of {a['peak_tflops']:.0f} TFLOP/s, other ops at "
        + ", ".join(f"{k} {v['bandwidth_tbps']} TB/s" for k, v in a["hardware"].items())
        + "; attention: FLOPs at the GEMM rate + bytes at bandwidth. Reference = PyTorch references "
        '(`use_backend("torch")`, attention on SDPA), fused = `use_backend("triton")`.',
        "",
        "## Predicted step time (H100: matmul / attention / bandwidth-bound parts)",
        "",
        "| model | backend | GEMM TFLOP | attn TFLOP | attn GB | bandwidth-bound GB | launches "
        "| H100 matmul ms | H100 attn ms | H100 bw ms | H100 step ms | H100 MFU | H200 step ms | H200 MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in result["models"].items():
        if "error" in m:
            lines.append(f"| {name} | — | {m['error']} |" + " |" * 12)
            continue
        for backend in ("fused", "reference"):
            s = m[backend]
            h, h2 = s["predicted"]["H100"], s["predicted"]["H200"]
            lines.append(
                f"| {name} | {backend} | {s['matmul_flops'] / 1e12:.2f} | {s['attention_flops'] / 1e12:.2f} | "
                f"{s['attention_bytes'] / 1e9:.1f} | {s['other_bytes'] / 1e9:.1f} | {s['launches']} | "
                f"{h['matmul_s'] * 1e3:.1f} | {h['attention_s'] * 1e3:.1f} | {h['bandwidth_s'] * 1e3:.1f} | "
                f"{h['step_s'] * 1e3:.1f} | {h['mfu']:.1%} | {h2['step_s'] * 1e3:.1f} | {h2['mfu']:.1%} |"
            )
    lines += [
        "",
        "## Targets (fused)",
        "",
        "| model | params | bandwidth-bound bytes vs reference (target <= 20%) | predicted H100 MFU (target >= 45%) "
        "| optimizer + EMA, not in the step |",
        "|---|---:|---|---|---|",
    ]
    for name, m in result["models"].items():
        if "error" in m:
            continue
        bw, mfu = _target_text(m["targets"])
        lines.append(
            f"| {name} | {m['params'] / 1e6:.2f}M | {bw} | {mfu} | {m['optimizer_ema_bytes'] / 1e9:.1f} GB "
            f"= {m['optimizer_ema_h100_s'] * 1e3:.1f} ms on H100 |"
        )
    for name, m in result["models"].items():
        if "error" in m:
            continue
        lines += ["", f"### {name}: largest bandwidth-bound ops (GB per step)", ""]
        lines += ["| backend | phase | op | calls | GB |", "|---|---|---|---:|---:|"]
        for backend in ("fused", "reference"):
            for r in m[backend]["top_rows"]:
                lines.append(f"| {backend} | {r['phase']} | `{r['op']}` | {r['calls']} | {r['bytes'] / 1e9:.2f} |")
    if result["ops"]:
        lines += [
            "",
            f"## Fused ops: bytes of forward + backward on their model cases ({a['dtype']})",
            "",
            "| op | case | reference MB | fused MB | minimum MB | reference / fused | fused / minimum "
            "| launches ref → fused |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in result["ops"]:
            if "error" in r:
                lines.append(f"| {r['op']} | {r['case']} | error: {r['error'][:120]} | | | | | |")
                continue
            lines.append(
                f"| {r['op']} | {r['case']} | {r['reference_bytes'] / 1e6:.1f} | {r['fused_bytes'] / 1e6:.1f} | "
                f"{r['min_bytes'] / 1e6:.1f} | {r['reference_bytes'] / max(r['fused_bytes'], 1):.2f}x | "
                f"{r['fused_bytes'] / max(r['min_bytes'], 1):.2f}x | "
                f"{r['reference_launches']} → {r['fused_launches']} |"
            )
    return "\n".join(lines) + "\n"


def run(
    models: dict[str, Callable[[], nn.Module]] | list[str] | tuple[str, ...] = DEFAULT_MODELS,
    batch: int = 32,
    dtype: str = "bf16",
    ops: bool | list[str] = True,
    out_dir: str | Path | None = RESULTS_DIR,
    top: int = 10,
    op_size: str = "model",
) -> dict[str, Any]:
    """Count, predict, and write ``roofline.md`` / ``roofline.json`` (when ``out_dir`` is set).

    Args:
        models: generator names (built at their default options) or ``{label: factory}``.
        batch: batch size of the step.
        dtype: ``bf16 | fp16 | fp32``.
        ops: also measure every op of ``pae_fast.kernels.OPS`` (True) or the listed ones on their cases.
        out_dir: where the files go (None: return only).
        top: largest bandwidth-bound ops listed per model and backend.
        op_size: which ``OpSpec.cases`` size the op table uses ("model": real widths; "small": tests).

    Returns:
        ``{"environment", "date", "assumptions", "models": {name: {...}}, "ops": [...]}``.
    """
    from pae_fast import kernels
    from pae_fast.io import atomic_write_text
    from pae_fast.registry import GENERATORS

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    dt = _DTYPES[dtype]
    op_names = sorted(kernels.OPS) if ops is True else list(ops or [])
    bad = [o for o in op_names if o not in kernels.OPS]
    if bad:
        raise ValueError(f"unknown op(s) {bad}; valid: {', '.join(sorted(kernels.OPS))}")
    if not isinstance(models, dict):
        factories: dict[str, Callable[[], nn.Module] | None] = {}
        for name in models:
            factories[name] = (lambda n=name: GENERATORS.create(n)) if name in GENERATORS else None
    else:
        factories = dict(models)
    result: dict[str, Any] = {
        "environment": environment(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "assumptions": {
            "batch": batch,
            "dtype": dtype,
            "gemm_efficiency": GEMM_EFFICIENCY,
            "peak_tflops": HARDWARE["H100"].peak_flops / 1e12,
            "hardware": {
                k: {"peak_tflops": h.peak_flops / 1e12, "bandwidth_tbps": h.bandwidth / 1e12}
                for k, h in HARDWARE.items()
            },
            "targets": {"bandwidth_ratio": TARGET_BANDWIDTH_RATIO, "h100_mfu": TARGET_MFU},
        },  # fmt: skip
        "models": {},
        "ops": [],
    }
    for name, build in factories.items():
        t0 = time.perf_counter()
        if build is None:
            result["models"][name] = {"error": f"generator {name!r} is not registered (have: {GENERATORS.names()})"}
            continue
        result["models"][name] = analyse_model(build, batch, dt, top)
        result["models"][name]["count_seconds"] = time.perf_counter() - t0
    for op_name in op_names:
        result["ops"] += op_traffic(kernels.OPS[op_name], dt, op_size)
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_text(out / "roofline.json", json.dumps(result, indent=1, default=_json_default))
        atomic_write_text(out / "roofline.md", to_markdown(result))
    return result


def _json_default(o: Any) -> Any:
    if isinstance(o, Hardware):
        return asdict(o)
    return str(o)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), help="registered generator names")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--no-ops", action="store_true", help="skip the per-op table")
    p.add_argument("--ops", nargs="*", default=None, help="ops of the per-op table (default: all)")
    p.add_argument("--top", type=int, default=10, help="largest bandwidth-bound ops listed per model")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    a = p.parse_args(argv)
    if a.batch < 1:
        p.error(f"--batch must be >= 1, got {a.batch}")
    ops = False if a.no_ops else (a.ops if a.ops else True)
    try:
        res = run(a.models, a.batch, a.dtype, ops=ops, out_dir=a.out_dir, top=a.top)
    except ValueError as e:  # unknown op names
        p.error(str(e))
    print(to_markdown(res))
    print(f"wrote {Path(a.out_dir) / 'roofline.md'} and roofline.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

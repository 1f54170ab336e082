"""Roofline of one generator training step as the engine runs it, counted on fake tensors (no GPU, no memory).

The step (:mod:`roofline_step`) is the engine's at its defaults (``TrainConfig``: ``train.precision``,
``train.optimizer``, the EMA): forward + loss + backward under the precision policy, then the optimizer and EMA
update. It is counted twice, with the fused kernels selected explicitly (``use_backend("triton")``) and with the
PyTorch references (``use_backend("torch")``); attention is SDPA on both sides, charged flash-style. The counts
become a predicted step time. ``train.optimizer: auto`` is counted as resolved on one H100 with Triton (fused row:
``fused_adamw_ema``; reference row, ``kernel_backend=torch``: torch's AdamW); a labelled comparison row counts the
fused step with the other optimizer. Assumptions (stated in every report):

    matmul     = GEMM FLOPs / (GEMM efficiency 70% x 989 TFLOP/s dense bf16); a fused GEMM op (an ``OpSpec`` with
                 ``flops``, e.g. ``swiglu_mlp``: Triton GEMMs with the SwiGLU gate in their epilogues) is charged per
                 call max(its FLOPs at that rate, its bytes at the bandwidth below): a Triton GEMM is assumed to
                 run at cuBLAS's efficiency (calibrated by ``kernels.validate`` / ``bench_train_step.py --device
                 cuda`` on the first GPU run), and an epilogue is not free where it would be bandwidth-bound
    attention  = attention FLOPs / (the same rate) + attention bytes / (HBM efficiency x bandwidth);
                 cuDNN attention on sm_90 runs head_dim 72 unpadded (the default); FlashAttention-2 pads it to 96
                 (``--attention fa2`` charges the padded FLOPs)
    bandwidth  = (bandwidth-bound bytes of the step + optimizer/EMA bytes) / (HBM efficiency 87.5% x bandwidth)
                 (H100 SXM 3.35 TB/s, H200 4.8 TB/s; 85-90% of peak is what streaming kernels reach)
    step = matmul + attention + bandwidth (kernels run one after another: no overlap);
    MFU = model FLOPs (6 x forward MACs x 2, attention backward = 2 x forward) / (step x peak)

A second set of charges, :data:`PEAK_CHARGES` (DESIGN.md's and issue 27's tables: GEMMs at 70%, every other byte at
the full 3.35 TB/s, attention as its FLOPs at the GEMM rate with no separate bytes), is reported beside the first
("MFU at peak bandwidth" columns); issue 27's targets are read at those charges.

Also per op type (fused / reference / minimum bytes, :func:`roofline_step.by_op_type`) and per fused op on its
"model" cases (reference / fused / ``OpSpec.min_bytes`` for forward + backward, on the meta device).

    python benchmarks/roofline.py                       # LightningDiT-XL/1 and DiTDH-XL, batch 32, engine defaults
    python benchmarks/roofline.py --precision bf16-autocast --models DiTDH-S --batch 8 --out-dir /tmp/r

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
from roofline_report import to_markdown  # noqa: E402

DEFAULT_MODELS = ("LightningDiT-XL/1", "DiTDH-XL")
DEFAULT_TOKENIZERS = ("PAE-DINOv2-L-d32",)  # the main command's tokenizer rows (roofline_tokenizer.analyse_tokenizer)
GEMM_EFFICIENCY = 0.70  # of dense bf16 peak, for the large GEMMs of these models
TRITON_GEMM_EFFICIENCIES = (0.70, 0.60, 0.50)  # the report's sensitivity columns for the fused (Triton) GEMM ops
# the preset each default model trains with: its train.grad_clip and train.ema_decay are counted ("as it trains")
MODEL_PRESETS = {"LightningDiT-XL/1": "pae_lightningdit_xl1_80ep", "DiTDH-XL": "rae_ditdh_xl"}
HBM_EFFICIENCY = 0.875  # of peak HBM bandwidth (streaming kernels reach 85-90%)
# DESIGN.md's / issue 27's charges: bytes at the full peak bandwidth, attention charged by its FLOPs only
PEAK_CHARGES: dict[str, Any] = {"hbm_efficiency": 1.0, "attention_io": False}
TARGET_MFU_PEAK = 0.50  # issue 27: predicted H100 MFU at PEAK_CHARGES, every default model and the tokenizer step
ATTENTION_KERNELS = ("cudnn", "fa2")  # cuDNN: head_dim 72 unpadded on sm_90; FlashAttention-2: padded to 96
TARGET_BANDWIDTH_RATIO = 0.20  # fused bandwidth-bound bytes (forward + backward) <= 20% of the reference's
TARGET_STEP_GB = {"LightningDiT-XL/1": 44.0}  # fused bandwidth-bound GB (forward + backward) at batch 32
TARGET_MFU = 0.45  # predicted H100 MFU of the whole step (optimizer and EMA included)
# the comparison row: the fused step with the other AdamW implementation than the default row's
COMPARISON_OPTIMIZER = {"fused_adamw_ema": "adamw", "adamw": "fused_adamw_ema"}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # per-op table dtypes


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


def predict(
    summary: dict[str, Any],
    hw: Hardware,
    gemm_efficiency: float = GEMM_EFFICIENCY,
    hbm_efficiency: float = HBM_EFFICIENCY,
    attention: str = "cudnn",
    triton_gemm_efficiency: float | None = None,
    attention_io: bool = True,
) -> dict[str, float]:
    """Predicted seconds per part of the step and the implied MFU on ``hw`` (see the module docstring).

    ``attention_io=False`` charges attention by its FLOPs only (:data:`PEAK_CHARGES`).

    ``triton_gemm_efficiency`` charges the fused GEMM ops (our Triton GEMMs with epilogues) at their own fraction of
    peak (None: ``gemm_efficiency``, as efficient as cuBLAS), the sensitivity the report shows until a GPU measures it.

    ``summary`` holds ``matmul_flops``, ``attention_flops`` (``attention_padded_flops`` for ``fa2``),
    ``attention_model_flops``, ``attention_bytes``, ``other_bytes`` and optionally ``update_bytes`` (optimizer +
    EMA) and ``fused_gemm`` (:meth:`TrafficCounter.summary`: calls of fused GEMM ops, whose FLOPs are part of
    ``matmul_flops``; each is charged max(FLOPs / GEMM rate, bytes / bandwidth)).
    """
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
    rate = gemm_efficiency * hw.peak_flops
    bw = hbm_efficiency * hw.bandwidth
    attn_flops = summary.get("attention_padded_flops", summary["attention_flops"]) if attention == "fa2" else (
        summary["attention_flops"])  # fmt: skip
    fused = summary.get("fused_gemm", [])
    fused_flops = sum(c["calls"] * c["flops"] for c in fused)
    rate_t = (gemm_efficiency if triton_gemm_efficiency is None else triton_gemm_efficiency) * hw.peak_flops
    fused_s = sum(c["calls"] * max(c["flops"] / rate_t, c["bytes"] / bw) for c in fused)
    matmul_s = (summary["matmul_flops"] - fused_flops) / rate + fused_s
    attention_s = attn_flops / rate + (summary["attention_bytes"] / bw if attention_io else 0.0)
    bandwidth_s = summary["other_bytes"] / bw
    update_s = summary.get("update_bytes", 0) / bw
    step_s = matmul_s + attention_s + bandwidth_s + update_s
    model_flops = summary["matmul_flops"] + summary["attention_model_flops"]
    return {
        "matmul_s": matmul_s,
        "fused_gemm_s": fused_s,
        "attention_s": attention_s,
        "bandwidth_s": bandwidth_s,
        "update_s": update_s,
        "step_s": step_s,
        "model_flops": model_flops,
        "mfu": model_flops / (step_s * hw.peak_flops) if step_s > 0 else 0.0,
    }


# ----------------------------------------------------------------------------------------------------------------
# Counting on the meta device
# ----------------------------------------------------------------------------------------------------------------


def step_traffic(
    build: Callable[[], nn.Module],
    batch: int,
    precision: str | None = None,
    backend: str = "fused",
    optimizer: str | None = None,
    grad_clip: float | None = None,
) -> dict[str, Any]:
    """Count one training step of ``build()`` as the engine runs it (:func:`roofline_step.count_step`).

    Args:
        build: constructs the generator (fp32, as the engine receives it).
        batch: batch size.
        precision: ``train.precision`` (None: the engine default, ``TrainConfig().precision``).
        backend: ``"fused"`` (``use_backend("triton")``) or ``"reference"`` (``use_backend("torch")``).
        optimizer: ``train.optimizer`` (None: the engine default; ``auto`` is resolved for one H100,
            :func:`roofline_step.engine_optimizer`).
        grad_clip: ``train.grad_clip`` (None: the engine default, off).

    Returns:
        The forward + backward :meth:`TrafficCounter.summary` plus ``update_bytes`` / ``update_launches`` (the
        optimizer and EMA), ``optimizer`` (the one counted), ``op_types`` (:func:`roofline_step.by_op_type`),
        ``params`` and ``input``.
    """
    from roofline_step import by_op_type, count_step

    from pae_fast.config import TrainConfig

    d = TrainConfig()
    clip = d.grad_clip if grad_clip is None else grad_clip
    counted = count_step(build, batch, backend, precision or d.precision, optimizer or d.optimizer, d.ema_decay, clip)
    out = counted["step"]
    out["grad_clip"] = clip
    out["update_bytes"] = counted["update"]["other_bytes"] + counted["update"]["matmul_bytes"]
    out["update_launches"] = counted["update"]["launches"]
    out["optimizer"] = counted["optimizer"]
    out["op_types"] = by_op_type(counted)
    out["params"], out["input"] = counted["params"], counted["input"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def analyse_model(
    build: Callable[[], nn.Module],
    batch: int,
    precision: str | None = None,
    optimizer: str | None = None,
    top: int = 10,
    target_gb: float | None = None,
    grad_clip: float | None = None,
) -> dict[str, Any]:
    """Fused and reference step counts, predictions on every :data:`HARDWARE` (and on the H100 with the Triton
    GEMMs at each of :data:`TRITON_GEMM_EFFICIENCIES`) and the targets."""
    from roofline_step import engine_optimizer

    from pae_fast.config import TrainConfig

    res: dict[str, Any] = {}
    d = TrainConfig()
    optimizer = optimizer or d.optimizer
    default = engine_optimizer(optimizer, precision or d.precision, "fused")  # what the engine runs on one H100
    variants = [("fused", "fused", optimizer), ("reference", "reference", optimizer)]
    alt = COMPARISON_OPTIMIZER.get(default)
    if alt is not None:  # the same fused step with the other AdamW implementation, for comparison
        res["comparison"] = f"fused + {alt}"
        variants.append((res["comparison"], "fused", alt))
    for key, backend, opt in variants:
        s = step_traffic(build, batch, precision, backend, opt, grad_clip)
        res["params"], res["input"] = s.pop("params"), s.pop("input")
        s["top_rows"] = [r for r in s.pop("rows") if r["category"] == "other"][:top]
        s["predicted"] = {k: predict(s, hw) for k, hw in HARDWARE.items()}
        s["predicted_fa2"] = {k: predict(s, hw, attention="fa2") for k, hw in HARDWARE.items()}
        s["predicted_peak"] = predict(s, HARDWARE["H100"], **PEAK_CHARGES)
        s["h100_mfu_by_triton_gemm_efficiency"] = {
            f"{e:.2f}": predict(s, HARDWARE["H100"], triton_gemm_efficiency=e)["mfu"] for e in TRITON_GEMM_EFFICIENCIES}
        res[key] = s
    f, r = res["fused"], res["reference"]
    ratio = f["other_bytes"] / r["other_bytes"] if r["other_bytes"] else float("nan")
    mfu = f["predicted"]["H100"]["mfu"]
    res["targets"] = {
        "bandwidth_ratio": ratio,
        "bandwidth_ratio_target": TARGET_BANDWIDTH_RATIO,
        "bandwidth_ratio_met": bool(ratio <= TARGET_BANDWIDTH_RATIO),
        "step_gb": f["other_bytes"] / 1e9,
        "step_gb_target": target_gb,
        "step_gb_met": None if target_gb is None else bool(f["other_bytes"] / 1e9 <= target_gb),
        "h100_mfu": mfu,
        "h100_mfu_target": TARGET_MFU,
        "h100_mfu_met": bool(mfu >= TARGET_MFU),
        "h100_mfu_peak": f["predicted_peak"]["mfu"],
        "h100_mfu_peak_target": TARGET_MFU_PEAK,
        "h100_mfu_peak_met": bool(f["predicted_peak"]["mfu"] >= TARGET_MFU_PEAK),
    }
    res["optimizer_ema_bytes"] = f["update_bytes"]
    res["optimizer_ema_h100_s"] = f["predicted"]["H100"]["update_s"]
    return res


def preset_grad_clip(model: str) -> float:
    """``train.grad_clip`` of the preset ``model`` trains with (:data:`MODEL_PRESETS`; 0 = off for others)."""
    from pae_fast.config import load_config
    from pae_fast.config_io import preset_path

    preset = MODEL_PRESETS.get(model)
    return float(load_config(preset_path(preset)).train.grad_clip) if preset else 0.0


def run(
    models: dict[str, Callable[[], nn.Module]] | list[str] | tuple[str, ...] = DEFAULT_MODELS,
    batch: int = 32,
    precision: str | None = None,
    optimizer: str | None = None,
    ops: bool | list[str] = True,
    out_dir: str | Path | None = RESULTS_DIR,
    top: int = 10,
    op_size: str = "model",
    op_dtype: str = "bf16",
    grad_clip: float | None = None,
    tokenizers: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """Count, predict, and write ``roofline.md`` / ``roofline.json`` (when ``out_dir`` is set).

    Args:
        models: generator names (built at their default options) or ``{label: factory}``.
        batch: batch size of the step.
        precision: ``train.precision`` of the counted step (None: the engine default).
        optimizer: ``train.optimizer`` (None: the engine default).
        ops: also measure every op of ``pae_fast.kernels.OPS`` (True) or the listed ones on their cases.
        out_dir: where the files go (None: return only).
        top: largest bandwidth-bound ops listed per model and backend.
        op_size: which ``OpSpec.cases`` size the op table uses ("model": real widths; "small": tests).
        op_dtype: ``bf16 | fp16 | fp32`` of the per-op table.
        grad_clip: ``train.grad_clip`` of every counted step (None: each model's preset, :data:`MODEL_PRESETS`, and
            the engine default, off, for a model without one).
        tokenizers: tokenizer names whose training step is counted too (``roofline_tokenizer.analyse_tokenizer``:
            as ``train-tokenizer`` runs it, at ``batch``, its preset's clipping and EMA).

    Returns:
        ``{"environment", "date", "assumptions", "models": {name: {...}}, "ops": [...]}``.
    """
    from roofline_step import engine_optimizer

    from pae_fast import kernels
    from pae_fast.config import TrainConfig
    from pae_fast.engine.precision import PRECISIONS
    from pae_fast.io import atomic_write_text
    from pae_fast.registry import GENERATORS

    d = TrainConfig()
    precision, optimizer = precision or d.precision, optimizer or d.optimizer
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if op_dtype not in _DTYPES:
        raise ValueError(f"op_dtype must be one of {', '.join(_DTYPES)}, got {op_dtype!r}")
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
            "precision": precision,
            "optimizer": optimizer,
            "optimizer_h100": engine_optimizer(optimizer, precision, "fused"),
            "optimizer_reference": engine_optimizer(optimizer, precision, "reference"),
            "ema": True,
            "op_dtype": op_dtype,
            "gemm_efficiency": GEMM_EFFICIENCY,
            "triton_gemm_efficiencies": list(TRITON_GEMM_EFFICIENCIES),
            "hbm_efficiency": HBM_EFFICIENCY,
            "peak_charges": PEAK_CHARGES,
            "attention": "cuDNN (head_dim 72 unpadded on sm_90); FA2 column: head_dim rounded up to 32",
            "peak_tflops": HARDWARE["H100"].peak_flops / 1e12,
            "hardware": {
                k: {"peak_tflops": h.peak_flops / 1e12, "bandwidth_tbps": h.bandwidth / 1e12}
                for k, h in HARDWARE.items()
            },
            "targets": {"bandwidth_ratio": TARGET_BANDWIDTH_RATIO, "h100_mfu": TARGET_MFU, "step_gb": TARGET_STEP_GB,
                        "h100_mfu_peak": TARGET_MFU_PEAK},
        },  # fmt: skip
        "models": {},
        "ops": [],
    }
    for name, build in factories.items():
        t0 = time.perf_counter()
        if build is None:
            result["models"][name] = {"error": f"generator {name!r} is not registered (have: {GENERATORS.names()})"}
            continue
        target = TARGET_STEP_GB.get(name) if batch == 32 else None
        clip = preset_grad_clip(name) if grad_clip is None else grad_clip
        result["models"][name] = analyse_model(build, batch, precision, optimizer, top, target, clip)
        result["models"][name]["grad_clip"] = clip
        result["models"][name]["count_seconds"] = time.perf_counter() - t0
    result["tokenizers"] = {}
    for name in tokenizers:
        from roofline_tokenizer import analyse_tokenizer

        result["tokenizers"][name] = analyse_tokenizer(name, batch)
    from roofline_step import op_traffic

    for op_name in op_names:
        result["ops"] += op_traffic(kernels.OPS[op_name], _DTYPES[op_dtype], op_size)
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
    p.add_argument("--precision", default=None, help="train.precision of the step (default: the engine's)")
    p.add_argument("--optimizer", default=None,
                   help="train.optimizer (default: the engine's, auto: what it picks on one H100 with Triton)")
    p.add_argument("--op-dtype", default="bf16", choices=sorted(_DTYPES), help="dtype of the per-op table")
    p.add_argument("--no-ops", action="store_true", help="skip the per-op table")
    p.add_argument("--ops", nargs="*", default=None, help="ops of the per-op table (default: all)")
    p.add_argument("--top", type=int, default=10, help="largest bandwidth-bound ops listed per model")
    p.add_argument("--tokenizers", nargs="*", default=list(DEFAULT_TOKENIZERS),
                   help="tokenizers whose training step is counted too (none: --tokenizers with no name)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    a = p.parse_args(argv)
    if a.batch < 1:
        p.error(f"--batch must be >= 1, got {a.batch}")
    ops = False if a.no_ops else (a.ops if a.ops else True)
    try:
        res = run(a.models, a.batch, a.precision, a.optimizer, ops=ops, out_dir=a.out_dir, top=a.top,
                  op_dtype=a.op_dtype, tokenizers=a.tokenizers)
    except ValueError as e:  # unknown op names, precision
        p.error(str(e))
    print(to_markdown(res))
    print(f"wrote {Path(a.out_dir) / 'roofline.md'} and roofline.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

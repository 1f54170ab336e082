"""The context every item of ``gpu_first_light.py`` runs in (:class:`Ctx`: device, sizes, calibration, the rows
and details it writes) and the prediction at the calibrated peaks (:func:`predict`).

Sizes (:data:`SIZES`): ``gpu`` = model sizes (LightningDiT-XL/1, PAE-DINOv2-L-d32, batch 32); ``dry`` = the tiny
variants on CPU (``configs/tiny_cpu.yaml``, ``PAE-tiny``), for ``--dry-run``.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES: dict[str, dict[str, Any]] = {
    "gpu": dict(gemm_n=8192, copy_mib=1024, calib_iters=20, val_size="model", val_dtypes=("bf16", "fp16", "fp32"),
                dit=None, dit_batch=32, dit_steps=20, dit_warmup=3, dit_compile=True, tok="PAE-DINOv2-L-d32",
                tok_batch=32, tok_steps=5, tok_warmup=2, opt_steps=10,
                attn={"DiT (LightningDiT-XL: 256 tokens, 16 x 72)": (32, 16, 256, 72),
                      "VFM (DINOv2-L: 261 tokens, 16 x 64)": (32, 16, 261, 64)},
                attn_dtype=torch.bfloat16, attn_iters=20),
    "dry": dict(gemm_n=256, copy_mib=16, calib_iters=3, val_size="small", val_dtypes=("fp32",),
                dit=CONFIGS / "tiny_cpu.yaml", dit_batch=2, dit_steps=1, dit_warmup=0, dit_compile=False,
                tok="PAE-tiny", tok_batch=2, tok_steps=1, tok_warmup=0, opt_steps=10,
                attn={"DiT (tiny: 16 tokens, 2 x 72)": (2, 2, 16, 72), "VFM (tiny: 17 tokens, 2 x 64)": (2, 2, 17, 64)},
                attn_dtype=torch.float32, attn_iters=1),
}  # fmt: skip
class Stop(Exception):
    """The item's deadline passed between two sub-measurements."""


@dataclass
class Ctx:
    """What an item reads (device, sizes, calibration) and writes (rows, details) — flushed to ``result``."""

    dev: torch.device
    dry: bool
    calib: dict[str, float]
    result: Path
    deadline: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> dict[str, Any]:
        return SIZES["dry" if self.dry else "gpu"]

    def row(self, label: str, measured: float | None, predicted: float | None = None, unit: str = "",
            status: str = "ok", note: str = "") -> dict[str, Any]:
        """Add (and write) one measurement; ratio = measured / predicted. Returns the row, for :meth:`predicted`."""
        r = dict(label=label, status=status, measured=measured, predicted=None, unit=unit, ratio=None, note=note)
        self.rows.append(r)
        self.predicted(r, predicted)
        return r

    def predicted(self, r: dict[str, Any], value: float | None) -> None:
        """Set a row's prediction once it is counted (the measurement is already written, in case of a cut-off)."""
        r["predicted"] = value
        r["ratio"] = r["measured"] / value if r["measured"] is not None and value else None
        self.flush()

    def flush(self, status: str = "running", error: str | None = None) -> None:
        from pae_fast.io import atomic_write_text

        rec = {"status": status, "error": error, "rows": self.rows, "details": self.details}
        atomic_write_text(self.result, json.dumps(rec, indent=1, default=str))

    def check(self) -> None:
        if time.time() > self.deadline:
            raise Stop("time cap reached between sub-measurements")

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)


def timed(ctx: Ctx, fn: Callable[[], Any], iters: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls after ``warmup`` (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hardware(ctx: Ctx) -> tuple[Any, float, float]:
    """The roofline's hardware entry for this device and the GEMM / HBM efficiencies to predict with.

    With calibration: efficiency = measured rate / the entry's peak, so ``roofline.predict`` runs at the measured
    rates (MFU stays relative to the nominal peak). A device the roofline does not know gets an entry of the measured
    rates (efficiency 1). Without calibration: the roofline's assumed efficiencies."""
    import roofline

    name = torch.cuda.get_device_name(ctx.dev) if ctx.dev.type == "cuda" else "cpu"
    hw = next((h for k, h in roofline.HARDWARE.items() if k in name), None)
    gemm, bw = ctx.calib.get("gemm_flops"), ctx.calib.get("copy_bytes_per_s")
    if hw is None:
        if not (gemm and bw):
            return None, 0.0, 0.0
        return roofline.Hardware(f"{name} (calibrated)", gemm, bw), 1.0, 1.0
    if not (gemm and bw):
        return hw, roofline.GEMM_EFFICIENCY, roofline.HBM_EFFICIENCY
    return hw, gemm / hw.peak_flops, bw / hw.bandwidth


def predict(ctx: Ctx, summary: dict[str, Any]) -> dict[str, float] | None:
    """``roofline.predict`` of a counted ``summary`` at this machine's calibrated rates (None: unknown machine)."""
    import roofline

    hw, ge, he = hardware(ctx)
    if hw is None:
        return None
    return {**roofline.predict(summary, hw, gemm_efficiency=ge, hbm_efficiency=he), "gemm_efficiency": ge,
            "hbm_efficiency": he, "hardware": hw.name}


def free(ctx: Ctx) -> None:
    gc.collect()
    if ctx.dev.type == "cuda":
        torch.cuda.empty_cache()



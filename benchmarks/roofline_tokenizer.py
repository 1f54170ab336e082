"""Roofline of one tokenizer training step (PAE-DINOv2-L-d32 by default), counted on the meta device.

The step is ``train-tokenizer``'s (:mod:`tokenizer_step`): frozen VFM forward, DAM, projector, refined-prior
targets, the reconstruction and both MCR decoder passes as one batch, LPIPS (VGG-16) on the reconstruction and the
four MCR pairs, the GAN generator term (frozen DINO-S/8 discriminator backbone, forward + backward to the image)
with its adaptive weight (one extra autograd pass to the last decoder layer), SSR (Gram kernel), SCR, backward;
then the discriminator step (real + fake passes, backward into the heads). Weights and activations are bf16 (no
autocast), the losses fp32; LPIPS and the discriminator are counted in fp32, since their code casts its inputs
to fp32 (under CUDA autocast their GEMMs would run in bf16: the count overstates their elementwise bytes up to 2x,
for fused and reference alike). It is counted with the same
:class:`pae_fast.kernels.tools.traffic.TrafficCounter`, backend scopes and prediction as ``roofline.py`` (whose
helpers are imported): fused = ``use_backend("triton")``, reference = ``use_backend("torch")`` with attention on SDPA.

MFU counts every executed FLOP as work, the frozen VFM's and the frozen discriminator backbone's forward included
(they are real work of the step even though nothing of theirs is trained). Optimizer + EMA traffic is reported
beside the step, not inside it: ``train.optimizer: auto`` on an H100 is the one-kernel AdamW + EMA + bf16 copy
(``fused_adamw_ema``, 36 B per trainable parameter; torch's fused AdamW + EMA would be 40 B, 52 B with the bf16
copy); the frozen VFM is shared with the EMA, not averaged (``engine.optim.make_ema``).

    python benchmarks/roofline_tokenizer.py                        # PAE-DINOv2-L-d32, batch 32, bf16
    python benchmarks/roofline_tokenizer.py --model PAE-tiny --batch 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import environment  # noqa: E402
from roofline import HARDWARE, predict  # noqa: E402

TARGET_BANDWIDTH_RATIO = 0.35  # issue 13: fused bandwidth-bound bytes <= 35% of the reference's
TARGET_MFU = 0.40  # issue 13: predicted H100 MFU with the frozen forward counted as work


def _scopes(backend: str) -> contextlib.ExitStack:
    """The kernel scope of ``backend``, as ``roofline_step.count_step`` sets it: fused = the Triton ops selected
    explicitly (counted, not run: ``counting_only``), reference = the PyTorch references; attention is SDPA on both."""
    from pae_fast import kernels
    from pae_fast.kernels._dispatch import counting_only

    stack = contextlib.ExitStack()
    stack.enter_context(kernels.use_backend("triton" if backend == "fused" else "torch"))
    stack.enter_context(kernels.use_attention_backend("sdpa"))
    if backend == "fused":
        stack.enter_context(counting_only())
    return stack


def tokenizer_step_traffic(name: str = "PAE-DINOv2-L-d32", batch: int = 32, dtype: torch.dtype = torch.bfloat16,
                           backend: str = "fused", **tokenizer_overrides: Any) -> dict[str, Any]:
    """Count one tokenizer training step on the meta device.

    Args:
        name: registered tokenizer.
        batch: images per step (per GPU).
        dtype: weights and activations.
        backend: ``"fused"`` or ``"reference"``.
        tokenizer_overrides: ``tokenizer.*`` values (e.g. ``mcr=False`` to see a regularizer's cost).
    Returns:
        :meth:`TrafficCounter.summary` plus ``trainable_params`` and ``frozen_params``.
    """
    from tokenizer_step import build_step, step_losses

    from pae_fast.kernels.tools.traffic import TrafficCounter

    if backend not in ("fused", "reference"):
        raise ValueError(f"backend must be 'fused' or 'reference', got {backend!r}")
    meta = torch.device("meta")
    parts = build_step(name, meta, **tokenizer_overrides)
    parts.model.to(dtype)  # LPIPS and the discriminator stay fp32: their code casts its inputs to fp32
    if parts.model.shared.projector is not None:
        parts.model.shared.projector.to(dtype)
    images = torch.empty(batch, 3, parts.image_size, parts.image_size, device=meta, dtype=dtype)
    with _scopes(backend), TrafficCounter() as tc:
        step_losses(parts, images, step=0)
    out = tc.summary()
    out["trainable_params"] = parts.trainable_params()
    out["frozen_params"] = sum(p.numel() for p in parts.model.parameters()) - sum(
        p.numel() for p in parts.model.tok.trainable_parameters())
    return out


def analyse_tokenizer(name: str = "PAE-DINOv2-L-d32", batch: int = 32, dtype: torch.dtype = torch.bfloat16,
                      top: int = 8) -> dict[str, Any]:
    """Fused and reference counts, predictions on every roofline hardware, and issue 13's targets."""
    res: dict[str, Any] = {"model": name, "batch": batch}
    for backend in ("fused", "reference"):
        s = tokenizer_step_traffic(name, batch, dtype, backend)
        res["trainable_params"], res["frozen_params"] = s.pop("trainable_params"), s.pop("frozen_params")
        s["top_rows"] = [r for r in s.pop("rows") if r["category"] == "other"][:top]
        s["predicted"] = {k: predict(s, hw) for k, hw in HARDWARE.items()}
        res[backend] = s
    f, r = res["fused"], res["reference"]
    ratio = f["other_bytes"] / r["other_bytes"] if r["other_bytes"] else float("nan")
    mfu = f["predicted"]["H100"]["mfu"]
    res["targets"] = {"bandwidth_ratio": ratio, "bandwidth_ratio_target": TARGET_BANDWIDTH_RATIO,
                      "bandwidth_ratio_met": bool(ratio <= TARGET_BANDWIDTH_RATIO), "h100_mfu": mfu,
                      "h100_mfu_target": TARGET_MFU, "h100_mfu_met": bool(mfu >= TARGET_MFU)}
    from roofline_step import OPTIMIZER_EMA_MIN_BYTES_PER_PARAM, engine_optimizer

    n = res["trainable_params"]
    res["optimizer"] = engine_optimizer("auto", "bf16", "fused")  # what train.optimizer=auto runs on an H100
    per_param = OPTIMIZER_EMA_MIN_BYTES_PER_PARAM if res["optimizer"] == "fused_adamw_ema" else 52
    res["optimizer_ema_bytes"] = per_param * n
    res["optimizer_ema_h100_s"] = per_param * n / HARDWARE["H100"].bandwidth
    return res


def format_rows(res: dict[str, Any]) -> str:
    """Markdown rows in roofline.md's step-table layout, plus the targets line."""
    lines = ["| model | backend | GEMM TFLOP | attn TFLOP | attn GB | bandwidth-bound GB | launches | H100 matmul ms "
             "| H100 attn ms | H100 bw ms | H100 step ms | H100 MFU | H200 step ms | H200 MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for backend in ("fused", "reference"):
        s = res[backend]
        h, h2 = s["predicted"]["H100"], s["predicted"]["H200"]
        lines.append(
            f"| {res['model']} step (batch {res['batch']}) | {backend} | {s['matmul_flops'] / 1e12:.2f} | "
            f"{s['attention_flops'] / 1e12:.2f} | {s['attention_bytes'] / 1e9:.1f} | {s['other_bytes'] / 1e9:.1f} | "
            f"{s['launches']} | {h['matmul_s'] * 1e3:.1f} | {h['attention_s'] * 1e3:.1f} | "
            f"{h['bandwidth_s'] * 1e3:.1f} | {h['step_s'] * 1e3:.1f} | {h['mfu']:.1%} | {h2['step_s'] * 1e3:.1f} | "
            f"{h2['mfu']:.1%} |")
    t = res["targets"]
    lines.append("")
    lines.append(
        f"targets (fused): bandwidth-bound bytes {t['bandwidth_ratio']:.1%} of the reference (target <= "
        f"{t['bandwidth_ratio_target']:.0%}: {'met' if t['bandwidth_ratio_met'] else 'missed'}); predicted H100 MFU "
        f"{t['h100_mfu']:.1%} (target >= {t['h100_mfu_target']:.0%}: {'met' if t['h100_mfu_met'] else 'missed'}); "
        f"optimizer + EMA ({res['optimizer']}) outside the step: {res['optimizer_ema_bytes'] / 1e9:.1f} GB = "
        f"{res['optimizer_ema_h100_s'] * 1e3:.1f} ms on H100 ({res['trainable_params'] / 1e6:.1f}M trainable, "
        f"{res['frozen_params'] / 1e6:.1f}M frozen tokenizer parameters)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="PAE-DINOv2-L-d32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    res = analyse_tokenizer(a.model, a.batch, dtype)
    res["dtype"] = a.dtype
    res["environment"] = environment()
    print(format_rows(res))
    if a.json_out:
        from pae_fast.io import atomic_write_text

        atomic_write_text(a.json_out, json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Roofline of one tokenizer training step (PAE-DINOv2-L-d32 by default), counted on the meta device.

The step is ``train-tokenizer``'s (:mod:`tokenizer_step`): frozen VFM forward, DAM, projector, refined-prior
targets, the reconstruction and both MCR decoder passes as one batch, LPIPS (VGG-16) on the reconstruction and the
four MCR pairs, the GAN generator term (frozen DINO-S/8 discriminator backbone, forward + backward to the image)
with its adaptive weight (one extra autograd pass to the last decoder layer), SSR (Gram kernel), SCR, backward;
then the discriminator step (real + fake passes, backward into the heads). Weights and activations are bf16 (no
autocast), the losses fp32; LPIPS's frozen trunk in the compute dtype (as the stage keeps it); the discriminator
as the stage runs it: its frozen backbone held once in the compute dtype (``DinoDiscriminator.use_compute_dtype``),
its heads fp32 (their GEMMs bf16 under CUDA autocast). It is counted with the same
:class:`pae_fast.kernels.tools.traffic.TrafficCounter`, backend scopes and prediction as ``roofline.py`` (whose
helpers are imported): fused = ``use_backend("triton")``, reference = ``use_backend("torch")`` with attention on SDPA.

MFU counts every executed FLOP as work, the frozen VFM's and the frozen discriminator backbone's forward included
(they are real work of the step even though nothing of theirs is trained). The update is inside the step, as
``train-tokenizer`` runs it: fp32 masters with the engine's bf16 compute copy of the tokenizer (the discriminator
has none: fp32 heads, a bf16 frozen backbone), ``train.optimizer: auto`` as on one H100 (``fused_adamw_ema``: 36 B per
trainable parameter, + 2 B with the preset's gradient clip applied inside it), the EMA of the tokenizer (the frozen
VFM is shared with the EMA, not averaged: ``engine.optim.make_ema``); the discriminator's heads have their own
optimizer and no EMA. The modules are built on the meta device and counted on fake CPU tensors (no memory; torch's
fused AdamW refuses meta tensors).

    python benchmarks/roofline_tokenizer.py                        # PAE-DINOv2-L-d32, batch 32, bf16
    python benchmarks/roofline_tokenizer.py --model PAE-tiny --batch 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import environment  # noqa: E402
from roofline import HARDWARE, PEAK_CHARGES, TARGET_MFU_PEAK, TRITON_GEMM_EFFICIENCIES, predict  # noqa: E402
from roofline_report import met_text  # noqa: E402
from roofline_step import fake_mode  # noqa: E402

# Issue 27's targets, read at roofline.PEAK_CHARGES: predicted H100 MFU >= 50% (the frozen forward counted as work)
# with at most half of the bandwidth-bound bytes that issue 27 counted for RAE's stage-1 code at the same size
# (PAE-DINOv2-L-d32 at 256 px, batch 32: 431 GB, its table; RAE's code cannot be counted here: no copy of it)
RAE_STAGE1_GB = 431.0
TARGET_RAE_RATIO = 0.50


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


def _fake_cpu(root: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    """Replace every parameter and buffer of ``root`` (built on meta) by an empty CPU tensor of the same shape and
    ``requires_grad``, floating ones in ``dtype`` (None: their own); call under :func:`roofline_step.fake_mode` (fake
    tensors: no memory; ``Module.to`` cannot swap fake parameters)."""

    def like(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

    for m in root.modules():
        for n, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[n] = torch.nn.Parameter(like(p), p.requires_grad)
        for n, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[n] = like(b)


def _count(parts: Any, batch: int, dtype: torch.dtype, backend: str, update: bool, name: str) -> dict[str, Any]:
    """Forward + backward of both units on fake CPU tensors, then (``update``) the engine's update of each
    (:func:`tokenizer_step_traffic`)."""
    import dataclasses

    from roofline_step import engine_optimizer, prepare_update, run_update
    from tokenizer_step import preset_for, step_losses

    from pae_fast.config import load_config
    from pae_fast.engine.precision import compute_weights
    from pae_fast.kernels.tools.traffic import TrafficCounter

    precision = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype) if update else None
    # the masters are fp32 (without the update: every tokenizer weight in dtype); LPIPS's trunk in dtype (the stage's
    # copy); the discriminator's heads fp32; the frozen refined projector in dtype
    _fake_cpu(parts.model, dtype if precision is None else None)
    _fake_cpu(parts.model.shared.loss)
    if parts.model.shared.loss.lpips is not None:  # LPIPS.to_compute_dtype, as stages/train_tokenizer.py does
        parts.model.shared.loss.lpips.to_compute_dtype(dtype)
    if parts.disc is not None:  # the discriminator as the stage runs it: heads fp32, the frozen backbone held once in
        _fake_cpu(parts.disc)  # the compute dtype (the hook engine.precision.compute_weights calls under bf16)
        if dtype != torch.float32:
            parts.disc.use_compute_dtype(dtype)
    if parts.model.shared.projector is not None:
        _fake_cpu(parts.model.shared.projector, dtype)
    units: list[tuple[Any, Any, Any, Any]] = []  # (master, compute copy, optimizer, ema) per unit
    model, disc = parts.model, parts.disc
    if precision is not None:
        train = load_config(preset_for(name)).train
        cfg = dataclasses.replace(train, precision=precision,
                                  optimizer=engine_optimizer(train.optimizer, precision, backend))
        for master, with_ema in ((parts.model, True), (parts.disc, False)):
            if master is not None:
                compute = compute_weights(master, precision)
                units.append((master, compute, *prepare_update(master, compute, cfg, with_ema)))
        model = units[0][1].module if units[0][1] is not None else parts.model
        if parts.disc is not None and units[1][1] is not None:
            disc = units[1][1].module
    images = torch.empty(batch, 3, parts.image_size, parts.image_size, dtype=dtype)
    with _scopes(backend), TrafficCounter() as tc:
        step_losses(parts, images, step=0, model=model, disc=disc)
    out = tc.summary()
    if units:
        with _scopes(backend), TrafficCounter() as tc_up:
            for master, compute, opt, ema in units:
                run_update(master, compute, opt, ema, cfg, torch.ones((), dtype=torch.bool))
        up = tc_up.summary()
        out.update(update_bytes=up["other_bytes"] + up["matmul_bytes"], update_launches=up["launches"],
                   optimizer=cfg.optimizer, grad_clip=cfg.grad_clip)
    return out


def tokenizer_step_traffic(name: str = "PAE-DINOv2-L-d32", batch: int = 32, dtype: torch.dtype = torch.bfloat16,
                           backend: str = "fused", update: bool = True, **tokenizer_overrides: Any) -> dict[str, Any]:
    """Count one tokenizer training step as ``train-tokenizer`` runs it (see the module docstring).

    Args:
        name: registered tokenizer.
        batch: images per step (per GPU).
        dtype: the compute dtype (bf16: ``train.precision=bf16``; fp32; fp16 counts forward + backward only, every
            weight in fp16).
        backend: ``"fused"`` or ``"reference"``.
        update: also count the update (optimizer with the preset's clipping, EMA) after backward.
        tokenizer_overrides: ``tokenizer.*`` values (e.g. ``mcr=False`` to see a regularizer's cost).
    Returns:
        :meth:`TrafficCounter.summary` of forward + backward, plus ``update_bytes`` / ``update_launches`` /
        ``optimizer`` / ``grad_clip`` (with the update), ``trainable_params`` and ``frozen_params``.
    """
    from tokenizer_step import build_step

    if backend not in ("fused", "reference"):
        raise ValueError(f"backend must be 'fused' or 'reference', got {backend!r}")
    parts = build_step(name, torch.device("meta"), **tokenizer_overrides)  # no memory, no initialisation
    with fake_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        out = _count(parts, batch, dtype, backend, update, name)
    out["trainable_params"] = parts.trainable_params()
    out["frozen_params"] = sum(p.numel() for p in parts.model.parameters()) - sum(
        p.numel() for p in parts.model.tok.trainable_parameters())
    return out


def analyse_tokenizer(name: str = "PAE-DINOv2-L-d32", batch: int = 32, dtype: torch.dtype = torch.bfloat16,
                      top: int = 8) -> dict[str, Any]:
    """Fused and reference counts, predictions on every roofline hardware, and issue 27's targets."""
    res: dict[str, Any] = {"model": name, "batch": batch}
    for backend in ("fused", "reference"):
        s = tokenizer_step_traffic(name, batch, dtype, backend)
        res["trainable_params"], res["frozen_params"] = s.pop("trainable_params"), s.pop("frozen_params")
        s["top_rows"] = [r for r in s.pop("rows") if r["category"] == "other"][:top]
        s["predicted"] = {k: predict(s, hw) for k, hw in HARDWARE.items()}
        s["predicted_peak"] = predict(s, HARDWARE["H100"], **PEAK_CHARGES)
        s["h100_mfu_by_triton_gemm_efficiency"] = {
            f"{e:.2f}": predict(s, HARDWARE["H100"], triton_gemm_efficiency=e)["mfu"] for e in TRITON_GEMM_EFFICIENCIES}
        res[backend] = s
    f, r = res["fused"], res["reference"]
    ratio = f["other_bytes"] / 1e9 / RAE_STAGE1_GB
    mfu = f["predicted_peak"]["mfu"]
    res["targets"] = {"rae_ratio": ratio, "rae_gb": RAE_STAGE1_GB, "rae_ratio_target": TARGET_RAE_RATIO,
                      "rae_ratio_met": bool(ratio <= TARGET_RAE_RATIO),
                      "reference_ratio": f["other_bytes"] / r["other_bytes"] if r["other_bytes"] else float("nan"),
                      "h100_mfu_peak": mfu, "h100_mfu_peak_target": TARGET_MFU_PEAK,
                      "h100_mfu_peak_met": bool(mfu >= TARGET_MFU_PEAK), "h100_mfu": f["predicted"]["H100"]["mfu"]}
    res["optimizer"], res["grad_clip"] = f.get("optimizer"), f.get("grad_clip")
    res["optimizer_ema_bytes"] = f.get("update_bytes", 0)
    res["optimizer_ema_h100_s"] = f["predicted"]["H100"]["update_s"]
    return res


def format_rows(res: dict[str, Any]) -> str:
    """Markdown rows in roofline.md's step-table layout, plus the targets line."""
    eff = " / ".join(f"{float(e):.0%}" for e in res["fused"]["h100_mfu_by_triton_gemm_efficiency"])
    lines = ["| model | backend | GEMM TFLOP | attn TFLOP | attn GB | fwd+bwd bandwidth-bound GB | optimizer + EMA GB "
             "| launches | H100 matmul ms | H100 attn ms | H100 bw ms | H100 update ms | H100 step ms | H100 MFU "
             f"| H200 step ms | H200 MFU | H100 MFU, Triton GEMMs at {eff} | H100 MFU at peak bandwidth |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for backend in ("fused", "reference"):
        s = res[backend]
        h, h2 = s["predicted"]["H100"], s["predicted"]["H200"]
        sens = " / ".join(f"{v:.1%}" for v in s["h100_mfu_by_triton_gemm_efficiency"].values())
        clip = f", clip {s['grad_clip']:g}" if s.get("grad_clip") else ""
        lines.append(
            f"| {res['model']} step (batch {res['batch']}) | {backend} (`{s.get('optimizer', '—')}`{clip}) | "
            f"{s['matmul_flops'] / 1e12:.2f} | {s['attention_flops'] / 1e12:.2f} | {s['attention_bytes'] / 1e9:.1f} | "
            f"{s['other_bytes'] / 1e9:.1f} | {s.get('update_bytes', 0) / 1e9:.1f} | "
            f"{s['launches'] + s.get('update_launches', 0)} | {h['matmul_s'] * 1e3:.1f} | "
            f"{h['attention_s'] * 1e3:.1f} | {h['bandwidth_s'] * 1e3:.1f} | {h['update_s'] * 1e3:.1f} | "
            f"{h['step_s'] * 1e3:.1f} | {h['mfu']:.1%} | "
            f"{h2['step_s'] * 1e3:.1f} | {h2['mfu']:.1%} | {sens} | {s['predicted_peak']['mfu']:.1%} |")
    t = res["targets"]
    lines.append("")
    mfu = met_text(t["h100_mfu_peak"], t["h100_mfu_peak_target"], t["h100_mfu_peak_met"])
    lines.append(
        f"targets (fused, issue 27, at peak bandwidth): predicted H100 MFU {mfu}, the update inside the step; "
        "bandwidth-bound bytes "
        f"{t['rae_ratio']:.1%} of RAE's stage-1 step at this size ({t['rae_gb']:.0f} GB, issue 27's count; target <= "
        f"{t['rae_ratio_target']:.0%}: {'met' if t['rae_ratio_met'] else 'missed'}) and {t['reference_ratio']:.1%} of "
        f"the reference row; update: {res['optimizer']} + EMA, {res['optimizer_ema_bytes'] / 1e9:.1f} GB = "
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

"""Images/s and peak memory of one full tokenizer training step (``bench_train_step.py --model PAE-tiny``).

The step is ``train-tokenizer``'s (:mod:`tokenizer_step`, random weights, timing only): frozen VFM forward, DAM,
projector, refined-prior targets, the reconstruction + two MCR decoder passes as one batch, LPIPS (when
``lpips``), the GAN generator term with its adaptive weight, SSR / MCR / SCR, backward, AdamW
(``pae_fast.engine.optim.build_optimizer``) and the EMA update of the tokenizer; then the discriminator's hinge step
(two passes, backward, its own AdamW). Data are random images already on the device. bf16 autocast on CUDA, fp32
on CPU (``--precision``). ``--backend torch`` is the reference, ``triton`` the fused kernels (CUDA, or the CPU
interpreter under ``TRITON_INTERPRET=1``: correctness only, not speed).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def run(model: str = "PAE-tiny", batch: int = 8, device: str = "auto", backend: str = "auto", steps: int = 5,
        warmup: int | None = None, precision: str = "auto", lpips: bool = True, gan: bool = True,
        json_out: str | Path | None = None) -> dict[str, Any]:
    """Time ``steps`` tokenizer training steps after ``warmup`` untimed ones; the record has the same keys as
    ``bench_train_step.run``'s (``train_flops_per_image`` / ``mfu`` are None: see ``roofline_tokenizer.py``)."""
    import json

    import torch
    from bench_env import environment, time_steps
    from bench_train_step import PRECISIONS, _rss_peak_bytes
    from tokenizer_step import build_step, step_losses

    from pae_fast.config import TrainConfig
    from pae_fast.engine.optim import build_optimizer, ema_update, make_ema

    if batch < 1 or steps < 1:
        raise ValueError(f"batch and steps must be >= 1, got batch={batch}, steps={steps}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    warmup = 1 if warmup is None else warmup
    amp = {"auto": torch.bfloat16 if dev.type == "cuda" else None, "fp32": None,
           "bf16": torch.bfloat16, "fp16": torch.float16}[precision]  # fmt: skip
    rss_before = _rss_peak_bytes()
    torch.manual_seed(0)
    parts = build_step(model, dev, lpips=lpips, gan=gan)
    cfg = TrainConfig(lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, ema_decay=0.9999, optimizer="adamw")
    opt = build_optimizer(parts.model, cfg, dev)
    opt_d = build_optimizer(parts.disc, cfg, dev) if parts.disc is not None else None
    ema = make_ema(parts.model)
    S = parts.image_size
    images = torch.rand(batch, 3, S, S, device=dev)

    def step() -> dict[str, torch.Tensor]:
        terms = step_losses(parts, images, step=0, autocast=amp)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, parts.model, cfg.ema_decay)
        if opt_d is not None:
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        return terms

    times, warm, terms = time_steps(step, dev, backend, warmup, steps)
    step_s = statistics.median(times)
    if dev.type == "cuda":
        peak, method = torch.cuda.max_memory_allocated(dev), "torch.cuda.max_memory_allocated"
    else:
        peak, method = _rss_peak_bytes(), "ru_maxrss (peak resident set size of the whole process)"
    record: dict[str, Any] = {
        "model": model, "kind": "tokenizer", "batch": batch, "device": str(dev), "compile": False,
        "backend": backend, "precision": precision if precision != "auto" else ("bf16" if amp is not None else "fp32"),
        "steps": steps, "warmup": warmup, "terms": sorted(terms),
        "params": sum(p.numel() for p in parts.model.parameters()),
        "trainable_params": parts.trainable_params(),
        "input": {"image_size": S}, "images_per_s": batch / step_s, "step_seconds": step_s,
        "step_seconds_mean": statistics.fmean(times), "step_seconds_all": times, "warmup_seconds": warm,
        "peak_memory_bytes": peak, "peak_memory_method": method,
        "rss_before_model_bytes": rss_before if dev.type == "cpu" else None,
        "train_flops_per_image": None, "flops_method": "see benchmarks/roofline_tokenizer.py",
        "achieved_tflops": 0.0, "peak_tflops": None, "mfu": None, "environment": environment(),
    }  # fmt: skip
    if json_out is not None:
        from pae_fast.io import atomic_write_text

        atomic_write_text(json_out, json.dumps(record, indent=1))
    return record

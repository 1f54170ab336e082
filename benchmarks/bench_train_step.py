"""Images/s and peak memory of one full generator training step, for any registered generator.

The step is the engine's: flow-matching loss (``pae_fast.flow.loss.FlowLoss``: logit-normal t with shift 0.7,
``x_t = t·x1 + (1−t)·x0``, MSE + cosine in fp32), backward, AdamW from ``pae_fast.engine.optim.build_optimizer``
(fused on CUDA, foreach on CPU; lr 2e-4, betas (0.9, 0.95)), ``optimizer.zero_grad(set_to_none=True)`` and the EMA
update ``ema_update`` (decay 0.9999, foreach lerp) — or ``fused_adamw_ema`` (one kernel for AdamW + EMA + compute
copy); ``--optimizer auto`` (the default, as ``train.optimizer``) takes the one the engine picks for this device and
``--backend`` (:func:`pae_fast.engine.optim_choice.choose_optimizer`: the fused kernel on CUDA with Triton, torch's
AdamW otherwise); the record names the one that ran. Precision is the engine's policy
(:mod:`pae_fast.engine.precision`): ``auto`` = the engine default (``train.precision``, bf16 compute weights with
fp32 masters) on CUDA, fp32 on CPU. Data are random latents already
on the device (data loading is not timed).

On CUDA the record also holds the roofline's prediction for the same step (``benchmarks/roofline.py``, counted on
fake tensors, H100/H200 by device name): ``predicted_step_seconds`` and ``predicted_mfu`` beside the measured
``step_seconds`` and ``mfu``, so the first GPU run calibrates the model.

    python benchmarks/bench_train_step.py --model LightningDiT-B/1 --batch 8 --device cpu [--compile]
        [--backend auto|torch|triton] [--steps N] [--warmup N] [--json OUT]
    python benchmarks/bench_train_step.py --model PAE-tiny --batch 8    # a tokenizer step: bench_tokenizer_step.py

Peak memory: CUDA ``torch.cuda.max_memory_allocated``; CPU the process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the whole process, Python and libraries included; run one
configuration per process, as ``run_all.py`` does). MFU (CUDA with a known peak) counts training FLOPs per image
as 6 x forward GMAC (``pae_fast.models.profile.forward_gmacs``, else ``FlopCounterMode`` x 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import environment, time_steps  # noqa: E402

PRECISIONS = ("auto", "fp32", "bf16", "bf16-autocast", "fp16")
OPTIMIZERS = ("auto", "adamw", "fused_adamw_ema")


def _rss_peak_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # non-POSIX
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def train_flops_per_image(build: Callable[[], Any]) -> tuple[float, str]:
    """Training FLOPs per image (forward + backward) of the model ``build()`` makes, counted on the meta device.

    Returns:
        (FLOPs, how they were counted): 6 x ``pae_fast.models.profile.forward_gmacs`` when that module exists,
        else ``FlopCounterMode`` on one forward x 3.
    """
    import torch

    with torch.device("meta"):
        model = build()
    try:
        from pae_fast.models.profile import forward_gmacs
    except ImportError:
        forward_gmacs = None
    if forward_gmacs is not None:
        return 6.0 * forward_gmacs(model) * 1e9, "pae_fast.models.profile.forward_gmacs x 6"
    from torch.utils.flop_counter import FlopCounterMode

    from pae_fast.kernels import use_backend

    spec = _input_spec(model)
    x = torch.zeros(1, spec["in_channels"], spec["input_size"], spec["input_size"], device="meta")
    t = torch.zeros(1, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), use_backend("torch"), counter:
        model(x, t, y)
    return 3.0 * counter.get_total_flops(), "FlopCounterMode forward x 3"


def _input_spec(model: Any) -> dict[str, int]:
    from pae_fast.config import GeneratorConfig

    d = GeneratorConfig()
    return {
        "in_channels": int(getattr(model, "in_channels", d.in_channels)),
        "input_size": int(getattr(model, "input_size", d.input_size)),
        "num_classes": int(getattr(model, "num_classes", d.num_classes)),
    }


def run(
    model: str = "LightningDiT-B/1",
    batch: int = 8,
    device: str = "auto",
    compile: bool = False,
    backend: str = "auto",
    steps: int = 5,
    warmup: int | None = None,
    precision: str = "auto",
    build: Callable[[], Any] | None = None,
    json_out: str | Path | None = None,
    optimizer: str = "auto",
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """Time ``steps`` training steps after ``warmup`` untimed ones and return the result record.

    Args:
        model: registered generator name (built at its default options), or a label when ``build`` is given.
        batch: images per step.
        device: ``auto | cpu | cuda``.
        compile: ``torch.compile`` the model (default mode); the first warm-up step includes compilation.
        backend: kernel backend scope (``auto | torch | triton``).
        steps: timed steps (the median is reported).
        warmup: untimed steps first (default 1, or 2 with ``compile``).
        precision: ``auto`` (the engine default on CUDA, fp32 on CPU) | fp32 | bf16 | bf16-autocast | fp16.
        build: optional factory used instead of the registry (tests).
        json_out: write the record there (atomically) as JSON.
        optimizer: ``auto`` (as the engine resolves it for ``device`` and ``backend``), ``adamw`` (torch fused AdamW +
            foreach EMA) or ``fused_adamw_ema``.
        compile_mode: ``torch.compile`` mode with ``compile`` (None: default; ``reduce-overhead``: CUDA graphs, each
            step marked with ``torch.compiler.cudagraph_mark_step_begin`` as ``train.compile`` does in the engine).

    Returns:
        ``images_per_s``, ``step_seconds`` (median), ``step_seconds_all``, ``warmup_seconds``, ``peak_memory_bytes``,
        ``peak_memory_method``, ``train_flops_per_image``, ``achieved_tflops``, ``mfu`` (None off CUDA / unknown
        GPU), ``predicted`` (CUDA: the roofline's step seconds and MFU on this GPU type; else None), the settings,
        ``params`` and ``environment``.
    """
    import torch

    from pae_fast import kernels
    from pae_fast.config import TrainConfig
    from pae_fast.engine.monitor import peak_flops
    from pae_fast.engine.optim import build_optimizer, ema_update, make_ema
    from pae_fast.engine.precision import autocast_dtype, compute_weights
    from pae_fast.flow.loss import FlowLoss
    from pae_fast.registry import create_generator

    if batch < 1 or steps < 1:
        raise ValueError(f"batch and steps must be >= 1, got batch={batch}, steps={steps}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if backend not in kernels.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(kernels.BACKENDS)}, got {backend!r}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    warmup = (2 if compile else 1) if warmup is None else warmup
    policy = precision if precision != "auto" else (TrainConfig().precision if dev.type == "cuda" else "fp32")
    amp = autocast_dtype(policy)
    rss_before = _rss_peak_bytes()

    build = build or (lambda: create_generator(model))
    torch.manual_seed(0)
    net = build().to(dev).train()
    spec = _input_spec(net)
    ema = make_ema(net)
    optimizer = _resolve_optimizer(optimizer, dev, backend, policy)
    cfg = TrainConfig(lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, ema_decay=0.9999, optimizer=optimizer)
    opt = build_optimizer(net, cfg, dev)
    compute = compute_weights(net, policy)  # bf16: the bf16 copy forward/backward run on, written by opt.step()
    if compute is not None:
        compute.attach(opt)
    if hasattr(opt, "set_ema"):
        opt.set_ema(ema, net, cfg.ema_decay)
    scaler = torch.amp.GradScaler(dev.type) if policy == "fp16" else None
    loss_fn = FlowLoss(shift=0.7)
    trained = compute.module if compute is not None else net
    fwd = torch.compile(trained, mode=compile_mode) if compile else trained
    graphs = compile and compile_mode == "reduce-overhead"
    C, S = spec["in_channels"], spec["input_size"]
    x1 = torch.randn(batch, C, S, S, device=dev)
    y = torch.randint(0, spec["num_classes"], (batch,), device=dev)

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = loss_fn(fwd, (x1, y))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if compute is not None:
            compute.grads_to_master(needed=False)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, net, cfg.ema_decay, params=not getattr(opt, "updates_ema", False))

    times, warm, _ = time_steps(step, dev, backend, warmup, steps)
    step_s = statistics.median(times)
    if dev.type == "cuda":
        peak, method = torch.cuda.max_memory_allocated(dev), "torch.cuda.max_memory_allocated"
    else:
        peak, method = _rss_peak_bytes(), "ru_maxrss (peak resident set size of the whole process)"
    flops, flops_method = train_flops_per_image(build)
    peak_dev = peak_flops(dev)
    achieved = flops * batch / step_s
    record: dict[str, Any] = {
        "model": model,
        "batch": batch,
        "device": str(dev),
        "compile": compile,
        "compile_mode": compile_mode if compile else None,
        "backend": backend,
        "precision": policy,
        "optimizer": optimizer,
        "steps": steps,
        "warmup": warmup,
        "params": sum(p.numel() for p in net.parameters()),
        "input": spec,
        "images_per_s": batch / step_s,
        "step_seconds": step_s,
        "step_seconds_mean": statistics.fmean(times),
        "step_seconds_all": times,
        "warmup_seconds": warm,
        "peak_memory_bytes": peak,
        "peak_memory_method": method,
        "rss_before_model_bytes": rss_before if dev.type == "cpu" else None,
        "train_flops_per_image": flops,
        "flops_method": flops_method,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak_dev / 1e12 if peak_dev else None,
        "mfu": achieved / peak_dev if peak_dev else None,
        "predicted": _predicted(build, batch, policy, backend, optimizer) if dev.type == "cuda" else None,
        "environment": environment(),
    }
    if json_out is not None:
        from pae_fast.io import atomic_write_text

        atomic_write_text(json_out, json.dumps(record, indent=1))
    return record


def _resolve_optimizer(optimizer: str, dev: Any, backend: str, precision: str) -> str:
    """``auto`` as the engine resolves it for one process on ``dev`` under kernel backend ``backend``."""
    from pae_fast.engine.optim_choice import choose_optimizer

    reason = None
    if optimizer == "auto" and dev.type == "cuda":
        from pae_fast.kernels import triton_unavailable_reason

        reason = triton_unavailable_reason(dev)
    return choose_optimizer(optimizer, device_type=dev.type, kernel_backend=backend, triton_reason=reason,
                            distributed="ddp", world_size=1, precision=precision).name


def _predicted(build: Callable[[], Any], batch: int, precision: str, backend: str, optimizer: str) -> dict | None:
    """The roofline's prediction of this step on this GPU type (H100 / H200 by name; None for others or fp16)."""
    import roofline
    import torch

    name = torch.cuda.get_device_name()
    hw = next((h for k, h in roofline.HARDWARE.items() if k in name), None)
    if hw is None or precision == "fp16":
        return None
    s = roofline.step_traffic(build, batch, precision, "reference" if backend == "torch" else "fused", optimizer)
    p = roofline.predict(s, hw)
    return {"hardware": hw.name, "step_seconds": p["step_s"], "mfu": p["mfu"], "images_per_s": batch / p["step_s"],
            "assumptions": {"gemm_efficiency": roofline.GEMM_EFFICIENCY, "hbm_efficiency": roofline.HBM_EFFICIENCY}}


def format_record(r: dict[str, Any]) -> str:
    mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
    pred = r.get("predicted")
    if pred:
        mfu += (f" (roofline on {pred['hardware']}: {pred['step_seconds'] * 1e3:.0f} ms/step, MFU {pred['mfu']:.1%}; "
                f"measured / predicted time {r['step_seconds'] / pred['step_seconds']:.2f})")
    return (
        f"{r['model']} batch {r['batch']} on {r['device']} ({r['precision']}, backend {r['backend']}"
        f"{', compiled' if r['compile'] else ''}): {r['images_per_s']:.2f} images/s, "
        f"{r['step_seconds'] * 1e3:.0f} ms/step "
        f"(median of {r['steps']}; warm-up {sum(r['warmup_seconds']):.1f} s), peak memory "
        f"{r['peak_memory_bytes'] / 2**30:.2f} GiB, {r['achieved_tflops']:.2f} TFLOP/s{mfu}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="LightningDiT-B/1",
                   help="registered generator name, or a tokenizer (e.g. PAE-tiny: one train-tokenizer step)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="kernel backend")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1, 2 with --compile)")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS))
    p.add_argument("--optimizer", default="auto", choices=list(OPTIMIZERS),
                   help="train.optimizer (auto: what the engine picks for this device and backend)")
    p.add_argument("--json", dest="json_out", default=None, help="write the result record here")
    a = p.parse_args(argv)
    from pae_fast.registry import GENERATORS, TOKENIZERS

    if a.model in TOKENIZERS.names():  # a tokenizer step: bench_tokenizer_step.py (no --compile)
        import bench_tokenizer_step

        rec = bench_tokenizer_step.run(a.model, a.batch, a.device, a.backend, a.steps, a.warmup, a.precision,
                                       json_out=a.json_out)
        print(format_record(rec))
        return 0
    try:
        GENERATORS.get(a.model)
    except KeyError as e:  # the message lists the valid names
        p.error(str(e.args[0]))
    rec = run(a.model, a.batch, a.device, a.compile, a.backend, a.steps, a.warmup, a.precision, json_out=a.json_out,
              optimizer=a.optimizer)
    print(format_record(rec))
    if a.json_out:
        print(f"wrote {a.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

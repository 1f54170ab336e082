"""The items of ``gpu_first_light.py``: each measures one thing with the project's own code, at model sizes on a GPU
or at tiny sizes on CPU (``--dry-run``: the same functions, only the sizes and the device differ).

Every item is a function ``item(ctx)`` run in its own process (``gpu_first_light.py --item NAME``); it adds rows
(one measurement each: measured, predicted, unit) and details to ``ctx`` (:class:`first_light_ctx.Ctx`), which
writes them after each sub-measurement, so a process killed at its time cap still reports what it finished.
Predictions use the calibrated peaks of item ``env`` (``ctx.calib``: the measured bf16 GEMM FLOP/s and
device-to-device copy bandwidth) in place of the roofline's assumed efficiencies (docs/method.md § What one step
costs).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from first_light_ctx import Ctx, free, predict, timed

# kernels.validate order: the training step's ops first (the DiT step, then the optimizer, then the tokenizer's)
VALIDATE_FIRST = ("swiglu_mlp", "gated_residual_adaln", "qkv_norm_rope", "adaln_modulate", "attention",
                  "fused_adamw_ema", "gelu_mlp", "residual_layernorm", "lpips_relu_distance_pool",
                  "lpips_relu_distance", "maxpool2x2", "latent_norm", "gram_loss", "sphere_perturb")
SDPA_ORDER = ("sdpa:flash", "sdpa:cudnn", "sdpa:efficient", "sdpa:math", "flash_attn", "xformers")


# ---------------------------------------------------------------------------------------------------- 1. env
def _rate(ctx: Ctx, x: torch.Tensor, what: str) -> float:
    """FLOP/s of ``x[0] @ x[1]`` (``mm``, 2 n^3 FLOPs) or bytes/s of ``x[1].copy_(x[0])`` (``copy``: one read and one
    write of ``x[0]``), median of ``calib_iters`` calls after 3 warm-up ones."""
    if what == "mm":
        return 2.0 * x.shape[1] ** 3 / timed(ctx, lambda: torch.mm(x[0], x[1]), ctx.size["calib_iters"], warmup=3)
    return 2.0 * x[0].numel() / timed(ctx, lambda: x[1].copy_(x[0]), ctx.size["calib_iters"], warmup=3)


def item_env(ctx: Ctx) -> None:
    """Machine, versions, and the calibration: a large bf16 GEMM and a device-to-device copy."""
    import subprocess

    import roofline
    from bench_env import environment

    from pae_fast.engine.monitor import peak_flops
    from pae_fast.kernels import triton_unavailable_reason

    env = environment()
    if ctx.dev.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.dev)
        env["accelerator"].update(sm_count=p.multi_processor_count, peak_bf16_tflops=(peak_flops(ctx.dev) or 0) / 1e12)
        try:  # the CUDA version the driver supports (e.g. 12080); the driver's own version comes from nvidia-smi
            env["accelerator"]["driver_cuda_version"] = torch._C._cuda_getDriverVersion()
        except Exception as e:  # a private call: its absence must not cost the calibration
            env["accelerator"]["driver_cuda_version"] = f"unknown ({type(e).__name__})"
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)  # fmt: skip
            env["accelerator"]["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["accelerator"]["nvidia_smi"] = f"not available: {e}"
    env["triton_unavailable_reason"] = triton_unavailable_reason(ctx.dev)
    ctx.details["environment"] = env
    ctx.flush()
    s = ctx.size
    n = s["gemm_n"]
    ctx.calib["gemm_flops"] = _rate(ctx, torch.randn(2, n, n, device=ctx.dev, dtype=torch.bfloat16), "mm")
    hw = next((h for k, h in roofline.HARDWARE.items() if k in (env.get("accelerator") or {}).get("name", "")), None)
    nominal = hw.peak_flops * roofline.GEMM_EFFICIENCY if hw else None
    ctx.details["calibration"] = ctx.calib
    ctx.row(f"bf16 GEMM {n}x{n}x{n} (predicted: roofline's {roofline.GEMM_EFFICIENCY:.0%} of peak)",
            ctx.calib["gemm_flops"] / 1e12, nominal / 1e12 if nominal else None, "TFLOP/s")
    ctx.check()
    x = torch.empty(2, s["copy_mib"] * 2**20, dtype=torch.uint8, device=ctx.dev).random_(0, 255)
    ctx.calib["copy_bytes_per_s"] = _rate(ctx, x, "copy")
    nominal_bw = hw.bandwidth * roofline.HBM_EFFICIENCY if hw else None
    ctx.row(f"device-to-device copy {s['copy_mib']} MiB (read + write; predicted: {roofline.HBM_EFFICIENCY:.1%} of "
            "peak HBM)", ctx.calib["copy_bytes_per_s"] / 1e12, nominal_bw / 1e12 if nominal_bw else None, "TB/s")


# ---------------------------------------------------------------------------------------------------- 2. validate
def item_validate(ctx: Ctx) -> None:
    """``kernels.validate`` (every fused op against its fp64 reference): one op and dtype at a time, bf16 first,
    the training step's ops first, so a cut-off item still reports the most valuable cases."""
    from pae_fast import kernels
    from pae_fast.kernels.tools.validate import run

    s = ctx.size
    ops = [o for o in VALIDATE_FIRST if o in kernels.OPS] + sorted(set(kernels.OPS) - set(VALIDATE_FIRST))
    bad: list[dict[str, Any]] = []
    done: dict[str, list[int]] = {dt: [0, 0] for dt in s["val_dtypes"]}
    ctx.details.update(size=s["val_size"], order=ops, failures=bad, passed=done, done=[])
    for dt in s["val_dtypes"]:
        for name in ops:
            ctx.check()
            for r in run([name], [dt], s["val_size"], str(ctx.dev), False):
                done[dt][0] += r["ok"]
                done[dt][1] += 1
                if not r["ok"]:
                    bad.append({k: r[k] for k in ("op", "case", "dtype", "max_abs", "atol", "error")}
                               | {"report": (r["report"] or "")[-600:]})
            ctx.details["done"].append(f"{name} {dt}")
            ctx.flush()
        ctx.row(f"{dt}: cases within tolerance, all ops ({s['val_size']} sizes; predicted = cases run)", done[dt][0],
                done[dt][1], "cases", status="ok" if done[dt][0] == done[dt][1] else "failed",
                note="; ".join(f"{b['op']} {b['case']}" for b in bad if b["dtype"] == dt)[:300])


# ---------------------------------------------------------------------------------------------------- 3. DiT step
def _generator_build(ctx: Ctx) -> tuple[str, Callable[[], Any]]:
    from pae_fast.config import GeneratorConfig, load_config
    from pae_fast.models.generator import generator_from_config

    cfg = load_config(ctx.size["dit"]).model if ctx.size["dit"] else GeneratorConfig(name="LightningDiT-XL/1")
    label = cfg.name + (" (tiny_cpu.yaml)" if ctx.size["dit"] else "")
    return label, lambda: generator_from_config(cfg)


def _fit_batch(ctx: Ctx, batch: int, run: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """``run(batch)``, halving the batch after a CUDA out-of-memory error (the record says which batch ran)."""
    while True:
        try:
            return run(batch)
        except torch.cuda.OutOfMemoryError as e:
            ctx.details.setdefault("oom", []).append(f"batch {batch}: {str(e)[:200]}")
            if batch == 1:
                raise
        free(ctx)  # outside the handler: the failed attempt's frames are gone
        batch //= 2


def item_dit_step(ctx: Ctx) -> None:
    """The generator training step (bench_train_step.run: the engine's loss, precision policy, optimizer and EMA),
    bf16 compute weights: eager with ``fused_adamw_ema`` first (a number even if compiling fails or runs out of
    time), then compiled with CUDA graphs (``reduce-overhead``, as ``train.compile`` runs it) with ``fused_adamw_ema``
    and with torch's AdamW. A variant that fails is recorded and the next one runs."""
    import bench_train_step
    import roofline

    s = ctx.size
    label, build = _generator_build(ctx)
    compiled = [True] if s["dit_compile"] else []
    counts: dict[tuple[int, str], dict[str, Any]] = {}
    for opt, comp in [("fused_adamw_ema", False), *(("fused_adamw_ema", c) for c in compiled),
                      *(("adamw", c) for c in compiled or [False])]:
        ctx.check()
        how = "compiled + CUDA graphs" if comp else "eager"
        key = f"{opt} {how}"

        def run(batch: int, opt: str = opt, comp: bool = comp) -> dict[str, Any]:
            return bench_train_step.run(label, batch, str(ctx.dev), comp, "auto", s["dit_steps"], s["dit_warmup"],
                                        "bf16", build=build, optimizer=opt,
                                        compile_mode="reduce-overhead" if comp else None)

        try:
            rec = _fit_batch(ctx, s["dit_batch"], run)
        except Exception as e:  # this variant failed (a kernel, compilation, CUDA graphs): say why, go on
            ctx.details[key] = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
            ctx.row(f"{label} step, {key}", None, None, "ms/step", status="failed",
                    note=f"{type(e).__name__}: {str(e)[:300]}")
            rec = None
        if rec is not None:
            rec.pop("environment", None)
            ctx.details[key] = rec
            step = ctx.row(f"{label} step, {key} (batch {rec['batch']}, bf16 compute weights)",
                           rec["step_seconds"] * 1e3, None, "ms/step")
            mfu = ctx.row(f"{label} MFU, {key}", rec["mfu"] * 100, None, "%") if rec.get("mfu") is not None else None
            ctx.row(f"{label} peak memory, {key}", rec["peak_memory_bytes"] / 2**30, None, "GiB",
                    note=rec["peak_memory_method"])
            if (rec["batch"], opt) not in counts:  # counted once per batch and optimizer (fake tensors, CPU)
                counts[rec["batch"], opt] = roofline.step_traffic(build, rec["batch"], "bf16", "fused", opt)
            pred = rec["predicted_calibrated"] = predict(ctx, counts[rec["batch"], opt])
            ctx.predicted(step, pred and pred["step_s"] * 1e3)
            if mfu is not None:
                ctx.predicted(mfu, pred and pred["mfu"] * 100)
        rec = None
        torch._dynamo.reset()  # drops the compiled graphs and their CUDA graph memory pool
        free(ctx)


# ---------------------------------------------------------------------------------------------------- 4. tokenizer
def item_tokenizer_step(ctx: Ctx) -> None:
    """The tokenizer training step (bench_tokenizer_step.run: random weights, LPIPS and GAN on) against the count of
    roofline_tokenizer (fused; counted as train-tokenizer runs it: bf16 compute copy, optimizer, clipping and EMA)."""
    import bench_tokenizer_step
    import roofline_tokenizer

    s = ctx.size

    def run(batch: int) -> dict[str, Any]:
        return bench_tokenizer_step.run(s["tok"], batch, str(ctx.dev), "auto", s["tok_steps"], s["tok_warmup"],
                                        "auto", lpips=True, gan=True)

    rec = _fit_batch(ctx, s["tok_batch"], run)
    rec.pop("environment", None)
    ctx.details["measured"] = rec
    step = ctx.row(f"{s['tok']} step (batch {rec['batch']}, {rec['precision']}, LPIPS + GAN)",
                   rec["step_seconds"] * 1e3, None, "ms/step",
                   note="measured: fp32 weights under autocast (bench_tokenizer_step.py), torch AdamW + EMA inside "
                   "the step; counted: train-tokenizer's step (roofline_tokenizer.py: bf16 compute copy, "
                   "fused_adamw_ema with the preset's clip and the EMA inside the step)")
    ctx.row(f"{s['tok']} peak memory", rec["peak_memory_bytes"] / 2**30, None, "GiB", note=rec["peak_memory_method"])
    ctx.check()
    pred = predict(ctx, roofline_tokenizer.tokenizer_step_traffic(s["tok"], rec["batch"], torch.bfloat16, "fused"))
    ctx.details["predicted_calibrated"] = pred
    ctx.predicted(step, pred and pred["step_s"] * 1e3)


# ---------------------------------------------------------------------------------------------------- 5. optimizer
def item_optimizer(ctx: Ctx) -> None:
    """``fused_adamw_ema`` against torch's AdamW + ``ema_update`` from the same weights on the same random bf16
    gradients, each with the engine's bf16 compute copy attached: every state after ``opt_steps`` steps, and the
    time per step against the fused kernel's traffic floor (36 B/param) at the calibrated bandwidth."""
    import copy

    from roofline_step import OPTIMIZER_EMA_MIN_BYTES_PER_PARAM

    from pae_fast import kernels
    from pae_fast.config import TrainConfig
    from pae_fast.engine.optim import build_optimizer, ema_update, make_ema
    from pae_fast.engine.precision import compute_weights

    label, build = _generator_build(ctx)
    with torch.device("meta"):
        init = build().to_empty(device=ctx.dev)  # the model's parameter shapes, no slow initialisation
    torch.manual_seed(0)
    with torch.no_grad():
        for p in init.parameters():
            p.normal_(0.0, 0.02)
    n = sum(p.numel() for p in init.parameters() if p.requires_grad)
    ctx.details.update(model=label, params=n)
    cfg = TrainConfig(lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, ema_decay=0.9999)
    gen = torch.Generator(device=ctx.dev)
    runs: dict[str, tuple] = {}
    for name in ("fused_adamw_ema", "adamw"):
        ctx.check()
        net = copy.deepcopy(init)
        ema = make_ema(net)
        opt = build_optimizer(net, cfg, ctx.dev, name=name)
        compute = compute_weights(net, "bf16")
        compute.attach(opt)
        if hasattr(opt, "set_ema"):
            opt.set_ema(ema, net, cfg.ema_decay)
        times = []
        with kernels.use_backend("triton" if name == "fused_adamw_ema" else "auto"):
            for k in range(ctx.size["opt_steps"]):
                gen.manual_seed(k)
                for _, c in compute.pairs:  # the same gradients for both optimizers, step by step
                    c.grad = torch.randn(c.shape, generator=gen, device=ctx.dev, dtype=c.dtype)
                ctx.sync()
                t0 = time.perf_counter()
                compute.grads_to_master(needed=False)  # as the engine's step (bench_train_step.run)
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema_update(ema, net, cfg.ema_decay, params=not getattr(opt, "updates_ema", False))
                ctx.sync()
                times.append(time.perf_counter() - t0)
        runs[name] = (net, ema, opt, compute)
        ctx.details[f"{name}_step_ms"] = [t * 1e3 for t in times]  # the first step also creates the state
        ctx.flush()
    del init
    worst = _compare(runs["fused_adamw_ema"], runs["adamw"])
    ctx.details["states"] = worst
    ok = all(v["within"] for v in worst.values())
    ctx.row(f"fused_adamw_ema vs AdamW + EMA: states after {ctx.size['opt_steps']} steps, worst |diff| / tolerance",
            max(v["max_abs"] / v["tol"] for v in worst.values()), None, "x tol", status="ok" if ok else "failed",
            note=", ".join(f"{k} {v['max_abs']:.1e}" for k, v in worst.items()))
    ms = {k: statistics.median(ctx.details[f"{k}_step_ms"][1:] or ctx.details[f"{k}_step_ms"]) for k in runs}
    bw = ctx.calib.get("copy_bytes_per_s")
    floor = OPTIMIZER_EMA_MIN_BYTES_PER_PARAM * n / bw * 1e3 if bw else None
    ctx.row(f"fused_adamw_ema step, {n / 1e6:.1f}M params (predicted: 36 B/param at the copy bandwidth)",
            ms["fused_adamw_ema"], floor, "ms")
    ctx.row("torch AdamW + bf16 copy + EMA step (same parameters)", ms["adamw"], None, "ms",
            note=f"time AdamW + EMA / fused_adamw_ema: {ms['adamw'] / ms['fused_adamw_ema']:.2f}")


@torch.no_grad()
def _compare(a: tuple, b: tuple) -> dict[str, dict[str, Any]]:
    """Worst absolute difference per state family, against ``1e-6 + 1e-5 * max |b|`` (bf16 copy: one bf16 ulp)."""
    out = {}
    fams = {
        "param": ([p for p in a[0].parameters()], [p for p in b[0].parameters()]),
        "ema": ([p for p in a[1].parameters()], [p for p in b[1].parameters()]),
        "exp_avg": ([a[2].state[m]["exp_avg"] for m, _ in a[3].pairs],
                    [b[2].state[m]["exp_avg"] for m, _ in b[3].pairs]),
        "exp_avg_sq": ([a[2].state[m]["exp_avg_sq"] for m, _ in a[3].pairs],
                       [b[2].state[m]["exp_avg_sq"] for m, _ in b[3].pairs]),
        "bf16 copy": ([c for _, c in a[3].pairs], [c for _, c in b[3].pairs]),
    }  # fmt: skip
    for fam, (xs, ys) in fams.items():
        diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(xs, ys))
        scale = max(float(y.float().abs().max()) for y in ys)
        tol = scale * 2**-7 if fam == "bf16 copy" else 1e-6 + 1e-5 * scale  # bf16: one ulp at the largest value
        out[fam] = {"max_abs": diff, "scale": scale, "tol": tol, "within": diff <= tol}
    return out


# ---------------------------------------------------------------------------------------------------- 6. attention
def item_attention(ctx: Ctx) -> None:
    """Every attention backend available, forward + backward at the DiT and VFM shapes: time against the roofline's
    flash-style count at the calibrated rates, and the error against the fp32 reference."""
    import torch.nn.functional as F

    from pae_fast.kernels import attention, attention_ref
    from pae_fast.kernels.attention import attention_backend_reasons
    from pae_fast.kernels.tools.traffic import TrafficCounter

    s = ctx.size
    reasons = attention_backend_reasons()
    ctx.details["unavailable"] = {k: v for k, v in reasons.items() if v}
    for shape_label, shape in s["attn"].items():
        q, k, v = (torch.empty(shape, device="meta", dtype=s["attn_dtype"], requires_grad=True) for _ in range(3))
        with TrafficCounter() as tc:  # flash-style count of one forward + backward, on the meta device
            o = F.scaled_dot_product_attention(q, k, v)
            with tc.paused():
                g = torch.ones_like(o)
            o.backward(g)
        pred = predict(ctx, tc.summary())
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(shape, generator=g).to(ctx.dev, s["attn_dtype"]).requires_grad_(True)
                   for _ in range(3))  # fmt: skip
        ref = attention_ref(q.detach().float(), k.detach().float(), v.detach().float())
        for backend in SDPA_ORDER:
            ctx.check()
            base = backend.split(":")[0]
            if reasons.get(base):
                ctx.row(f"{shape_label}: {backend}", None, None, "ms", status="skipped", note=reasons[base])
                continue
            try:
                out = attention(q, k, v, backend=backend)
                err = float((out.float() - ref).abs().max())
                dout = torch.randn_like(out)

                def fwd_bwd(backend: str = backend, dout: torch.Tensor = dout, qkv: tuple = (q, k, v)) -> None:
                    torch.autograd.backward(attention(*qkv, backend=backend), dout)

                t = timed(ctx, fwd_bwd, s["attn_iters"])
            except Exception as e:  # a backend that cannot run this shape/dtype: its row says why
                ctx.row(f"{shape_label}: {backend}", None, None, "ms", status="failed",
                        note=f"{type(e).__name__}: {str(e)[:200]}")
                continue
            ctx.row(f"{shape_label}: {backend} fwd+bwd", t * 1e3, pred and pred["step_s"] * 1e3, "ms",
                    note=f"max |err| vs fp32 reference {err:.2e}")
            q.grad = k.grad = v.grad = None


# ---------------------------------------------------------------------------------------------------- 7. missing
def item_missing(ctx: Ctx) -> None:
    """What this machine lacks that the project can use: each reported as skipped, with the reason."""
    from pae_fast.data.dali_loader import dali_available
    from pae_fast.kernels import triton_unavailable_reason
    from pae_fast.kernels.attention import attention_backend_reasons

    ok, why = dali_available()
    checks = {"NVIDIA DALI (data loading, bench_data.py)": None if ok else why,
              "Triton kernels on this device": triton_unavailable_reason(ctx.dev),
              **{f"attention backend {k}": v for k, v in attention_backend_reasons().items() if k in
                 ("flash_attn", "xformers")}}  # fmt: skip
    try:
        import apex.optimizers  # type: ignore[import-not-found]  # noqa: F401

        checks["NVIDIA apex (train.optimizer=apex_fused_adam)"] = None
    except Exception as e:
        checks["NVIDIA apex (train.optimizer=apex_fused_adam)"] = f"not importable: {e}"
    if ctx.dev.type != "cuda":
        checks["CUDA device"] = "none: dry run on CPU"
    for label, reason in checks.items():
        ctx.row(label, None, None, "", status="skipped" if reason else "ok", note=reason or "available")
    ctx.details["env_TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")


ITEMS: dict[str, Callable[[Ctx], None]] = {
    "env": item_env, "validate": item_validate, "dit_step": item_dit_step, "tokenizer_step": item_tokenizer_step,
    "optimizer": item_optimizer, "attention": item_attention, "missing": item_missing,
}  # fmt: skip

"""The roofline report: ``roofline.md`` from :func:`roofline.run`'s result (tables of predicted step times, the
targets, bytes per op type, the largest ops and the per-op table)."""

from __future__ import annotations

from typing import Any


def _target_text(t: dict[str, Any]) -> tuple[str, str, str]:
    r, m, gb = t["bandwidth_ratio"], t["h100_mfu"], t["step_gb"]
    rt, mt, gt = t["bandwidth_ratio_target"], t["h100_mfu_target"], t.get("step_gb_target")
    ratio = f"met ({r:.1%} <= {rt:.0%})" if t["bandwidth_ratio_met"] else (
        f"missed: {r:.1%} of the reference ({(r - rt) * 100:.1f} points over {rt:.0%})")  # fmt: skip
    if gt is None:
        gbs = f"{gb:.1f} GB (no target)"
    else:
        over = f"missed: {gb:.1f} GB ({gb - gt:.1f} GB over {gt:.0f})"
        gbs = f"met ({gb:.1f} <= {gt:.0f} GB)" if t["step_gb_met"] else over
    return ratio, gbs, met_text(m, mt, t["h100_mfu_met"]), met_text(t["h100_mfu_peak"], t["h100_mfu_peak_target"],
                                                            t["h100_mfu_peak_met"])


def met_text(value: float, target: float, met: bool) -> str:
    """``met (48.1% >= 45%)`` or ``missed: 40.0% (5.0 points short)`` for an MFU target."""
    short = f"missed: {value:.1%} ({(target - value) * 100:.1f} points short)"
    return f"met ({value:.1%} >= {target:.0%})" if met else short


def _assumption_text(a: dict[str, Any]) -> str:
    hw = ", ".join(f"{k} {v['bandwidth_tbps']} TB/s" for k, v in a["hardware"].items())
    opt = a["optimizer"] if a.get("optimizer_h100") in (None, a["optimizer"]) else (
        f"{a['optimizer']} (on one H100 with Triton: {a['optimizer_h100']}; the reference row, "
        f"train.kernel_backend=torch: {a.get('optimizer_reference', 'adamw')})")  # fmt: skip
    return (
        f"batch {a['batch']}; train.precision={a['precision']}, train.optimizer={opt}, EMA on. "
        f"GEMMs at {a['gemm_efficiency']:.0%} of {a['peak_tflops']:.0f} TFLOP/s (dense bf16), Triton GEMMs with fused "
        "epilogues (`gemm:<op>` rows) charged max(FLOPs at that rate, their bytes at the bandwidth below) per call, "
        "at cuBLAS's rate in the step columns and at "
        f"{' / '.join(f'{e:.0%}' for e in a.get('triton_gemm_efficiencies', []))} of peak in the sensitivity "
        "columns (unverified until a GPU run: `benchmarks/gpu_first_light.py`, `kernels.validate`, "
        "`bench_train_step.py --device cuda`); each model's `train.grad_clip` as its preset trains (clipping is "
        "counted in the update); bandwidth-bound ops and "
        f"the optimizer/EMA at {a['hbm_efficiency']:.1%} of peak HBM bandwidth ({hw}); attention: FLOPs at the GEMM "
        "rate + flash-style bytes at that bandwidth, cuDNN attention (head_dim 72 unpadded on sm_90; the "
        "FlashAttention-2 column pads it to 96); no overlap between kernels. The \"at peak bandwidth\" columns use "
        "DESIGN.md's / issue 27's charges instead: every byte at 100% of peak bandwidth and attention charged by its "
        "FLOPs only (no attention bytes). Fused = `use_backend(\"triton\")` "
        "(selected explicitly), reference = `use_backend(\"torch\")`; attention is SDPA on both sides."
    )


def to_markdown(result: dict[str, Any]) -> str:
    env, a = result["environment"], result["assumptions"]
    lines = [
        "# Roofline: one training step as the engine runs it (forward, backward, optimizer, EMA)",
        "",
        f"Counted {result['date']} on {env['machine']['node']} (torch {env['versions']['torch']}, git "
        f"{(env['git'].get('commit') or 'uncommitted')[:12]}) on fake tensors. " + _assumption_text(a),
        "",
        "## Predicted step time (H100: matmul / attention / bandwidth-bound / optimizer + EMA)",
        "",
        "| model | backend | GEMM TFLOP | attn TFLOP | attn GB | fwd+bwd bandwidth-bound GB | optimizer + EMA GB "
        "| launches | H100 matmul ms | H100 attn ms | H100 bw ms | H100 update ms | H100 step ms | H100 MFU "
        "| H100 MFU (FA2) | H200 step ms | H200 MFU | H100 MFU, Triton GEMMs at "
        + " / ".join(f"{e:.0%}" for e in a.get("triton_gemm_efficiencies", [])) + " | H100 MFU at peak bandwidth |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in result["models"].items():
        if "error" in m:
            lines.append(f"| {name} | — | {m['error']} |" + " |" * 16)
            continue
        for backend in [b for b in ("fused", m.get("comparison"), "reference") if b in m]:
            s = m[backend]
            h, h2, fa = s["predicted"]["H100"], s["predicted"]["H200"], s["predicted_fa2"]["H100"]
            label = f"{backend} (`{s['optimizer']}`{', comparison' if backend == m.get('comparison') else ''})"
            if s.get("grad_clip"):
                label += f", clip {s['grad_clip']:g}"
            sens = " / ".join(f"{v:.1%}" for v in s.get("h100_mfu_by_triton_gemm_efficiency", {}).values())
            lines.append(
                f"| {name} | {label} | {s['matmul_flops'] / 1e12:.2f} | {s['attention_flops'] / 1e12:.2f} | "
                f"{s['attention_bytes'] / 1e9:.1f} | {s['other_bytes'] / 1e9:.1f} | {s['update_bytes'] / 1e9:.1f} | "
                f"{s['launches'] + s['update_launches']} | {h['matmul_s'] * 1e3:.1f} | {h['attention_s'] * 1e3:.1f} | "
                f"{h['bandwidth_s'] * 1e3:.1f} | {h['update_s'] * 1e3:.1f} | {h['step_s'] * 1e3:.1f} | "
                f"{h['mfu']:.1%} | {fa['mfu']:.1%} | {h2['step_s'] * 1e3:.1f} | {h2['mfu']:.1%} | {sens or '—'} | "
                f"{s['predicted_peak']['mfu']:.1%} |"
            )
    lines += [
        "",
        "## Targets (fused)",
        "",
        "| model | params | fwd+bwd bytes vs reference (<= 20%) | fwd+bwd bandwidth-bound GB "
        "| predicted H100 MFU, whole step (>= 45%) | at peak bandwidth (>= 50%, issue 27) "
        "| comparison row (the other optimizer) |",
        "|---|---:|---|---|---|---|---|",
    ]
    for name, m in result["models"].items():
        if "error" in m:
            continue
        ratio, gb, mfu, mfu_peak = _target_text(m["targets"])
        alt = m.get(m.get("comparison") or "")
        alt_s = (f"{alt['predicted']['H100']['mfu']:.1%} with `{alt['optimizer']}` "
                 f"({alt['update_bytes'] / 1e9:.1f} GB update)") if alt else "—"  # fmt: skip
        lines.append(f"| {name} | {m['params'] / 1e6:.2f}M | {ratio} | {gb} | {mfu} | {mfu_peak} | {alt_s} |")
    if result.get("tokenizers"):
        from roofline_tokenizer import format_rows

        lines += ["", "## Tokenizer training step (as `train-tokenizer` runs it: bf16 compute copy, fp32 masters, "
                  "optimizer with the preset's clipping and EMA inside the step; frozen VFM and discriminator "
                  "backbone forward counted as work)", ""]
        for res in result["tokenizers"].values():
            lines += [format_rows(res), ""]
    for name, m in result["models"].items():
        if "error" in m:
            continue
        lines += ["", f"### {name}: bandwidth-bound bytes per op type (GB per step)", "",
                  "`gemm:<op>` rows are fused GEMM ops (Triton GEMMs with an epilogue): their bytes are charged in the "
                  "matmul time (max of FLOPs and bytes per call), not in the bandwidth-bound total.", "",
                  "| op type | fused GB | reference GB | minimum GB | fused launches |", "|---|---:|---:|---:|---:|"]
        f, r = m["fused"]["op_types"], m["reference"]["op_types"]
        sizes = {k: max(f.get(k, {}).get("bytes", 0), r.get(k, {}).get("bytes", 0)) for k in set(f) | set(r)}
        for t in sorted(sizes, key=lambda k: -sizes[k]):
            fb, rb = f.get(t, {}), r.get(t, {})
            mn = fb.get("min_bytes", rb.get("min_bytes"))
            lines.append(
                f"| {t} | {fb.get('bytes', 0) / 1e9:.2f} | {rb.get('bytes', 0) / 1e9:.2f} | "
                f"{'—' if mn is None else f'{mn / 1e9:.2f}'} | {fb.get('launches', 0)} |"
            )
        lines += ["", f"### {name}: largest bandwidth-bound ops of forward + backward (GB per step)", ""]
        lines += ["| backend | phase | op | calls | GB |", "|---|---|---|---:|---:|"]
        for backend in ("fused", "reference"):
            for r in m[backend]["top_rows"]:
                lines.append(f"| {backend} | {r['phase']} | `{r['op']}` | {r['calls']} | {r['bytes'] / 1e9:.2f} |")
    if result["ops"]:
        lines += [
            "",
            f"## Fused ops: bytes of forward + backward on their model cases ({a['op_dtype']}, meta device)",
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

"""The tokenizer step benchmarks: bench_train_step.py --model PAE-tiny runs the stage's step and reports its terms;
the meta-device roofline of a tokenizer step counts fused beside reference, and turning a regularizer off removes
its cost from the count (MCR: two decoder passes fewer)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))


def test_tokenizer_step_benchmark_record(bench_path, tmp_path):
    import bench_tokenizer_step

    rec = bench_tokenizer_step.run("PAE-tiny", batch=2, device="cpu", backend="torch", steps=1, warmup=0,
                                   lpips=False, json_out=tmp_path / "r.json")
    assert rec["kind"] == "tokenizer" and rec["step_seconds"] > 0 and (tmp_path / "r.json").is_file()
    assert {"l1", "gan", "gan_weight", "ssr", "mcr", "scr", "disc/loss"} <= set(rec["terms"])
    assert 0 < rec["trainable_params"] < rec["params"] + rec["trainable_params"]


def test_tokenizer_roofline_counts_the_mcr_cost(bench_path):
    import roofline_tokenizer as rt

    full = rt.tokenizer_step_traffic("PAE-tiny", batch=1, backend="reference")
    no_mcr = rt.tokenizer_step_traffic("PAE-tiny", batch=1, backend="reference", mcr=False)
    assert full["matmul_flops"] > 0 and full["attention_flops"] > 0
    assert no_mcr["matmul_flops"] < 0.8 * full["matmul_flops"]  # two of three decoder passes (and their LPIPS) gone


@pytest.mark.slow
def test_tokenizer_roofline_row_and_ssr_cost(bench_path):
    import roofline_tokenizer as rt

    full = rt.tokenizer_step_traffic("PAE-tiny", batch=1, backend="reference")
    no_ssr = rt.tokenizer_step_traffic("PAE-tiny", batch=1, backend="reference", ssr=False)
    assert no_ssr["total_bytes"] < full["total_bytes"]  # the Gram loss and its backward gone
    res = rt.analyse_tokenizer("PAE-tiny", batch=1, dtype=torch.bfloat16)
    assert set(res["targets"]) >= {"rae_ratio", "h100_mfu_peak", "h100_mfu_peak_met"} and res["fused"]["launches"] > 0
    assert res["targets"]["h100_mfu_peak"] == res["fused"]["predicted_peak"]["mfu"]
    assert "PAE-tiny step (batch 1) | fused" in rt.format_rows(res)
    # train.optimizer=auto on an H100: the one-kernel AdamW + EMA + bf16 copy, counted inside the step
    assert res["optimizer"] == "fused_adamw_ema" and res["optimizer_ema_bytes"] == res["fused"]["update_bytes"] > 0


def test_tokenizer_roofline_counts_the_update_as_the_engine_runs_it(bench_path, fresh_process):
    """The update is counted inside the step: the tokenizer's bf16 compute copy updated by fused_adamw_ema with its
    EMA (36 B per trainable parameter), the discriminator's fp32 heads (``use_compute_dtype``: no compute copy, no
    EMA, 28 B per parameter), plus 2 B per parameter for each unit when the preset clips."""
    if not fresh_process:
        return  # ran, and passed, in a fresh interpreter (tests/conftest.py fresh_process)
    import roofline_tokenizer as rt
    from tokenizer_step import build_step, preset_for

    from pae_fast.config import load_config

    parts = build_step("PAE-tiny", "meta")
    n_tok = sum(p.numel() for p in parts.model.tok.trainable_parameters())
    n_disc = sum(p.numel() for p in parts.disc.trainable_parameters())
    clip = 2 if load_config(preset_for("PAE-tiny")).train.grad_clip > 0 else 0
    s = rt.tokenizer_step_traffic("PAE-tiny", batch=1, backend="fused")
    assert s["optimizer"] == "fused_adamw_ema"
    assert s["update_bytes"] == pytest.approx((36 + clip) * n_tok + (28 + clip) * n_disc, rel=0.02)
    res = rt.analyse_tokenizer("PAE-tiny", batch=1)
    assert res["fused"]["predicted"]["H100"]["update_s"] > 0 and res["optimizer_ema_bytes"] == res["fused"][
        "update_bytes"]  # fmt: skip
    assert list(res["fused"]["h100_mfu_by_triton_gemm_efficiency"]) == ["0.70", "0.60", "0.50"]
    assert "optimizer + EMA GB" in rt.format_rows(res)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tokenizer_roofline_counts_the_discriminator_as_the_stage_runs_it(bench_path, fresh_process, dtype):
    """The count's discriminator is the stage's: under bf16 its frozen backbone is held in bf16 (the hook
    ``engine.precision.compute_weights`` calls), its heads and their spectral-norm ``u`` fp32; under fp32 all fp32."""
    if not fresh_process:
        return  # ran, and passed, in a fresh interpreter (tests/conftest.py fresh_process)
    import roofline_tokenizer as rt
    from roofline_step import fake_mode
    from tokenizer_step import build_step

    parts = build_step("PAE-tiny", "meta")
    with fake_mode():
        rt._count(parts, 1, dtype, "fused", True, "PAE-tiny")
    d = parts.disc
    assert d.compute_dtype == dtype and {p.dtype for p in d.backbone.parameters()} == {dtype}
    sn = [m.parametrizations.weight[0] for m in d.heads.modules() if hasattr(m, "parametrizations")]
    assert sn and {p.dtype for p in d.heads.parameters()} | {s._u.dtype for s in sn} == {torch.float32}

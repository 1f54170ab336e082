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
    assert set(res["targets"]) >= {"bandwidth_ratio", "h100_mfu"} and res["fused"]["launches"] > 0
    assert "PAE-tiny step (batch 1) | fused" in rt.format_rows(res)
    # train.optimizer=auto on an H100: the one-kernel AdamW + EMA + bf16 copy, 36 B per trainable parameter
    assert res["optimizer"] == "fused_adamw_ema" and res["optimizer_ema_bytes"] == 36 * res["trainable_params"]

"""compile_check: kernel launches recorded under the interpreter compile for sm_90 without a GPU."""

import json
import os
import subprocess
import sys

import pytest

from pae_fast.kernels.tools.compile_check import _dedupe


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "pae_fast.kernels.tools.compile_check", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def test_latent_norm_bf16_launches_compile_for_sm90(tmp_path):
    out = _run(["--ops", "latent_norm", "--sizes", "model", "--dtypes", "bf16", "--max-launches", "2", "--ptxas",
                "--json", str(tmp_path / "rows.json")], tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 2 and all(r["ok"] for r in rows)
    assert {r["kernel"] for r in rows} == {"_latent_norm_fwd_kernel", "_latent_norm_bwd_kernel"}
    assert all(r["registers"] > 0 and r["spill_bytes"] == 0 for r in rows), rows
    assert "2 passed, 0 failed (sm_90" in out.stdout


def test_unknown_op_is_a_clear_error(tmp_path):
    out = _run(["--ops", "nope", "--sizes", "small"], tmp_path)
    assert out.returncode != 0 and "unknown op(s) ['nope']" in (out.stdout + out.stderr)


def test_dedupe_keeps_distinct_constexprs():
    base = {"module": "m", "kernel": "k", "options": {}, "op": "o", "case": "c",
            "args": {"X": {"kind": "tensor", "dtype": "fp16"}, "BLOCK": {"kind": "int", "value": 64}}}
    other = json.loads(json.dumps(base))
    other["args"]["BLOCK"]["value"] = 128
    assert len(_dedupe([base, json.loads(json.dumps(base)), other])) == 2


@pytest.mark.slow
def test_every_op_compiles_for_sm90(tmp_path):
    out = _run(["--ptxas"], tmp_path)
    assert out.returncode == 0, out.stdout[-6000:]


def test_occupancy_and_lane_waste_columns():
    from pae_fast.kernels.tools.compile_check import blocks_per_sm, row_lane_waste

    assert blocks_per_sm(128, 16) == 1 and blocks_per_sm(164, 4) == 3 and blocks_per_sm(118, 8) == 2
    assert blocks_per_sm(32, 4) == 16 and blocks_per_sm(64, 4, shared_bytes=100 * 1024) == 2
    rec = {"args": {"D": {"kind": "int", "value": 1152}, "BLOCK_C": {"kind": "int", "value": 2048}}}
    assert row_lane_waste(rec) == pytest.approx(1 - 1152 / 2048)
    rec["args"]["BLOCK_C"]["value"], rec["args"]["BLOCK_C2"] = 1024, {"kind": "int", "value": 128}
    assert row_lane_waste(rec) == 0.0
    assert row_lane_waste({"args": {"N": {"kind": "int", "value": 3}}}) is None


def test_recorded_sm90_results_gated_residual_backward_occupancy():
    """The committed ``compile_check --ptxas`` results (benchmarks/results/compile_check_sm90.json): every launch
    compiled, and the gated_residual_adaln backward at model widths runs >= 2 blocks per SM with <= 25 % padding."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "compile_check_sm90.json"
    rows = json.loads(path.read_text())
    assert rows and all(r["ok"] for r in rows)
    gated = [r for r in rows if r["kernel"] == "_gated_residual_adaln_bwd_kernel" and "(32,256," in r["case"]]
    assert len(gated) == 6  # 2 model cases x fp32 / fp16 / bf16
    assert all(r["blocks_per_sm"] >= 2 and r["row_lane_waste"] <= 0.25 and r["spill_bytes"] == 0 for r in gated)


def test_autotuned_kernels_record_every_config_with_jit_alignment(tmp_path):
    """swiglu_mlp's GEMMs are autotuned on a GPU: the record phase keeps one launch per config (nothing is timed), and
    each compile sees the 16-byte alignment the JIT would specialize on (without it no async-copy pipelining)."""
    from pae_fast.kernels import _swiglu_mlp_kernels as K

    n = str(len(K.GPU_CONFIGS))
    out = _run(["--ops", "swiglu_mlp", "--sizes", "small", "--dtypes", "bf16", "--max-launches", n,
                "--json", str(tmp_path / "rows.json")], tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert all(r["ok"] and r["kernel"] == "_swiglu_mlp_fwd_kernel" for r in rows), rows
    got = sorted((r["options"]["num_warps"], r["options"]["num_stages"]) for r in rows)
    assert got == sorted((c.num_warps, c.num_stages) for c in K.GPU_CONFIGS)


def _kernel_signature(X, W, K, N, BLOCK_M: "tl.constexpr"):  # noqa: F821 - parsed by JITFunction, never run
    pass


def test_alignment_attrs_follow_the_recorded_arguments():
    from triton.runtime.jit import JITFunction

    from pae_fast.kernels.tools.compile_check import _attrs

    fn = JITFunction(_kernel_signature)  # the compiler's view even when the interpreter is on
    rec = {"args": {"X": {"kind": "tensor", "dtype": "bf16", "div16": True}, "W": {"kind": "tensor", "dtype": "bf16",
           "div16": False}, "K": {"kind": "int", "value": 1152, "div16": True}, "N": {"kind": "int", "value": 24,
           "div16": False}, "BLOCK_M": {"kind": "int", "value": 128, "div16": True}}}  # fmt: skip
    idx = {n: i for i, n in enumerate(fn.arg_names)}
    assert set(_attrs(fn, rec)) == {(idx["X"],), (idx["K"],)}  # constexprs and unaligned arguments left out

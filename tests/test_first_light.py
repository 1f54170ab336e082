"""``benchmarks/gpu_first_light.py --dry-run``: the plan's wiring on CPU (tiny shapes, kernels under the interpreter),
run as on the GPU machine: a bare checkout (``python -S``: no installed package, only ``PYTHONPATH``), every item in
its own process, a failing item recorded and the plan going on, a hung item cut at its cap; and the report's rules
(ratio = measured / predicted, flagged outside [0.8, 1.25]; predictions at the calibrated peaks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_first_light.py"
ITEMS = ["env", "validate", "dit_step", "tokenizer_step", "optimizer", "attention", "missing"]


@pytest.fixture
def bench_path():
    sys.path.insert(0, str(SCRIPT.parent))
    yield
    sys.path.remove(str(SCRIPT.parent))


def _dry_run(out: Path, *args: str, timeout: float = 400) -> tuple[subprocess.CompletedProcess, dict, str]:
    """The script as ``make first-light`` runs it, but without site-packages processing (``-S``: the editable install
    of this checkout is not seen), torch's folder and the checkout on ``PYTHONPATH``."""
    site = str(Path(torch.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), site])}
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its CPU items itself
    cmd = [sys.executable, "-S", str(SCRIPT), "--dry-run", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert (out / "first_light.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "first_light.json").read_text()), (out / "first_light.md").read_text()


def _table(md: str) -> list[list[str]]:
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| item |")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows]


def test_dry_run_records_failure_timeout_and_skips(tmp_path):
    """Fast path: env (calibration) and attention run; optimizer fails at its start (injected), missing hangs past a
    4 s cap; the others are skipped (not in --only). The plan goes on past both, and the report says why."""
    proc, rep, md = _dry_run(tmp_path, "--only", "env,attention,optimizer,missing", "--inject", "optimizer=fail",
                             "--inject", "missing=hang", "--cap", "missing=4")
    assert proc.returncode == 1, proc.stderr[-2000:]  # an item failed / timed out
    items = {it["name"]: it for it in rep["items"]}
    assert [it["name"] for it in rep["items"]] == ITEMS
    status = {k: v["status"] for k, v in items.items()}
    assert status == {"env": "ok", "validate": "skipped", "dit_step": "skipped", "tokenizer_step": "skipped",
                      "optimizer": "failed", "attention": "ok", "missing": "timeout"}, status
    assert items["validate"]["error"] == "not in --only"
    assert "RuntimeError: failure injected by --inject optimizer=fail" in items["optimizer"]["error"]
    assert "Traceback" in items["optimizer"]["details"]["traceback"]
    assert items["missing"]["error"].startswith("cut at its time cap of 4 s") and items["missing"]["seconds"] < 30
    # calibration from item env, used by the attention prediction
    cal = rep["calibration"]
    assert cal["gemm_flops"] > 0 and cal["copy_bytes_per_s"] > 0 and rep["device"] == "cpu"
    assert rep["environment"]["triton_interpret"] is True
    attn = [r for r in items["attention"]["rows"] if r["status"] == "ok"]
    assert {r["label"].rsplit(": ", 1)[1].split(" ")[0] for r in attn} == {"sdpa:flash", "sdpa:cudnn", "sdpa:efficient",
                                                                       "sdpa:math"}
    assert len(attn) == 8  # two shapes x four SDPA kernels (pinning is not applied on CPU; all of them run)
    for r in attn:
        assert r["predicted"] > 0 and r["ratio"] == pytest.approx(r["measured"] / r["predicted"])
    skipped = [r for r in items["attention"]["rows"] if r["status"] == "skipped"]
    assert all(r["note"] for r in skipped)  # flash_attn / xformers absent here: the reason is recorded
    # the markdown: one table (item, status, measured, predicted, ratio), then the details with the reasons
    assert "| item | status | measured | predicted | ratio |" in md
    table = _table(md)
    assert len(table) == sum(max(1, len(it["rows"])) for it in rep["items"])
    by_item = {row[0].split(":")[0]: row for row in table}
    assert by_item["5. optimizer"][1] == "failed" and by_item["7. missing"][1] == "timeout"
    assert by_item["2. validate"][1] == "skipped"
    assert "failure injected" in md and "cut at its time cap of 4 s" in md and "not in --only" in md


@pytest.mark.slow
def test_dry_run_whole_plan(tmp_path):
    """The whole plan on CPU within its default 120 s budget (issue 22: <= 2 minutes on the 2-core machine), every
    item ok: kernels.validate under the interpreter, both optimizers' steps, the tokenizer step with LPIPS + GAN,
    fused_adamw_ema matching AdamW + EMA."""
    proc, rep, md = _dry_run(tmp_path)
    assert proc.returncode == 0, md
    assert {it["name"]: it["status"] for it in rep["items"]} == dict.fromkeys(ITEMS, "ok")
    assert rep["spent_s"] <= rep["budget_s"] == 120
    items = {it["name"]: it for it in rep["items"]}
    (val,) = items["validate"]["rows"]
    assert val["measured"] == val["predicted"] > 0
    steps = [r for r in items["dit_step"]["rows"] if r["unit"] == "ms/step"]
    assert [r["label"].split(", ")[1].split(" ")[0] for r in steps] == ["fused_adamw_ema", "adamw"]
    assert all(r["measured"] > 0 and r["predicted"] > 0 for r in steps)
    assert all(v["within"] for v in items["optimizer"]["details"]["states"].values())
    assert {"lpips", "gan"} <= set(items["tokenizer_step"]["details"]["measured"]["terms"])


def test_markdown_flags_ratios_outside_the_band(bench_path):
    import gpu_first_light as fl

    rows = [dict(label=f"r{x}", status="ok", measured=x, predicted=1.0, unit="ms", ratio=x, note="")
            for x in (0.79, 0.8, 1.25, 1.26)]
    rows.append(dict(label="none | x", status="skipped", measured=None, predicted=None, unit="", ratio=None,
                     note="why"))
    rep = {"device": "NVIDIA H100", "dry_run": False, "started": "now", "spent_s": 1.0, "budget_s": 360.0,
           "git": {"commit": "abc"}, "environment": None,
           "items": [{"name": "x", "title": "t", "status": "ok", "rows": rows, "details": {}, "seconds": 1.0,
                      "cap_s": 2.0}, {"name": "y", "title": "u", "status": "timeout", "rows": [], "details": {},
                                      "error": "cut", "seconds": 2.0, "cap_s": 2.0}]}  # fmt: skip
    table = {r[0]: r for r in _table(fl.to_markdown(rep))}
    assert table["1. x: r0.79"][4] == "**0.79**" and table["1. x: r1.26"][4] == "**1.26**"
    assert table["1. x: r0.8"][4] == "0.80" and table["1. x: r1.25"][4] == "1.25"
    assert table["1. x: none \\| x"][1:] == ["skipped", "—", "—", "—"]  # a | in a label stays in its cell
    assert table["2. y: u"][1] == "timeout"
    assert fl.report_name("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3" and fl.report_name("cpu") == "cpu"


def test_prediction_uses_the_calibrated_peaks(bench_path, monkeypatch, tmp_path):
    """On a known GPU the roofline runs at the measured rates (MFU against the nominal peak); on an unknown one at
    the measured rates with MFU against the measured GEMM rate; uncalibrated, at the roofline's assumptions."""
    import first_light_ctx as fli
    import roofline

    s = dict(matmul_flops=6e12, attention_flops=1e12, attention_model_flops=0.8e12, attention_bytes=2e9,
             other_bytes=30e9, update_bytes=10e9)
    gemm, bw = 600e12, 3.0e12
    ctx = fli.Ctx(dev=torch.device("cuda"), dry=False, calib={"gemm_flops": gemm, "copy_bytes_per_s": bw},
                  result=tmp_path / "r.json", deadline=float("inf"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    p = fli.predict(ctx, s)
    step = (6e12 + 1e12) / gemm + (2e9 + 30e9 + 10e9) / bw  # naive: every part at the measured rates, no overlap
    assert p["step_s"] == pytest.approx(step) and p["hardware"] == "H100 SXM"
    assert p["mfu"] == pytest.approx((6e12 + 0.8e12) / (step * 989e12))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA B200")
    p = fli.predict(ctx, s)
    assert p["step_s"] == pytest.approx(step) and p["mfu"] == pytest.approx((6e12 + 0.8e12) / (step * gemm))
    ctx.calib = {}
    assert fli.predict(ctx, s) is None  # unknown GPU, no calibration: no prediction
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    p = fli.predict(ctx, s)
    assert p["step_s"] == pytest.approx(roofline.predict(s, roofline.HARDWARE["H100"])["step_s"])


@pytest.mark.parametrize("args", [["--only", "env,bogus"], ["--cap", "env=fast"], ["--cap", "nope=3"],
                                  ["--inject", "env=explode"]])
def test_bad_options_exit_2(bench_path, tmp_path, args, capsys):
    import gpu_first_light as fl

    with pytest.raises(SystemExit) as e:
        fl.main(["--dry-run", "--out", str(tmp_path), *args])
    assert e.value.code == 2
    assert "first_light" not in "".join(p.name for p in tmp_path.iterdir())

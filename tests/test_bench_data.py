"""benchmarks/bench_data.py runs and writes its result file (its shape and keys, never its speed)."""

from __future__ import annotations

import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_data_writes_results(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_data

    out = tmp_path / "data.json"
    assert bench_data.main(["--count", "8", "--size", "32", "--batch", "4", "--threads", "1", "--epochs", "1",
                            "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["files"] == 8 and rec["threads"] == 1 and rec["generated"] is True
    assert rec["results"]["pil"]["images_per_s"] > 0 and len(rec["results"]["pil"]["rounds"]) == 1
    if "dali_unavailable" not in rec:
        assert rec["ratio_vs_pil"]["dali_cpu"] == rec["results"]["dali_cpu"]["images_per_s"] / rec["results"][
            "pil"]["images_per_s"]


def test_run_all_runs_and_summarizes_the_data_benchmark(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_data
    import run_all

    calls = []

    def fake_run(cmd, log, timeout):  # record the command; write what bench_data writes, at a tiny size
        calls.append(cmd)
        json_out = cmd[cmd.index("--json") + 1]
        return bench_data.main(["--count", "8", "--size", "32", "--batch", "4", "--threads", "1", "--epochs", "1",
                                "--json", json_out]), 0.0

    monkeypatch.setattr(run_all, "_run", fake_run)
    status = run_all.run_all(tmp_path, None, False, {"roofline", "ops", "steps"})
    assert list(status) == ["data"] and status["data"].startswith("ok")
    assert calls[0][1].endswith("bench_data.py") and (tmp_path / "data_cpu.json").is_file()
    text = run_all.summarize(tmp_path, status)
    assert "## Image loaders (data_cpu.json: 8 files, 32 px, batch 4, 1 threads/workers)" in text
    assert "| pil |" in text
    assert run_all.run_all(tmp_path, None, False, {"roofline", "ops", "steps", "data"}) == {}

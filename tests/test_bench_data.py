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

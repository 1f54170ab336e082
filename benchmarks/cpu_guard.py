"""Issue 16's CPU guard: on a small CPU the full training step with the default kernel backend (``auto``: the fused
model code, which on CPU runs the PyTorch references and SDPA attention) is not slower than the plain PyTorch
reference backend (``torch``: the references and the explicit ``softmax(QK^T)V`` attention) of the same model.

Runs ``bench_train_step.py`` for the two backends alternately (``--rounds`` pairs, each configuration in its own
process, as ``run_all.py`` does), so load from other jobs on a shared machine hits both alike, and compares the
medians of the per-run median step times.

    python benchmarks/cpu_guard.py --model LightningDiT-B/1 --batch 8 --rounds 3 --steps 3
        # -> benchmarks/results/cpu_guard_LightningDiT-B_1_b8_fp32.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import RESULTS_DIR, environment  # noqa: E402

HERE = Path(__file__).resolve().parent
BACKENDS = ("auto", "torch")


def run(model: str = "LightningDiT-B/1", batch: int = 8, rounds: int = 3, steps: int = 3, warmup: int = 1,
        precision: str = "fp32", out_dir: str | Path | None = RESULTS_DIR) -> dict[str, Any]:
    """Alternate ``rounds`` pairs of runs (auto, torch) and return (and write) the comparison record."""
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for backend in BACKENDS:
                out = Path(tmp) / f"{backend}_{i}.json"
                cmd = [sys.executable, str(HERE / "bench_train_step.py"), "--model", model, "--batch", str(batch),
                       "--device", "cpu", "--precision", precision, "--backend", backend, "--steps", str(steps),
                       "--warmup", str(warmup), "--json", str(out)]  # fmt: skip
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                rec = json.loads(out.read_text())
                runs.append({"round": i, "backend": backend, "load_1min_before": load,
                             "wall_seconds": time.perf_counter() - t0, "step_seconds": rec["step_seconds"],
                             "step_seconds_all": rec["step_seconds_all"], "warmup_seconds": rec["warmup_seconds"],
                             "peak_memory_bytes": rec["peak_memory_bytes"], "optimizer": rec.get("optimizer")})
                print(f"round {i} {backend}: {rec['step_seconds']:.2f} s/step (load {load:.1f})", flush=True)
    med = {b: statistics.median(r["step_seconds"] for r in runs if r["backend"] == b) for b in BACKENDS}
    faster = sum(a["step_seconds"] <= t["step_seconds"] for a, t in zip(runs[0::2], runs[1::2]))
    result = {
        "claim": f"the full training step of {model} (batch {batch}, {precision}) on this CPU with --backend auto is "
                 "not slower than with --backend torch",
        "model": model, "batch": batch, "precision": precision, "device": "cpu", "rounds": rounds, "steps": steps,
        "warmup": warmup, "runs": runs, "median_step_seconds": med,
        "auto_over_torch": med["auto"] / med["torch"], "rounds_auto_not_slower": faster,
        "holds": bool(med["auto"] <= med["torch"]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": environment(),
    }  # fmt: skip
    if out_dir is not None:
        from pae_fast.io import atomic_write_text

        name = f"cpu_guard_{model.replace('/', '_')}_b{batch}_{precision}.json"
        atomic_write_text(Path(out_dir) / name, json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="LightningDiT-B/1")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="(auto, torch) pairs, alternated")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (the run's median is used)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    a = p.parse_args(argv)
    res = run(a.model, a.batch, a.rounds, a.steps, a.warmup, a.precision, a.out_dir)
    m = res["median_step_seconds"]
    print(f"median s/step: auto {m['auto']:.2f}, torch {m['torch']:.2f} (auto / torch {res['auto_over_torch']:.2f}; "
          f"auto not slower in {res['rounds_auto_not_slower']}/{res['rounds']} rounds): "
          f"{'holds' if res['holds'] else 'does NOT hold'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``make bench``: every benchmark that fits the machine, results in ``benchmarks/results/``, then a summary.

Without a GPU (the CPU-feasible subset, < 10 minutes on 2 cores):
  1. roofline of one LightningDiT-XL/1 and DiTDH-XL training step (meta device)  -> roofline.md / roofline.json
  2. op benchmarks: references and compiled references, small cases              -> ops_cpu.json
  3. training step: LightningDiT-B/1 batch 8, eager; DiTDH-S batch 8, eager;
     LightningDiT-B/1 batch 8, torch.compile (1 warm-up + 1 timed step each)     -> train_step_*.json
  4. image loaders: decode + crop + flip, DALI against the PIL DataLoader on the
     same generated JPEGs and thread count (bench_data.py)                         -> data_cpu.json
With a GPU the same list at real sizes: fused ops included at model widths, the steps on LightningDiT-XL/1 and
DiTDH-XL (batch 32, bf16 autocast, 20 timed steps), the loaders with the DALI mixed (GPU) decoder too. Each
training step runs in its own process (clean peak memory).
A time budget (``--budget-s``; default 570 s on CPU, none on GPU) skips what no longer fits, and says so.
``summary.md`` collects the headline numbers with the machine they came from, and the sampling cost (model calls per
image) of every preset in ``configs/``, counted from its sampling plan.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from bench_env import REPO_ROOT, RESULTS_DIR  # noqa: E402


def plan(cuda: bool) -> list[dict[str, Any]]:
    """The training-step runs for this machine."""
    if cuda:
        base = {"batch": 32, "steps": 20, "device": "cuda"}
        return [
            {**base, "model": "LightningDiT-XL/1", "compile": False},
            {**base, "model": "LightningDiT-XL/1", "compile": True},
            {**base, "model": "DiTDH-XL", "compile": False},
            {**base, "model": "DiTDH-XL", "compile": True},
        ]
    base = {"batch": 8, "steps": 1, "warmup": 1, "device": "cpu"}
    return [
        {**base, "model": "LightningDiT-B/1", "compile": False},
        {**base, "model": "DiTDH-S", "compile": False},
        {**base, "model": "LightningDiT-B/1", "compile": True},
    ]


def step_slug(r: dict[str, Any]) -> str:
    name = r["model"].replace("/", "_")
    return f"train_step_{name}_b{r['batch']}_{r['device']}_{'compiled' if r['compile'] else 'eager'}"


class Budget:
    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.t0 = seconds, time.monotonic()

    def left(self) -> float | None:
        return None if self.seconds is None else self.seconds - (time.monotonic() - self.t0)


def _run(cmd: list[str], log: Path, timeout: float | None) -> tuple[int | None, float]:
    """Run ``cmd`` with output to ``log``; returns (exit code or None on timeout, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, time.monotonic() - t0


def _tail(log: Path, n: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_all(out_dir: Path, budget_s: float | None, cuda: bool, skip: set[str]) -> dict[str, Any]:
    """Run everything (minus ``skip``: roofline, ops, steps, data) and return ``{item: status}``."""
    py = sys.executable
    logs = out_dir / "logs"
    budget = Budget(budget_s)
    status: dict[str, Any] = {}

    def fits(item: str, need: float) -> bool:
        left = budget.left()
        if left is not None and left < need:
            status[item] = f"skipped: {max(left, 0):.0f} s left of the {budget_s:.0f} s budget (needs ~{need:.0f} s)"
            print(f"[bench] {item}: {status[item]}", flush=True)
            return False
        return True

    def record(item: str, rc: int | None, secs: float, log: Path) -> None:
        if rc == 0:
            status[item] = f"ok ({secs:.0f} s)"
        elif rc is None:
            status[item] = f"stopped at the time budget after {secs:.0f} s (log: {log.relative_to(out_dir)})"
        else:
            status[item] = f"failed with exit code {rc} after {secs:.0f} s (log: {log.relative_to(out_dir)})"
            print(_tail(log), flush=True)
        print(f"[bench] {item}: {status[item]}", flush=True)

    if "roofline" not in skip and fits("roofline", 20):
        print("[bench] roofline (meta device) ...", flush=True)
        log = logs / "roofline.log"
        rc, secs = _run([py, str(HERE / "roofline.py"), "--out-dir", str(out_dir)], log, budget.left())
        record("roofline", rc, secs, log)
    dev = "cuda" if cuda else "cpu"
    if "ops" not in skip and fits("ops", 60):
        print(f"[bench] op benchmarks ({dev}) ...", flush=True)
        log = logs / f"ops_{dev}.log"
        cmd = [py, "-m", "pytest", str(HERE / "test_bench_ops.py"), "-m", "benchmark", "--benchmark-enable",
               f"--benchmark-json={out_dir / f'ops_{dev}.json'}", "-p", "no:cacheprovider", "-q",
               "--benchmark-columns=min,median,rounds"]  # fmt: skip
        if not cuda:
            cmd += ["--benchmark-max-time=0.2", "--benchmark-min-rounds=3"]
        rc, secs = _run(cmd, log, budget.left())
        record("ops", rc, secs, log)
    if "steps" not in skip:
        for r in plan(cuda):
            slug = step_slug(r)
            if not fits(slug, 60 if r["compile"] else 30):
                continue
            print(f"[bench] {slug} ...", flush=True)
            log = logs / f"{slug}.log"
            cmd = [py, str(HERE / "bench_train_step.py"), "--model", r["model"], "--batch", str(r["batch"]),
                   "--device", r["device"], "--steps", str(r["steps"]),
                   "--json", str(out_dir / f"{slug}.json")]  # fmt: skip
            if "warmup" in r:
                cmd += ["--warmup", str(r["warmup"])]
            if r["compile"]:
                cmd.append("--compile")
            rc, secs = _run(cmd, log, budget.left())
            record(slug, rc, secs, log)
    if "data" not in skip and fits("data", 60):
        print(f"[bench] image loaders ({dev}) ...", flush=True)
        log = logs / f"data_{dev}.log"
        cmd = [py, str(HERE / "bench_data.py"), "--json", str(out_dir / f"data_{dev}.json")]
        if not cuda:  # CPU: the 2-core defaults at a smaller size keep it to about a minute
            cmd += ["--count", "128", "--size", "128", "--epochs", "2"]
        rc, secs = _run(cmd, log, budget.left())
        record("data", rc, secs, log)
    return status


# ----------------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def sampling_cost_rows(configs_dir: Path = REPO_ROOT / "configs") -> list[dict[str, Any]]:
    """Per preset: sampler, grid, model calls (NFE) per image and generator forwards per image.

    A CFG call in its interval runs the conditional and unconditional halves as one batch of 2B (two forwards per
    image); AutoGuidance runs the main model and the guide on every call.
    """
    from pae_fast.config import load_config
    from pae_fast.config_io import read_preset
    from pae_fast.flow.grid import plan_from_config

    rows = []
    for path in sorted(configs_dir.glob("*.yaml")):
        if "sample" not in read_preset(path):  # a preset that does not sample (tokenizer, stage 0): nothing to count
            continue
        cfg = load_config(path)
        sc = cfg.sample
        plan = plan_from_config(sc, (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size))
        extra = {"none": 0, "cfg": plan.guided_calls(sc.cfg_interval_start), "autoguidance": plan.nfe}[sc.guidance]
        rows.append({"preset": path.stem, "sampler": sc.sampler, "guidance": sc.guidance, "nfe": plan.nfe,
                     "forwards": plan.nfe + extra, "grid": plan.describe()})  # fmt: skip
    return rows


def summarize(out_dir: Path, status: dict[str, Any] | None = None) -> str:
    """Markdown summary of the result files in ``out_dir`` (whatever is there)."""
    lines = ["# Benchmark summary", ""]
    roof = _load(out_dir / "roofline.json")
    env = None
    if roof:
        env = roof["environment"]
        lines += ["## Roofline (meta device, predicted; details in roofline.md)", "",
                  "| model | backend | bandwidth-bound GB | H100 step ms | H100 MFU | H200 step ms | targets |",
                  "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for name, m in roof["models"].items():
            if "error" in m:
                lines.append(f"| {name} | — | {m['error']} | | | | |")
                continue
            t = m["targets"]
            tgt = (f"bytes {t['bandwidth_ratio']:.1%} of ref ({'met' if t['bandwidth_ratio_met'] else 'missed'}), "
                   f"MFU {'met' if t['h100_mfu_met'] else 'missed'}, MFU at peak bandwidth {t['h100_mfu_peak']:.1%} "
                   f"({'met' if t['h100_mfu_peak_met'] else 'missed'})")  # fmt: skip
            for b in ("fused", "reference"):
                s = m[b]
                h, h2 = s["predicted"]["H100"], s["predicted"]["H200"]
                label = f"{b} (`{s['optimizer']}`)" if s.get("optimizer") else b
                lines.append(
                    f"| {name} | {label} | {s['other_bytes'] / 1e9:.1f} | {h['step_s'] * 1e3:.1f} | {h['mfu']:.1%} | "
                    f"{h2['step_s'] * 1e3:.1f} | {tgt if b == 'fused' else ''} |"
                )
        lines.append("")
    steps = sorted(out_dir.glob("train_step_*.json"))
    if steps:
        lines += ["## Training step (measured)", "",
                  "| model | batch | device | precision | compiled | images/s | step s | peak memory GiB | MFU "
                  "| load (1 min) |",
                  "|---|---:|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for p in steps:
            r = _load(p)
            if not r:
                continue
            env = env or r.get("environment")
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "—"
            la = r.get("environment", {}).get("machine", {}).get("loadavg_1m")
            load = f"{la:.1f}" if la is not None else "—"
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['device']} | {r['precision']} | "
                f"{'yes' if r['compile'] else 'no'} | {r['images_per_s']:.2f} | {r['step_seconds']:.2f} | "
                f"{r['peak_memory_bytes'] / 2**30:.2f} | {mfu} | {load} |"
            )
        if any((_load(p) or {}).get("device") == "cpu" for p in steps):
            lines += ["", "On CPU the default kernel backend (`auto`) runs the PyTorch references of the fused ops "
                      "(Triton needs CUDA tensors) and SDPA attention; `cpu_guard.py` times it against `--backend "
                      "torch` (`cpu_guard_*.json`). `--backend triton` on CPU would time the Triton interpreter."]
        lines.append("")
    for p in sorted(out_dir.glob("ops_*.json")):
        data = _load(p)
        if not data:
            continue
        lines += [f"## Ops ({p.name}; median µs)", "",
                  "| op | case | mode | fused | reference | compiled reference | fused GB/s at the floor |",
                  "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
        table: dict[tuple[str, str, str], dict[str, Any]] = {}
        for b in data.get("benchmarks", []):
            e = b.get("extra_info", {})
            if "op" not in e:
                continue
            row = table.setdefault((e["op"], e["case"], e["mode"]), {})
            row[e["impl"]] = b["stats"]["median"] * 1e6
            if e["impl"] == "fused" and "floor_GBps" in e:
                row["gbps"] = e["floor_GBps"]
        for (op, case, mode), row in sorted(table.items()):
            fused, ref, comp = (f"{row[k]:.1f}" if k in row else "—" for k in ("fused", "reference", "compiled"))
            gbps = f"{row['gbps']:.0f}" if "gbps" in row else "—"
            lines.append(f"| {op} | {case} | {mode} | {fused} | {ref} | {comp} | {gbps} |")
        lines.append("")
    for p in sorted(out_dir.glob("data_*.json")):
        r = _load(p)
        if not r or "results" not in r:
            continue
        lines += [f"## Image loaders ({p.name}: {r['files']} files, {r['image_size']} px, batch {r['batch']}, "
                  f"{r['threads']} threads/workers)", "", "| loader | images/s | vs PIL |", "|---|---:|---:|"]
        for k, v in r["results"].items():
            ratio = r.get("ratio_vs_pil", {}).get(k)
            lines.append(f"| {k} | {v['images_per_s']:.1f} | {f'{ratio:.2f}x' if ratio else '—'} |")
        if "dali_unavailable" in r:
            lines.append(f"\nDALI unavailable: {r['dali_unavailable']}")
        lines.append("")
    lines += ["## Sampling cost per preset (counted from the sampling plan)", "",
              "| preset | sampler | guidance | NFE per image | generator forwards per image | grid |",
              "|---|---|---|---:|---:|---|"]  # fmt: skip
    for r in sampling_cost_rows():
        lines.append(f"| {r['preset']} | {r['sampler']} | {r['guidance']} | {r['nfe']} | {r['forwards']} | "
                     f"{r['grid']} |")  # fmt: skip
    lines.append("")
    if env:
        m, v = env["machine"], env["versions"]
        acc = env.get("accelerator") or {}
        lines += [
            f"Machine: {m['node']}, {m['processor']}, {m['cpu_count']} CPUs"
            + (f", {acc['name']}" if acc else ", no GPU")
            + f"; torch {v['torch']}, triton {v['triton']}, python {v['python']}; git "
            + f"{(env['git'].get('commit') or 'uncommitted')[:12]}{' (dirty)' if env['git'].get('dirty') else ''}.",
            "",
        ]
    if status:
        lines += ["## This run", ""] + [f"- {k}: {v}" for k, v in status.items()] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--budget-s", type=float, default=None, help="time budget in seconds (default: 570 on CPU)")
    p.add_argument("--skip", nargs="*", default=[], choices=["roofline", "ops", "steps", "data"],
                   help="parts to leave out")
    p.add_argument("--summary-only", action="store_true", help="only rebuild summary.md from the result files")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from pae_fast.io import atomic_write_text

    cuda = torch.cuda.is_available()
    budget = a.budget_s if a.budget_s is not None else (None if cuda else 570.0)
    t0 = time.monotonic()
    status = None
    if not a.summary_only:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        status = run_all(out, budget, cuda, set(a.skip))
    text = summarize(out, status)
    atomic_write_text(out / "summary.md", text)
    print("\n" + text)
    print(f"[bench] done in {time.monotonic() - t0:.0f} s; results in {out}")
    failed = [k for k, v in (status or {}).items() if v.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

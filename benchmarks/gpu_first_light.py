"""GPU first light: one command, run first on any new GPU, that proves the kernels and measures the steps in minutes.

    make first-light        # = PYTHONPATH=. python3 benchmarks/gpu_first_light.py --out benchmarks/results/first_light
    PYTHONPATH=. python3 benchmarks/gpu_first_light.py --dry-run --out /tmp/fl    # no GPU: the same plan, tiny, CPU

Runs from a bare checkout with the machine's own ``python3`` (torch, triton, timm, safetensors, einops, scikit-image
installed; nothing is installed or downloaded, every model has random weights). The items, in order of value, each in
its own process under its own time cap (a crashed or hung item, e.g. a CUDA illegal address, cannot take the rest
down) within a global budget of 6 minutes (:data:`PLAN`, :mod:`first_light_items`):

    1 env             GPU, SM count, driver, versions; bf16 GEMM 8192^3 and a 1 GiB device copy: the calibrated peaks
    2 validate        kernels.validate at model sizes in bf16 / fp16 / fp32, every op against its fp64 reference
    3 dit_step        LightningDiT-XL/1 training step, batch 32 (halved on OOM), bf16 compute weights: eager with
                      fused_adamw_ema, then compiled with CUDA graphs with fused_adamw_ema and with torch AdamW:
                      ms/step, MFU, peak memory
    4 tokenizer_step  PAE-DINOv2-L-d32 tokenizer step (LPIPS and GAN on), ms/step and peak memory
    5 optimizer       fused_adamw_ema vs torch AdamW + EMA: states after 10 steps, time per step
    6 attention       SDPA flash / cuDNN / efficient / math, flash-attn and xformers when importable, DiT and VFM shapes
    7 missing         what the machine lacks (DALI, apex, ...), reported as skipped with the reason

Predictions are the roofline's (``roofline.py``, ``roofline_tokenizer.py``) recomputed at the calibrated peaks of
item 1. ``first_light.json`` and ``first_light.md`` (one table: item, status, measured, predicted, ratio = measured /
predicted, bold outside [0.8, 1.25]; then details) are rewritten atomically before and after every item, so a run cut
off still reports what it did (an item cut off with the whole run shows ``running``). Statuses: ok, failed, skipped,
timeout. Exit status 0 when every item ran (whatever it found), 1 when an item failed or timed out, 2 on bad options.

Testing the report path (used by tests/test_first_light.py, harmless elsewhere): ``--inject ITEM=fail`` makes an
item raise at its start, ``--inject ITEM=hang`` makes it sleep past its cap; ``--cap ITEM=SECONDS`` overrides a cap.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class Item(NamedTuple):
    name: str
    title: str
    cap_gpu: float  # seconds, process start included
    cap_dry: float


PLAN = (
    Item("env", "environment and calibration", 40, 15),
    Item("validate", "kernels.validate at model sizes", 80, 25),
    Item("dit_step", "LightningDiT-XL/1 training step", 140, 20),
    Item("tokenizer_step", "PAE-DINOv2-L-d32 tokenizer step", 50, 20),
    Item("optimizer", "fused_adamw_ema vs torch AdamW + EMA", 20, 15),
    Item("attention", "attention backends", 20, 15),
    Item("missing", "what this machine lacks", 10, 10),
)
# the sums of the caps above; time an item leaves unused goes to the next one (cap = own cap + the slack so far)
BUDGET_GPU_S = 360.0  # one H100
BUDGET_DRY_S = 120.0
RATIO_BAND = (0.8, 1.25)  # docs/method.md § What one step costs: measured vs predicted beyond 20 %
STATUSES = ("ok", "failed", "skipped", "timeout")


def bootstrap_checkout() -> None:
    """Make ``pae_fast.kernels`` (+ ``.tools``) and ``pae_fast.configs`` importable from a bare checkout.

    The package maps them from ``kernels/`` and ``configs/`` at install time (setup.py ``package_dir``); with only
    ``PYTHONPATH=.`` they are loaded here from this checkout's folders under the same names (an install of another
    checkout is not mixed in: ``pae_fast`` itself comes from this checkout, first on ``sys.path``)."""
    import pae_fast

    for name, folder in (("pae_fast.kernels", ROOT / "kernels"), ("pae_fast.configs", ROOT / "configs")):
        found = importlib.util.find_spec(name) if name not in sys.modules else None
        if name in sys.modules or (found is not None and Path(found.origin or "").resolve().parent == folder):
            continue
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(pae_fast, name.rsplit(".", 1)[1], module)


# ------------------------------------------------------------------------------------------------ one item (child)
def run_child(a: argparse.Namespace) -> int:
    bootstrap_checkout()
    import torch
    from first_light_ctx import Ctx, Stop
    from first_light_items import ITEMS

    dev = torch.device("cuda" if torch.cuda.is_available() and not a.dry_run else "cpu")
    ctx = Ctx(dev=dev, dry=a.dry_run, calib=json.loads(a.calib), result=Path(a.result), deadline=a.deadline)
    ctx.details["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    ctx.flush()
    try:
        mode = dict(x.split("=", 1) for x in a.inject).get(a.item)
        if mode == "fail":
            raise RuntimeError(f"failure injected by --inject {a.item}=fail")
        if mode == "hang":
            time.sleep(1e6)
        ITEMS[a.item](ctx)
    except Stop as e:
        ctx.flush("timeout", str(e))
        return 0
    except Exception as e:  # the item failed: the report says why, the plan goes on in the parent
        ctx.details["traceback"] = traceback.format_exc()[-3000:]
        ctx.flush("failed", f"{type(e).__name__}: {str(e)[:500]}")
        return 0
    ctx.flush("failed" if any(r["status"] == "failed" for r in ctx.rows) else "ok")
    return 0


# ------------------------------------------------------------------------------------------------ the plan (parent)
def _tail(path: Path, n: int) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


def run_item(item: Item, cap: float, a: argparse.Namespace, calib: dict[str, float], tmp: Path) -> dict[str, Any]:
    """Run one item in its own process, killed (its process group) at ``cap`` seconds; its record."""
    result, log = tmp / f"{item.name}.json", tmp / f"{item.name}.log"
    soft = time.time() + cap - min(10.0, 0.15 * cap)  # the item stops between sub-measurements from here on
    cmd = [sys.executable, *(["-S"] if sys.flags.no_site else []), str(Path(__file__).resolve()), "--item", item.name,
           "--result", str(result), "--calib", json.dumps(calib), "--deadline", str(soft),
           *(["--dry-run"] if a.dry_run else []), *(x for i in a.inject for x in ("--inject", i))]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    if a.dry_run:  # CPU: kernels under the interpreter (read when triton is imported), no GPU even if present
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:  # the interpreter of the GPU machine's triton is broken: never on a GPU
        env.pop("TRITON_INTERPRET", None)
    t0 = time.time()
    timed_out = False
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # cap reached, or this run interrupted (SIGTERM / Ctrl-C): the item's processes go too
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # its compile workers too
                rc = proc.wait()
    try:
        rec = json.loads(result.read_text())
    except (OSError, ValueError):
        rec = {"status": None, "error": None, "rows": [], "details": {}}
    if timed_out:
        rec["status"], rec["error"] = "timeout", f"cut at its time cap of {cap:.0f} s" + (
            f" (last state: {rec['error']})" if rec.get("error") else "")  # fmt: skip
    elif rec.get("status") not in STATUSES:
        rec["status"], rec["error"] = "failed", f"its process exited with status {rc} before reporting"
    rec.update(name=item.name, title=item.title, seconds=round(time.time() - t0, 2), cap_s=cap)
    rec["log_tail"] = _tail(log, 300 if rec["status"] == "ok" else 3000)
    return rec


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    return f"{v:.4g} {unit}".strip()


def to_markdown(rep: dict[str, Any]) -> str:
    lo, hi = RATIO_BAND
    env = rep.get("environment") or {}
    ver = env.get("versions") or {}
    lines = [
        f"# GPU first light: {rep['device']}{' (dry run on CPU, tiny shapes)' if rep['dry_run'] else ''}",
        "",
        f"Started {rep['started']} UTC; {rep['spent_s']:.0f} s of the {rep['budget_s']:.0f} s budget; git "
        f"{(rep['git'].get('commit') or 'unknown')[:12]}{' (dirty)' if rep['git'].get('dirty') else ''}; torch "
        f"{ver.get('torch', '?')}, triton {ver.get('triton', '?')}, CUDA {ver.get('cuda', '?')}.",
        *([f"GPU: {acc.get('name')}, compute capability {acc.get('capability')}, {acc.get('sm_count')} SMs, "
            f"{(acc.get('memory_bytes') or 0) / 2**30:.0f} GiB; nvidia-smi (driver, max SM clock, power limit): "
            f"{acc.get('nvidia_smi')}."] if (acc := env.get("accelerator")) else []),
        "",
        "Ratio = measured / predicted. Predictions: the roofline (`benchmarks/roofline.py`, `roofline_tokenizer.py`) "
        "at the peaks calibrated by item 1; ratios outside "
        f"[{lo}, {hi}] are in bold (docs/method.md § What one step costs).",
        "",
        "| item | status | measured | predicted | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for i, it in enumerate(rep["items"], 1):
        head = f"{i}. {it['name']}"
        if not it["rows"]:
            lines.append(f"| {head}: {it['title']} | {it['status']} | — | — | — |")
        for r in it["rows"]:
            ratio = r.get("ratio")
            rs = "—" if ratio is None else (f"{ratio:.2f}" if lo <= ratio <= hi else f"**{ratio:.2f}**")
            st = r["status"] if it["status"] in ("ok", "failed") else f"{r['status']} (item: {it['status']})"
            label = r["label"].replace("|", "\\|")  # a table cell
            lines.append(f"| {head}: {label} | {st} | {_fmt(r['measured'], r['unit'])} | "
                         f"{_fmt(r['predicted'], r['unit'])} | {rs} |")
    lines += ["", "## Details", ""]
    for i, it in enumerate(rep["items"], 1):
        lines.append(f"### {i}. {it['name']}: {it['title']} — {it['status']} "
                     f"({it.get('seconds', 0):.1f} s of its {it.get('cap_s', 0):.0f} s cap)")
        lines.append("")
        if it.get("error"):
            lines.append(f"- why: {it['error']}")
        lines += [f"- {r['label']}: {r['note']}" for r in it["rows"] if r.get("note")]
        for k, v in (it.get("details") or {}).items():
            if k not in ("environment", "traceback"):
                lines.append(f"- {k}: `{json.dumps(v, default=str)[:400]}`")
        if it["status"] in ("failed", "timeout") and it.get("log_tail"):
            lines += ["", "```", it["log_tail"][-1500:].strip(), "```"]
        lines.append("")
    return "\n".join(lines)


def write_report(out: Path, rep: dict[str, Any]) -> None:
    from pae_fast.io import atomic_write_text  # temp file + fsync + rename

    rep["spent_s"] = time.time() - rep["_t0"]
    atomic_write_text(out / "first_light.json", json.dumps({k: v for k, v in rep.items() if k != "_t0"}, indent=1,
                                                           default=str))
    atomic_write_text(out / "first_light.md", to_markdown(rep))


def _parse_kv(values: list[str], what: str, p: argparse.ArgumentParser) -> dict[str, str]:
    out = {}
    names = {i.name for i in PLAN}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or k not in names:
            p.error(f"{what} {v!r}: expected ITEM=VALUE with ITEM one of {', '.join(i.name for i in PLAN)}")
        out[k] = val
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(BENCH / "results" / "first_light"), help="folder for first_light.json/.md")
    p.add_argument("--dry-run", action="store_true", help="no GPU: the same plan on CPU, tiny shapes, interpreter")
    p.add_argument("--only", default=None, help="comma-separated items to run (the others: skipped)")
    p.add_argument("--budget", type=float, default=None, help="global seconds (default 360, dry run 120)")
    p.add_argument("--cap", action="append", default=[], metavar="ITEM=SECONDS", help="override an item's cap")
    p.add_argument("--inject", action="append", default=[], metavar="ITEM=fail|hang",
                   help="testing the report: make ITEM fail at its start, or hang past its cap")
    p.add_argument("--item", help=argparse.SUPPRESS)  # internal: run one item in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--calib", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.item:
        return run_child(a)
    try:
        caps = {k: float(v) for k, v in _parse_kv(a.cap, "--cap", p).items()}
    except ValueError:
        p.error(f"--cap takes ITEM=SECONDS, got {a.cap}")
    inject = _parse_kv(a.inject, "--inject", p)
    if any(v not in ("fail", "hang") for v in inject.values()):
        p.error(f"--inject takes ITEM=fail or ITEM=hang, got {a.inject}")
    only = None if a.only is None else [x for x in a.only.split(",") if x]
    if only is not None and (bad := [x for x in only if x not in {i.name for i in PLAN}]):
        p.error(f"--only: unknown item(s) {bad}; items: {', '.join(i.name for i in PLAN)}")
    budget = a.budget or (BUDGET_DRY_S if a.dry_run else BUDGET_GPU_S)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from bench_env import git_revision

    rep: dict[str, Any] = {"_t0": time.time(), "dry_run": a.dry_run, "device": "unknown (item env did not report)",
                           "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "budget_s": budget,
                           "ratio_band": list(RATIO_BAND), "git": git_revision(), "environment": None,
                           "calibration": {}, "items": []}  # fmt: skip
    calib: dict[str, float] = {}
    failed = False
    signal.signal(signal.SIGTERM, _interrupt)
    todo = [i for i in PLAN if only is None or i.name in only]
    with tempfile.TemporaryDirectory(prefix="first_light_") as tmp:
        for item in PLAN:
            left = budget - (time.time() - rep["_t0"])
            own = item.cap_dry if a.dry_run else item.cap_gpu
            reserve = sum(i.cap_dry if a.dry_run else i.cap_gpu for i in todo[todo.index(item) + 1:]) if (
                item in todo) else 0.0  # fmt: skip
            cap = min(left, caps[item.name]) if item.name in caps else min(left, max(own, left - reserve))
            if item not in todo:
                rep["items"].append(_skipped(item, "not in --only"))
            elif cap < 3:
                rep["items"].append(_skipped(item, f"the global budget of {budget:.0f} s is spent"))
            else:
                rep["items"].append({**_skipped(item, "in progress"), "status": "running"})
                write_report(out, rep)
                print(f"[first light] {item.name}: {item.title} (cap {cap:.0f} s)", flush=True)
                try:
                    rec = run_item(item, cap, a, calib, Path(tmp))
                except KeyboardInterrupt:  # SIGINT / SIGTERM: the item was killed; say so, keep what is written
                    rep["items"][-1].update(status="timeout", error="the whole run was interrupted during this item")
                    write_report(out, rep)
                    return 1
                rep["items"][-1] = rec
                failed |= rec["status"] in ("failed", "timeout")
                if item.name == "env":
                    calib = rep["calibration"] = rec["details"].get("calibration") or {}
                    rep["environment"] = rec["details"].get("environment")
                    rep["device"] = rec["details"].get("device", rep["device"])
                print(f"[first light] {item.name}: {rec['status']} in {rec['seconds']:.1f} s"
                      + (f" ({rec['error']})" if rec.get("error") else ""), flush=True)
            write_report(out, rep)
    name = report_name(rep["device"])
    print(f"[first light] wrote {out / 'first_light.md'} and first_light.json; commit them as "
          f"benchmarks/results/first_light/{name}.md and {name}.json", flush=True)
    return 1 if failed else 0


def report_name(device: str) -> str:
    """The file name a report is committed under: ``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``."""
    words = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-").split("-")
    return "-".join(w for w in words if w != "nvidia") or "unknown"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _skipped(item: Item, why: str) -> dict[str, Any]:
    return {"name": item.name, "title": item.title, "status": "skipped", "error": why, "rows": [], "details": {},
            "seconds": 0.0, "cap_s": 0.0}


if __name__ == "__main__":
    raise SystemExit(main())

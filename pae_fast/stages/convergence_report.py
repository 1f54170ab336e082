"""The results of a convergence run: ``convergence.json`` (every point, per seed), ``convergence.md`` (the
speed-up with its spread, predicted H100-hours) and ``convergence.png`` (metric against steps, log–log, one curve per
space with the seed range as a band). docs/method.md § Convergence.

Predicted step times come from the roofline's result file (``benchmarks/results/roofline.json``, written by
``benchmarks/roofline.py``), read as data: pae_fast never imports ``benchmarks``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pae_fast.errors import DataError
from pae_fast.io import atomic_write_text
from pae_fast.stages.convergence_math import gpu_hours, speedup_summary

__all__ = ["METRICS", "default_roofline", "read_roofline", "write_results", "convergence_markdown"]

METRICS = {"fd_vfm": "FD to the reference, VFM features", "fid": "FID (Inception)"}

_ASSUMPTION_KEYS = ("batch", "precision", "optimizer_h100", "optimizer_reference", "ema", "gemm_efficiency",
                    "hbm_efficiency", "attention")


def default_roofline() -> Path | None:
    """``benchmarks/results/roofline.json`` of this checkout, when present (absent from an installed package)."""
    p = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "roofline.json"
    return p if p.is_file() else None


def read_roofline(path: str | Path, model: str, hardware: str = "H100") -> dict[str, Any]:
    """Predicted step seconds of ``model`` on one ``hardware`` GPU at the roofline's batch, for pae_fast (the
    ``fused`` row) and the authors' code (the ``reference`` row), with the roofline's assumptions."""
    p = Path(path)
    if p.is_absolute() and p.is_relative_to(Path.cwd()):  # shown relative to where the command ran
        p = p.relative_to(Path.cwd())
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        m = data["models"][model]
        step = {"pae_fast": float(m["fused"]["predicted"][hardware]["step_s"]),
                "reference": float(m["reference"]["predicted"][hardware]["step_s"])}
        assumptions = {k: data["assumptions"][k] for k in _ASSUMPTION_KEYS if k in data["assumptions"]}
        batch = int(data["assumptions"]["batch"])
    except FileNotFoundError as e:
        raise DataError(f"roofline file {p} not found (benchmarks/roofline.py writes it)") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"roofline file {p}: no predicted {hardware} step time of {model!r} ({e!r})") from e
    return {"source": str(p), "model": model, "hardware": hardware, "batch": batch, "step_seconds": step,
            "assumptions": assumptions}


def _hours(speed: dict[str, Any], roof: dict[str, Any], global_batch: int) -> dict[str, Any]:
    """Predicted hours of each space's mean crossing steps, and the baseline-on-the-authors'-code over
    space-on-pae_fast ratio (the "fewer GPU-hours" number)."""
    st = roof["step_seconds"]
    base = speed["spaces"][speed["baseline"]]["steps_spread"]["mean"]
    rows = {}
    for name, sp in speed["spaces"].items():
        mean = sp["steps_spread"]["mean"]
        if mean is None:
            rows[name] = {"steps": None, "pae_fast": None, "reference": None, "baseline_reference_over_this": None}
            continue
        h = {k: gpu_hours(mean, st[k], global_batch, roof["batch"]) for k in ("pae_fast", "reference")}
        base_ref = gpu_hours(base, st["reference"], global_batch, roof["batch"]) if base is not None else None
        rows[name] = {"steps": mean, **h,
                      "baseline_reference_over_this": base_ref / h["pae_fast"] if base_ref is not None else None}
    return {**roof, "global_batch": global_batch, "spaces": rows}


def write_results(out: Path, cfg: Any, plan: Any, curves: dict[str, dict[int, dict[int, dict[str, float]]]],
                  runs: dict[str, dict[int, str]], reference_count: int, roofline: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Compute the speed-ups from ``curves`` (``{space: {seed: {step: {metric: value}}}}``) and write the files;
    ``roofline`` (:func:`read_roofline`) adds the predicted GPU-hours."""
    metrics = [k for k in METRICS if all(k in p for c in curves.values() for pts in c.values() for p in pts.values())]
    speed = {}
    for k in metrics:
        series = {sp: {seed: (sorted(pts), [pts[s][k] for s in sorted(pts)]) for seed, pts in c.items()}
                  for sp, c in curves.items()}
        speed[k] = speedup_summary(series, plan.baseline)
    result: dict[str, Any] = {
        "baseline": plan.baseline,
        "spaces": list(curves),
        "seeds": list(plan.seeds),
        "metrics": {k: METRICS[k] for k in metrics},
        "settings": {"generator": cfg.model.name, "depth": cfg.model.depth, "hidden_size": cfg.model.hidden_size,
                     "steps": cfg.train.steps, "global_batch_size": cfg.train.global_batch_size, "lr": cfg.train.lr,
                     "schedule": cfg.train.schedule, "ema_decay": cfg.train.ema_decay,
                     "per_class": plan.per_class, "sampler": cfg.sample.sampler, "sample_steps": plan.sample_steps,
                     "guidance": plan.guidance, "vfm": plan.vfm, "vfm_weights": plan.vfm_weights,
                     "reference_images": reference_count},
        "points": {sp: {str(seed): {str(s): v for s, v in pts.items()} for seed, pts in c.items()}
                   for sp, c in curves.items()},
        "speedup": {k: _json_keys(v) for k, v in speed.items()},
        "runs": {sp: {str(k): v for k, v in r.items()} for sp, r in runs.items()},
    }
    if roofline is not None:
        result["gpu_hours"] = {k: _hours(v, roofline, cfg.train.global_batch_size) for k, v in speed.items()}
    files = {"json": out / "convergence.json", "md": out / "convergence.md", "png": out / "convergence.png"}
    result["files"] = {k: str(v) for k, v in files.items()}
    _plot(curves, metrics, speed, files["png"])
    atomic_write_text(files["json"], json.dumps(result, indent=1) + "\n")
    atomic_write_text(files["md"], convergence_markdown(result))
    return result


def _json_keys(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_keys(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_keys(v) for v in x]
    return x


def _plot(curves: dict[str, dict[int, dict[int, dict[str, float]]]], metrics: list[str], speed: dict[str, Any],
          path: Path) -> Path:
    """Metric against steps on log–log axes: the seeds' mean per space, the seed range as a band, the baseline's
    final value (seed mean) dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(4.6 * len(metrics), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    for j, k in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), j + 1)
        for i, (sp, c) in enumerate(curves.items()):
            steps = sorted(next(iter(c.values())))
            vals = [[c[seed][s][k] for seed in c] for s in steps]
            mean = [math.exp(sum(math.log(v) for v in row) / len(row)) for row in vals]  # geometric: log axes
            ax.plot(steps, mean, marker="o", color=f"C{i}", label=f"{sp} ({len(c)} seeds)")
            if len(c) > 1:
                ax.fill_between(steps, [min(r) for r in vals], [max(r) for r in vals], color=f"C{i}", alpha=0.2)
        t = list(speed[k]["target"].values())
        ax.axhline(math.exp(sum(math.log(v) for v in t) / len(t)), color="grey", ls="--", lw=1,
                   label=f"{speed[k]['baseline']} final")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(steps, [str(s) for s in steps])  # the evaluated steps, no minor labels
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("generator training steps")
        ax.set_ylabel(METRICS[k])
        ax.set_title("lower is better; band: range over seeds", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def _f(x: Any, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _g(x: Any) -> str:
    return "—" if x is None else f"{x:.3g}"


def _pm(s: dict[str, Any], nd: int = 1) -> str:
    if not s["n"]:
        return "never reached"
    return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f} (range {s['min']:.{nd}f}–{s['max']:.{nd}f}, n={s['n']})"


def convergence_markdown(r: dict[str, Any]) -> str:
    """The summary: settings, every evaluated point, the speed-up per seed with mean ± std, predicted hours."""
    st, seeds = r["settings"], [str(s) for s in r["seeds"]]
    lines = [
        f"# Convergence: {', '.join(r['spaces'])} (baseline {r['baseline']})", "",
        f"One {st['generator']} (depth {st['depth']}, width {st['hidden_size']}) per latent space and seed, "
        f"{st['steps']} steps × batch {st['global_batch_size']}, lr {st['lr']} ({st['schedule']}), EMA "
        f"{st['ema_decay']}, seeds {', '.join(seeds)}; the same config for every space. Evaluated at log-spaced "
        f"steps on the EMA weights: {st['per_class']} samples per class, {st['sampler']} {st['sample_steps']} "
        f"steps, guidance {st['guidance']}, decoded by each space's tokenizer, against {st['reference_images']} "
        f"reference images; FD in the feature space of the VFM ({st['vfm']}, mean-pooled patch tokens).", "",
        "![convergence](convergence.png)", "",
    ]
    for k, label in r["metrics"].items():
        sp = r["speedup"][k]
        lines += [f"## {label}", "", "| step | " + " | ".join(f"{s} seed {d}" for s in r["spaces"] for d in seeds)
                  + " |", "|---" * (1 + len(r["spaces"]) * len(seeds)) + "|"]
        steps = sorted({int(s) for c in r["points"].values() for p in c.values() for s in p})
        for step in steps:
            cells = [_f(r["points"][s].get(d, {}).get(str(step), {}).get(k)) for s in r["spaces"] for d in seeds]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines += ["", f"**Steps to reach {r['baseline']}'s final value** (per seed: its value at the last step, "
                  f"{', '.join(f'seed {d}: {v:.2f}' for d, v in sp['target'].items())}), read off the log–log "
                  "curves by linear interpolation between the evaluated points around the first crossing; a space "
                  "that never reaches it is reported so, never extrapolated:", "",
                  "| space | steps per seed | steps, mean ± std | speed-up per seed | speed-up, mean ± std |",
                  "|---|---|---|---|---|"]
        for name, row in sp["spaces"].items():
            per = ", ".join("never" if v is None else f"{v:.0f}" for v in row["steps"].values())
            spd = ", ".join("—" if v is None else f"{v:.2f}×" for v in row["speedup"].values())
            lines.append(f"| {name} | {per} | {_pm(row['steps_spread'], 0)} | {spd} | "
                         f"{_pm(row['speedup_spread'], 2)} |")
        lines.append("")
        gh = r.get("gpu_hours", {}).get(k)
        if gh:
            a = gh["assumptions"]
            lines += [f"**Predicted {gh['hardware']}-hours** of those mean steps if each were a {gh['model']} step "
                      f"at global batch {gh['global_batch']} (roofline `{gh['source']}`: step time at batch "
                      f"{gh['batch']} — pae_fast {gh['step_seconds']['pae_fast']:.4f} s, the authors' code "
                      f"{gh['step_seconds']['reference']:.4f} s — scaled linearly with the batch; "
                      + ", ".join(f"{key} {val}" for key, val in a.items()) + "):", "",
                      "| space | steps (mean) | pae_fast (h) | authors' code (h) | baseline on the authors' code / "
                      "this space on pae_fast |", "|---|---|---|---|---|"]
            for name, row in gh["spaces"].items():
                ratio = row["baseline_reference_over_this"]
                lines.append(f"| {name} | {_f(row['steps'], 0)} | {_g(row['pae_fast'])} | "
                             f"{_g(row['reference'])} | {'—' if ratio is None else f'{ratio:.2f}×'} |")
            lines.append("")
    lines += ["Spread: sample standard deviation and range over the seeds that reached the target. Each seed's "
              "target is the baseline's final value with the same seed (docs/method.md § Convergence).", ""]
    return "\n".join(lines)

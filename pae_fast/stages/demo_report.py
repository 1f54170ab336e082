"""The demo's summary: ``summary.json``, ``summary.md``, per-class sample grids and training-curve plots.

Every number comes from the stage results of this run (:mod:`pae_fast.stages.demo`) — weights metadata, caches,
``stats.jsonl`` files and the measurements of :mod:`pae_fast.stages.demo_measure`; nothing is typed in.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from pae_fast.io import atomic_write_text

__all__ = ["SECTIONS", "write_summary", "class_grid", "machine_info", "grad_shares"]

# the sections of summary.json whose numbers must all be finite (tests/cli/test_demo.py checks each)
SECTIONS = ("vfm", "reconstruction", "diffusability", "generator", "image_fd", "convergence")


def machine_info() -> dict[str, Any]:
    """What the run ran on (named in the summary and the README)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "system": platform.system()}


def class_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int, path: Path) -> Path:
    """One row per class (label order), the first ``per_class`` images of each, as a PNG."""
    from pae_fast.io_images import save_image_grid

    rows = []
    for k in sorted(set(labels.tolist())):
        x = images[labels == k][:per_class]
        if len(x) < per_class:  # pad a short class with blanks so rows stay aligned
            x = torch.cat([x, torch.ones(per_class - len(x), *x.shape[1:])])
        rows.append(x)
    return save_image_grid(torch.cat(rows), path, nrow=per_class)


def _rows(stats: str) -> list[dict[str, Any]]:
    p = Path(stats)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def grad_shares(stats: str) -> dict[str, Any]:
    """The regularizers' gradient shares at the latent (``grad_share/<term>``, docs/method.md § Tokenizer training)
    of the last ``stats.jsonl`` record that has them: ``{"step": int, "shares": {term: value}}``, or ``{}``."""
    for r in reversed(_rows(stats)):
        shares = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("grad_share/") and isinstance(v, float)}
        if shares:
            return {"step": r["step"], "shares": shares}
    return {}


def _curve(stats: str) -> tuple[list[int], list[float]]:
    rows = [r for r in _rows(stats) if isinstance(r.get("loss"), (int, float)) and "step" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _plot_curves(stages: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=110)
    for m, color in (("pae", "C0"), ("rae", "C1")):
        for ax, kind in ((axes[0], "tokenizers"), (axes[1], "generators")):
            x, y = _curve(stages[kind][m]["stats"])
            if x:
                ax.plot(x, y, color=color, label=m.upper())
    axes[0].set_title("tokenizer training loss")
    axes[1].set_title("generator flow-matching loss")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_comparison(grids: dict[str, Path], path: Path) -> Path:
    """Held-out images | PAE samples | RAE samples side by side (the README's picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    keys = [("heldout", "held-out images"), ("pae", "PAE + LightningDiT"), ("rae", "RAE-style + LightningDiT")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=100)
    for ax, (k, title) in zip(axes, keys, strict=True):
        ax.imshow(mpimg.imread(grids[k]))
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(x: Any) -> bool:
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, float):
        return math.isfinite(x)
    return True


def run_relative(path: Any, out: Path) -> str:
    """``path`` relative to the run folder ``out`` when it lies inside it (summaries must not name the machine's
    folders), else as given (e.g. local weights the user passed)."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path(out).resolve()).as_posix()
    except ValueError:
        return str(path)


def write_summary(cfg: Any, demo: Any, stages: dict[str, Any], runner: Any, out: Path, fast: bool,
                  seconds: float) -> dict[str, Any]:
    """Measure the reconstructions, draw the grids and plots, and write ``summary.json`` / ``summary.md``."""
    from pae_fast.registry import create_tokenizer
    from pae_fast.stages.demo_measure import image_fd, load_npz_images, load_vfm, recon_psnr

    toks, gens, samples = stages["tokenizers"], stages["generators"], stages["samples"]
    per_class = min(8, cfg.sample.per_class or 8)
    grids: dict[str, Path] = {"heldout": class_grid(demo.heldout.images, demo.heldout.labels, per_class,
                                                    out / "grid_heldout.png")}
    recon: dict[str, Any] = {}
    for m in ("pae", "rae"):
        tok = create_tokenizer(toks[m]["name"], weights=toks[m]["weights"]).eval()
        value, recs = recon_psnr(tok, demo.heldout.images)
        recon[m.upper()] = {"psnr_heldout_db": value, "images": len(recs)}
        class_grid(recs, demo.heldout.labels, per_class, out / f"grid_recon_{m}.png")
        for name in ("trained", "untrained"):
            images, labels = load_npz_images(samples[m][f"npz_{name}"])
            key = m if name == "trained" else f"{m}_untrained"
            grids[key] = class_grid(images, labels, per_class, out / f"grid_{key}.png")
    vfm = load_vfm(stages["vfm"]["path"])
    reference_fd = image_fd(vfm, demo.train.images, demo.heldout.images)
    summary: dict[str, Any] = {
        "fast": fast,
        "seconds": seconds,
        "stage_seconds": {k: v["seconds"] for k, v in runner.records.items()},
        "stages_skipped": sorted(k for k, v in runner.records.items() if v["skipped"]),
        "machine": machine_info(),
        "data": {"source": "scikit-image photographs, one class per photograph", "classes": list(demo.classes),
                 "train_images": len(demo.train), "heldout_images": len(demo.heldout),
                 "image_size": int(demo.train.images.shape[-1])},
        "vfm": {k: run_relative(v, out) if k == "path" else v for k, v in stages["vfm"].items()
                if k not in ("skipped", "seconds")},
        "priors": {"file": run_relative(stages["priors"]["path"], out), "steps": stages["priors"]["steps"],
                   "batch_size": stages["priors"]["batch_size"]},
        "losses": {m.upper(): toks[m]["losses"] for m in ("pae", "rae")},
        "tokenizers": {m.upper(): {**{k: toks[m][k] for k in ("name", "steps", "batch_size", "priors", "latent_shape")},
                                   "weights": run_relative(toks[m]["weights"], out),
                                   "grad_shares": grad_shares(toks[m]["stats"])} for m in ("pae", "rae")},
        "reconstruction": recon,
        "diffusability": stages["diffusability"]["metrics"],
        "generator": {m.upper(): {"steps": gens[m]["steps"], "batch_size": gens[m]["batch_size"],
                                  "val_loss_trained": gens[m]["val_loss_trained"],
                                  "val_loss_untrained": gens[m]["val_loss_untrained"]} for m in ("pae", "rae")},
        "image_fd": {**{m.upper(): {"trained": samples[m]["fd_trained"], "untrained": samples[m]["fd_untrained"]}
                        for m in ("pae", "rae")}, "reference_train_vs_heldout": reference_fd},
        "convergence": convergence_section(stages["convergence"]),
        "files": {},
    }
    files = {"grid_" + k: v for k, v in grids.items()}
    files["comparison"] = _plot_comparison(grids, out / "comparison.png")
    files["curves"] = _plot_curves(stages, out / "training_curves.png")
    files["convergence"] = stages["convergence"]["files"]["png"]
    files.update({"diffusability_" + k: v for k, v in stages["diffusability"]["files"].items()})
    files = {k: run_relative(v, out) for k, v in files.items()}  # relative to the run folder
    summary["files"] = files
    bad = [s for s in SECTIONS if not _finite(summary[s])]
    if bad:
        raise FloatingPointError(f"non-finite numbers in the demo summary sections {bad}: {out / 'summary.json'}")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "summary.md", summary_markdown(summary, cfg))
    return summary


def convergence_section(conv: dict[str, Any]) -> dict[str, Any]:
    """The demo's convergence numbers (the convergence stage's result, :mod:`pae_fast.stages.convergence`): image FD
    per space, seed and evaluated step; per space the steps to reach the baseline's final FD and the speed-up, per
    seed and as mean / std / range."""
    sp = conv["speedup"]["fd_vfm"]
    out: dict[str, Any] = {"baseline": conv["baseline"], "seeds": conv["seeds"], "target_fd": sp["target"],
                           "image_fd": conv["points"], "spaces": {}}
    for name, row in sp["spaces"].items():
        out["spaces"][name] = {"steps": row["steps"], "speedup": row["speedup"], "steps_spread": row["steps_spread"],
                               "speedup_spread": row["speedup_spread"], "never_reached": row["never_reached"]}
    gh = conv.get("gpu_hours", {}).get("fd_vfm")
    if gh:
        out["gpu_hours"] = {"model": gh["model"], "hardware": gh["hardware"], "global_batch": gh["global_batch"],
                            "step_seconds": gh["step_seconds"], "source": gh["source"], "spaces": gh["spaces"]}
    return out


def _convergence_lines(c: dict[str, Any], steps: int, batch: int) -> list[str]:
    base, seeds = c["baseline"], ", ".join(str(s) for s in c["seeds"])
    lines = ["## Convergence", "",
             f"Image FD of each generator's EMA weights at log-spaced steps, seeds {seeds}, unguided "
             "(docs/method.md § Convergence; full table: `convergence/convergence.md`):", "",
             "![convergence](convergence/convergence.png)", "",
             f"| space | steps to reach {base}'s final image FD, per seed | speed-up per seed | speed-up, mean ± std "
             "(range) |", "|---|---|---|---|"]
    for name, row in c["spaces"].items():
        per = ", ".join("never" if v is None else f"{v:.0f}" for v in row["steps"].values())
        spd = ", ".join("—" if v is None else f"{v:.2f}×" for v in row["speedup"].values())
        s = row["speedup_spread"]
        agg = (f"{s['mean']:.2f}× ± {s['std']:.2f} ({s['min']:.2f}–{s['max']:.2f}, {s['n']} of {len(row['steps'])} "
               "seeds)" if s["n"] else "never reached")
        lines.append(f"| {name} | {per} | {spd} | {agg} |")
    lines += ["", f"Scale: tiny CPU models ({steps} steps of {batch} on a few thousand 64 px latents), two latent "
              "spaces of a VFM pre-trained in minutes: a check that the measurement works and of its direction, "
              "not the paper's setting (ImageNet 256, DiT-XL; the paper's Fig. 1 reports PAE at ≈ 55 epochs where "
              "RAE needs ≈ 720, \"up to 13×\"). The numbers move from one CPU to another; the seed spread above is "
              "the honest error bar."]
    gh = c.get("gpu_hours")
    if gh:
        rows = "; ".join(f"{n}: {r['pae_fast']:.3g} h on pae_fast, {r['reference']:.3g} h on the authors' code"
                         for n, r in gh["spaces"].items() if r["steps"] is not None)
        lines += ["", f"Predicted {gh['hardware']}-hours of those mean steps priced as {gh['model']} steps at global "
                  f"batch {gh['global_batch']} (roofline step times at batch 32: pae_fast "
                  f"{gh['step_seconds']['pae_fast']:.4f} s, authors' code {gh['step_seconds']['reference']:.4f} s, "
                  f"linear in the batch): {rows}."]
    return lines + [""]


def _f(x: Any, nd: int = 3) -> str:
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def summary_markdown(s: dict[str, Any], cfg: Any) -> str:
    """The human-readable summary (every number from ``s``)."""
    v, tk, g, fd, rc, df = s["vfm"], s["tokenizers"], s["generator"], s["image_fd"], s["reconstruction"], \
        s["diffusability"]
    if v["source"] == "mae":
        vfm_line = (f"ViT-tiny **pre-trained in this run as a masked autoencoder** on the training crops "
                    f"({v['steps']} steps of {v['batch_size']}): MAE loss {_f(v['initial_loss'])} → "
                    f"{_f(v['final_loss'])} (held-out {_f(v['heldout_loss'])}); linear probe on held-out crops "
                    f"{_f(v['probe_accuracy'])} (random init {_f(v['probe_accuracy_init'])}).")
    else:
        vfm_line = (f"local pretrained weights `{v['path']}` (given by tokenizer.vfm_weights); linear probe on "
                    f"held-out crops {_f(v['probe_accuracy'])}.")
    m = s["machine"]
    lines = [
        "# pae_fast demo: PAE vs an RAE-style baseline", "",
        f"{'`--fast` smoke run' if s['fast'] else 'Full run'} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} "
        f"torch threads), torch {m['torch']}: {s['seconds']:.0f} s"
        + (f" (stages reused from an earlier run: {', '.join(s['stages_skipped'])})" if s["stages_skipped"] else "")
        + ".", "",
        f"Data: {s['data']['train_images']} training / {s['data']['heldout_images']} held-out "
        f"{s['data']['image_size']}px crops of {len(s['data']['classes'])} scikit-image photographs "
        f"(one class each: {', '.join(s['data']['classes'])}); train and held-out crops share no pixel.", "",
        f"Frozen VFM: {vfm_line}", "",
        f"Refined priors: {s['priors']['steps']} steps of {s['priors']['batch_size']} (`{s['priors']['file']}`).", "",
        "## Comparison", "",
        "| | PAE | RAE-style baseline |", "|---|---|---|",
        f"| tokenizer | {tk['PAE']['name']}, latent {tk['PAE']['latent_shape']} | {tk['RAE']['name']}, latent "
        f"{tk['RAE']['latent_shape']} |",
        f"| tokenizer steps × batch | {tk['PAE']['steps']} × {tk['PAE']['batch_size']} | {tk['RAE']['steps']} × "
        f"{tk['RAE']['batch_size']} |",
        f"| reconstruction PSNR, held-out (dB) ↑ | {_f(rc['PAE']['psnr_heldout_db'], 2)} | "
        f"{_f(rc['RAE']['psnr_heldout_db'], 2)} |",
    ]
    from pae_fast.eval.report import METRIC_DOCS

    for k in ("viv", "lnc", "gsq", "sec", "lds", "cds", "erank"):
        arrow = {"lower": " ↓", "higher": " ↑"}.get(METRIC_DOCS[k][1], "")
        lines.append(f"| {k.upper()}{arrow} | {_f(df['PAE'].get(k))} | {_f(df['RAE'].get(k))} |")
    lines += [
        f"| generator steps × batch | {g['PAE']['steps']} × {g['PAE']['batch_size']} | {g['RAE']['steps']} × "
        f"{g['RAE']['batch_size']} |",
        f"| generator val. loss, held-out latents: trained (untrained) ↓ | {_f(g['PAE']['val_loss_trained'])} "
        f"({_f(g['PAE']['val_loss_untrained'])}) | {_f(g['RAE']['val_loss_trained'])} "
        f"({_f(g['RAE']['val_loss_untrained'])}) |",
        f"| image FD to held-out, VFM features: trained (untrained) ↓ | {_f(fd['PAE']['trained'], 2)} "
        f"({_f(fd['PAE']['untrained'], 2)}) | {_f(fd['RAE']['trained'], 2)} ({_f(fd['RAE']['untrained'], 2)}) |",
        "",
        f"Reference: FD of the training crops to the held-out crops = {_f(fd['reference_train_vs_heldout'], 2)}. "
        f"Samples: {cfg.sample.per_class} per class, {cfg.sample.sampler} {cfg.sample.steps} steps, guidance "
        f"{cfg.sample.guidance} (scale {cfg.sample.cfg_scale}); the untrained generator is the trained one's "
        "initialisation, sampled the same way. Validation losses of different latent spaces are not directly "
        "comparable (different dimensions); each is measured against its own untrained value.", "",
        *_convergence_lines(s["convergence"], g["PAE"]["steps"], g["PAE"]["batch_size"]),
        "## Losses and priors that ran", "",
        "| term | PAE | RAE-style baseline |", "|---|---|---|",
    ]
    terms = sorted(set(s["losses"]["PAE"]) | set(s["losses"]["RAE"]))
    for t in terms:
        lines.append(f"| {t} | {s['losses']['PAE'].get(t, '-')} | {s['losses']['RAE'].get(t, '-')} |")
    gs = tk["PAE"].get("grad_shares") or {}
    if gs:
        lines += ["", f"Effective strength of each prior (PAE, step {gs['step']}): the norm of its weighted gradient "
                  "at the latent over the reconstruction term's, ‖∂(λ·L)/∂z‖ / ‖∂L_rec/∂z‖: "
                  + ", ".join(f"{k.upper()} {v:.3g}" for k, v in gs["shares"].items()) + "."]
    lines += ["", f"PAE priors: {tk['PAE']['priors']}; the baseline trains with no prior regularizer.", "",
              "LPIPS and the GAN discriminator need pretrained VGG / DINO features: they run only when local weights "
              "are given (tokenizer.lpips_weights, tokenizer.disc_weights); otherwise they are off, as stated above.",
              "", "## Files", ""]
    lines += ["Paths are relative to the run folder.", ""] + [f"- {k}: `{p}`" for k, p in s["files"].items()]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["stage_seconds"].items())]
    return "\n".join(lines) + "\n"

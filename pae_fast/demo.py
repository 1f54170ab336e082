"""The end-to-end demo behind ``make demo``: the latent half of the pipeline on an embedded default, on CPU.

Stages run for real, through the same library functions as their subcommands:

1. data       a class-conditional latent set with a known distribution (:mod:`pae_fast.data.synthetic`), written as a
              latent cache (stage 2's format) with a held-out split;
2. generator  a small LightningDiT trained with flow matching by the shared engine (``train-dit``);
3. sampling   Euler ODE with classifier-free guidance, and without guidance (``sample``);
4. evaluation per-class Fréchet distance of the samples to held-out true latents (against the untrained model's,
              which outputs pure noise: its adaLN-Zero init predicts v = 0), and the diffusability report (VIV, SEC,
              LDS/CDS, ...) of data, samples and noise side by side (``diffusability``).

Writes ``<out_dir>/demo_report.md`` (+ ``demo_results.json``, the loss curve, sample grids and the diffusability plots).
The tokenizer stages (0-1) join when the PAE tokenizer lands; until then the "images" of this demo are latents.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from pae_fast.config import Config, dump_yaml
from pae_fast.io import atomic_write_text

__all__ = ["run_demo", "classwise_frechet"]

log = logging.getLogger("pae_fast.demo")


def classwise_frechet(
    samples: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor
) -> float:
    """Mean over classes of the Fréchet distance between flattened sample and reference latents of that class."""
    from pae_fast.eval.fid import frechet_distance

    out = []
    for k in torch.unique(ref_labels).tolist():
        a = samples[labels == k].flatten(1).double()
        b = ref[ref_labels == k].flatten(1).double()
        if a.shape[0] < 2 or b.shape[0] < 2:
            raise ValueError(f"class {k}: need >= 2 samples and >= 2 reference latents, got {a.shape[0]}, {b.shape[0]}")
        out.append(frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)))
    return float(sum(out) / len(out))


def _plot_loss(stats_path: Path, out_png: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in stats_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss (MSE + 1 - cos)")
    ax.set_title("generator training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def run_demo(cfg: Config, heldout_per_class: int = 256) -> dict[str, Any]:
    """Run the demo pipeline described in the module docstring; returns the results dict (also written as JSON)."""
    from pae_fast.data.latent_cache import write_latent_cache
    from pae_fast.data.latent_stats import compute_latent_stats
    from pae_fast.data.synthetic import SyntheticLatentSpec, synthetic_latents
    from pae_fast.eval.report import load_latents, run_diffusability
    from pae_fast.stages.sample import sample
    from pae_fast.stages.train_generator import train_generator

    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    spec = SyntheticLatentSpec(d.num_classes, d.latent_channels, d.latent_size, seed=cfg.seed)

    # stage 2 format: a latent cache for training and a held-out split for evaluation
    per_class = max(2, d.synthetic_size // d.num_classes)
    z_train, y_train = synthetic_latents(spec, per_class, seed=cfg.seed + 1)
    z_test, y_test = synthetic_latents(spec, heldout_per_class, seed=cfg.seed + 2)
    cache = write_latent_cache(
        out / "latents", z_train, y_train, latents_flip=z_train, num_classes=d.num_classes,
        metadata={"source": "pae_fast.data.synthetic", "seed": cfg.seed},
    )  # fmt: skip
    log.info("stage 2: latent cache of %d latents %s at %s", len(y_train), tuple(z_train.shape[1:]), cache)

    # stage 3: generator training with the shared engine
    run_dir = out / "generator"
    train_cfg = dataclasses.replace(
        cfg, out_dir=str(run_dir), data=dataclasses.replace(cfg.data, source="latent_cache", root=str(cache))
    )
    train_generator(train_cfg)

    # stage 4: sampling, guided and unguided, class-balanced
    results: dict[str, Any] = {"config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}
    sample_sets = {}
    for name, scale in (("cfg", cfg.sample.cfg_scale), ("no_guidance", 1.0)):
        sc = dataclasses.replace(
            cfg.sample, checkpoint=str(run_dir), per_class=cfg.sample.per_class or 64,
            output_dir=str(out / f"samples_{name}"), guidance="cfg" if scale != 1.0 else "none", cfg_scale=scale,
        )  # fmt: skip
        sample(dataclasses.replace(train_cfg, sample=sc))
        sample_sets[name] = load_latents(out / f"samples_{name}" / "latents.safetensors")

    # stage 5: evaluation against the known distribution
    # what the untrained generator samples: its zero-initialised output layer predicts v = 0, so samples stay noise
    g = torch.Generator().manual_seed(cfg.seed + 3)
    noise = compute_latent_stats(z_train).denormalize(torch.randn(z_test.shape, generator=g))
    fd = {"untrained (noise)": classwise_frechet(noise, y_test, z_test, y_test)}
    for name, (zs, ys) in sample_sets.items():
        fd[f"samples ({name})"] = classwise_frechet(zs, ys, z_test, y_test)
    fd["held-out data vs itself (split halves)"] = classwise_frechet(
        z_test[: len(y_test) // 2], y_test[: len(y_test) // 2], z_test[len(y_test) // 2 :], y_test[len(y_test) // 2 :]
    )
    results["classwise_frechet"] = fd
    diff = run_diffusability(
        {"data": (z_test, y_test), **{f"samples_{k}": v for k, v in sample_sets.items()}, "noise": (noise, y_test)},
        out / "diffusability",
        cfg.eval,
    )
    results["diffusability"] = diff["results"]
    loss_png = _plot_loss(run_dir / "stats.jsonl", out / "loss_curve.png")
    results["seconds"] = time.perf_counter() - t0
    atomic_write_text(out / "demo_results.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(out / "demo_report.md", _report(results, out, run_dir, loss_png, diff["files"]))
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    return results


def _report(results: dict, out: Path, run_dir: Path, loss_png: Path | None, files: dict) -> str:
    fd = results["classwise_frechet"]
    lines = [
        "# pae_fast demo",
        "",
        "A small LightningDiT trained by flow matching on a class-conditional latent set with a known distribution,",
        "sampled with and without classifier-free guidance, and evaluated against held-out true latents.",
        "",
        "## Per-class Fréchet distance to held-out latents (lower is better)",
        "",
        "| set | FD |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in fd.items()],
        "",
        "## Diffusability (see diffusability/report.md for the plots)",
        "",
        "| set | VIV | SEC | LDS | LNC |",
        "|---|---|---|---|---|",
    ]
    for name, m in results["diffusability"].items():
        lines.append(f"| {name} | {m.get('viv', float('nan')):.3f} | {m.get('sec', float('nan')):.3f} | "
                     f"{m.get('lds', float('nan')):.3f} | {m.get('lnc', float('nan')):.3f} |")
    lines += ["", "## Files", ""]
    lines.append(f"- generator run (checkpoints, log.txt, stats.jsonl): `{run_dir}`")
    if loss_png:
        lines.append(f"- loss curve: `{loss_png}`")
    for name in ("cfg", "no_guidance"):
        lines.append(f"- samples ({name}): `{out / f'samples_{name}'}`")
    for kind, p in files.items():
        lines.append(f"- diffusability {kind}: `{p}`")
    lines += ["", f"Total time: {results['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"

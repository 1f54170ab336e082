"""Diffusability report: metrics of one or more latent sets side by side, as JSON, markdown and PNG plots.

    from pae_fast.eval.report import run_diffusability
    run_diffusability({"PAE": "caches/pae", "RAE": "caches/rae"}, "runs/diffusability")

writes ``diffusability.json``, ``report.md`` and three plots: the VIV time profile, the DCT energy spectrum over
Manhattan frequency, and the mean token cosine over grid distance.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pae_fast.eval.diagnostics import erank, ssc
from pae_fast.eval.diffusability import (
    cds_from_profile,
    check_latents,
    cosine_distance_profile,
    dct_energy_spectrum,
    gsq,
    lds_from_profile,
    lnc,
    sec_from_energy,
    standardize,
    viv_spectra,
)
from pae_fast.eval.fid import resolve_device
from pae_fast.io import atomic_path, atomic_write_text

__all__ = ["load_latents", "diffusability_metrics", "run_diffusability", "write_report", "json_safe", "METRIC_DOCS"]

# Scalar metrics in table order, with what they measure and which direction is better for diffusion.
METRIC_DOCS = {
    "viv": ("velocity irreducible variance: Bayes floor of the flow-matching loss (<= pi/2)", "lower"),
    "lnc": ("fraction of k nearest neighbours (cosine, pooled) with the same class", "higher"),
    "gsq": ("1-NN class purity of pooled, centred, normalised latents", "higher"),
    "sec": ("fraction of DCT energy above Manhattan frequency rho (H-1 + W-1)", "lower"),
    "lds": ("token cosine at grid distance 1 minus at distance >= 6", "higher"),
    "cds": ("minus the slope of token cosine over grid distance 1..8", "higher"),
    "erank": ("normalised effective rank of the token matrix", "context"),
    "ssc": ("NMI of spectral token clusters vs segmentation", "higher"),
}


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw latents ``(N, C, H, W)`` float32 and labels ``(N,)`` from a latent cache folder or a ``.safetensors``
    file with ``latents`` and ``labels`` tensors (e.g. the sampler's ``latents.safetensors``)."""
    p = Path(path)
    if p.is_dir():
        from pae_fast.data.latent_cache import LatentCache

        return LatentCache(p, normalize=False, hflip=False).load_all()
    if not p.is_file():
        raise FileNotFoundError(f"{p} is neither a latent cache folder nor a latents .safetensors file")
    from pae_fast.io import load_safetensors

    tensors, _ = load_safetensors(p)
    missing = [k for k in ("latents", "labels") if k not in tensors]
    if missing:
        raise KeyError(
            f"{p} lacks {missing} (has {sorted(tensors)}); expected 'latents' (N, C, H, W) and 'labels' (N,)"
        )
    latents, labels = tensors["latents"].float(), tensors["labels"].long()
    if latents.dim() != 4 or labels.shape != (latents.shape[0],):
        raise ValueError(
            f"{p}: latents {tuple(latents.shape)} / labels {tuple(labels.shape)} are not (N, C, H, W) / (N,)"
        )
    return latents, labels


def diffusability_metrics(
    latents: torch.Tensor,
    labels: torch.Tensor,
    viv_iters: int = 5,
    max_per_class: int | None = None,
    lnc_k: int = 10,
    sec_rho: float = 0.5,
    segments: torch.Tensor | None = None,
    ssc_sigma: float = 0.1,
    profile_ts: int = 101,
    device: str | torch.device = "cpu",
    check_stop: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Every latent-only metric on per-channel standardised latents, plus the curves the report plots.

    Args:
        latents: ``(N, C, H, W)`` raw latents.
        labels: ``(N,)``.
        max_per_class: cap per class for VIV (the paper uses 50 latents per class).
        segments: ``(N, H, W)`` segment ids; adds SSC.
        profile_ts: points of the VIV time profile on [0, 1].
        device: where the metrics run (a GPU speeds up VIV and the k-NN metrics; results return to the CPU).
        check_stop: called before each metric; it raises to stop (the command's SIGTERM / SIGINT check).
    Returns:
        scalars ``viv, lnc, sec, lds, cds, gsq, erank, [ssc]``, ``num_latents, num_classes, shape``, and curves
        ``viv_profile {t, value}``, ``dct_spectrum {frequency, energy}`` (fraction of energy per Manhattan
        frequency, channel-averaged), ``cosine_profile {distance, cosine}``.
    """
    check_latents(latents, labels)
    stop = check_stop if check_stop is not None else (lambda: None)
    z = standardize(latents.to(device))
    n, c, h, w = z.shape
    stop()
    spectra = viv_spectra(z, labels, iters=viv_iters, max_per_class=max_per_class, standardized=True)
    ts = np.linspace(0, 1, profile_ts)
    stop()
    energy, _ = dct_energy_spectrum(z)
    frac = (energy / energy.sum(1, keepdims=True).clip(1e-300)).mean(0)
    stop()
    d, cos = cosine_distance_profile(z)
    stop()
    knn = lnc(z, labels, k=min(lnc_k, n - 1))
    stop()
    purity = gsq(z, labels)
    stop()
    out: dict[str, Any] = {
        "viv": spectra.viv(),
        "lnc": knn,
        "sec": sec_from_energy(energy, h, w, rho=sec_rho),
        "lds": lds_from_profile(d, cos, h, w) if d[-1] >= 6 else float("nan"),
        "cds": cds_from_profile(d, cos),
        "gsq": purity,
        "erank": erank(z),
        "num_latents": n,
        "num_classes": int(spectra.classes.numel()),
        "shape": [c, h, w],
        "viv_profile": {"t": ts.tolist(), "value": spectra.profile(ts).tolist()},
        "dct_spectrum": {"frequency": np.arange(len(frac)).tolist(), "energy": frac.tolist()},
        "cosine_profile": {"distance": d.tolist(), "cosine": cos.tolist()},
    }
    if segments is not None:
        stop()
        out["ssc"] = ssc(z, segments, sigma=ssc_sigma)
    return out


def run_diffusability(
    inputs: dict[str, str | os.PathLike | tuple[torch.Tensor, torch.Tensor]],
    out_dir: str | os.PathLike,
    cfg: Any = None,
    segments: torch.Tensor | None = None,
    check_stop: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Compute the diffusability suite for each input and write the report.

    Args:
        inputs: name -> latent cache folder, latents ``.safetensors``, or ``(latents, labels)``.
        out_dir: report folder.
        cfg: an :class:`~pae_fast.config.EvalConfig` (``viv_iters``, ``max_per_class``, ``lnc_k``, ``sec_rho``,
            ``ssc_sigma``, ``device``); defaults (on the CPU) when None.
        segments: ``(N, H, W)`` segment ids for SSC, applied to inputs with N latents.
        check_stop: called before each input is loaded and between its metrics; it raises to stop (the command's
            SIGTERM / SIGINT check). The report is written only after the last input, so a stop writes nothing.
    Returns:
        ``{"results": {name: metrics}, "files": {kind: path}}``.
    """
    if not inputs:
        raise ValueError("run_diffusability: no inputs")
    opts = {
        "viv_iters": getattr(cfg, "viv_iters", 5),
        "max_per_class": getattr(cfg, "max_per_class", None),
        "lnc_k": getattr(cfg, "lnc_k", 10),
        "sec_rho": getattr(cfg, "sec_rho", 0.5),
        "ssc_sigma": getattr(cfg, "ssc_sigma", 0.1),
    }
    device = resolve_device(getattr(cfg, "device", "cpu"))
    from pae_fast.progress import progress

    results = {}
    for name, src in progress(inputs.items(), "diffusability", total=len(inputs), every=1, unit="input"):
        if check_stop is not None:
            check_stop()
        latents, labels = src if isinstance(src, tuple) else load_latents(src)
        seg = segments if segments is not None and segments.shape[0] == latents.shape[0] else None
        results[name] = diffusability_metrics(latents, labels, segments=seg, device=device, check_stop=check_stop,
                                              **opts)
        if not isinstance(src, tuple):
            results[name]["source"] = str(src)
        del latents, labels
    files = write_report(results, out_dir, settings=opts)
    return {"results": results, "files": files}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return "-" if v is None else str(v)


def json_safe(v: Any) -> Any:
    """NaN/inf -> None (strict JSON), recursively."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


# PNG name -> (result key, x key, y key, x label, y label, title, log y)
_PLOTS = {
    "viv_profile": ("viv_profile", "t", "value", "t (0 = noise, 1 = data)", "irreducible velocity variance",
                    "VIV time profile (area = VIV)", False),
    "dct_spectrum": ("dct_spectrum", "frequency", "energy", "Manhattan frequency u + v", "fraction of DCT energy",
                     "DCT energy spectrum (dashed: the SEC cut)", True),
    "cosine_distance": ("cosine_profile", "distance", "cosine", "Manhattan grid distance", "mean token cosine",
                        "Token similarity vs distance", False),
}  # fmt: skip


def _plot(results: dict[str, dict], path: Path, spec: tuple, vline: float | None = None) -> Path:
    """One line per input; written atomically as PNG (matplotlib's object API: no pyplot, no global backend)."""
    from matplotlib.figure import Figure

    key, x, y, xlabel, ylabel, title, logy = spec
    fig = Figure(figsize=(5.5, 3.8), dpi=120)
    ax = fig.subplots()
    for name, r in results.items():
        ax.plot(r[key][x], r[key][y], marker="o" if len(r[key][x]) <= 40 else None, ms=3, label=name)
    if vline is not None:
        ax.axvline(vline, color="grey", ls="--", lw=1)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_report(results: dict[str, dict], out_dir: str | os.PathLike, settings: dict | None = None) -> dict[str, Path]:
    """Write ``diffusability.json``, ``report.md`` and the PNG plots for metrics from :func:`diffusability_metrics`,
    one entry per input.

    Returns:
        ``{"json", "markdown", "viv_profile", "dct_spectrum", "cosine_distance"}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(results)
    _, h, w = results[names[0]]["shape"]
    sec_cut = (settings or {}).get("sec_rho", 0.5) * (h - 1 + w - 1)
    files: dict[str, Path] = {
        stem: _plot(results, out / f"{stem}.png", spec, vline=sec_cut if stem == "dct_spectrum" else None)
        for stem, spec in _PLOTS.items()
    }
    files["json"] = out / "diffusability.json"
    doc = json_safe({"settings": settings or {}, "inputs": results})
    atomic_write_text(files["json"], json.dumps(doc, indent=1, allow_nan=False))

    lines = ["# Latent diffusability report", ""]
    lines.append("| metric | " + " | ".join(names) + " | better | meaning |")
    lines.append("|---|" + "---|" * len(names) + "---|---|")
    for key, (meaning, better) in METRIC_DOCS.items():
        if any(key in results[n] for n in names):
            values = " | ".join(_fmt(results[n].get(key)) for n in names)
            lines.append(f"| {key} | {values} | {better} | {meaning} |")
    for key in ("num_latents", "num_classes", "shape"):
        lines.append(f"| {key} | " + " | ".join(_fmt(results[n][key]) for n in names) + " | | |")
    if settings:
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + "."]
    lines += [
        "",
        "Latents are standardised per channel over (N, H, W) before every metric (the space the generator sees).",
        "",
        "![VIV time profile](viv_profile.png)",
        "",
        "![DCT energy spectrum](dct_spectrum.png)",
        "",
        "![Token cosine vs grid distance](cosine_distance.png)",
        "",
    ]
    files["markdown"] = out / "report.md"
    atomic_write_text(files["markdown"], "\n".join(lines))
    return files

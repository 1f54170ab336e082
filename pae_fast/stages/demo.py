"""``python -m pae_fast demo``: the whole PAE pipeline against an RAE-style baseline on real images, on a CPU.

Stages (docs/method.md § Demo), each through the library function of its own subcommand, each in its own folder
under ``out_dir`` with a ``stage.json`` recording its config hash (a re-run skips finished stages; a changed setting
reruns that stage and every stage after it; :mod:`pae_fast.stages.demo_stages`):

1. ``images``          crops of eight scikit-image photographs, one class per photograph, train / held-out split
                       (pixel-disjoint), written as ImageFolder trees (:mod:`pae_fast.data.demo_images`);
2. ``vfm``             the frozen VFM: ``tokenizer.vfm_weights`` when given, else a ViT-tiny pre-trained in the run
                       as a masked autoencoder on the training crops (``pretrain-vfm``);
3. ``priors``          refined priors on that VFM (``refine-priors``);
4. ``tokenizer_pae``   the PAE tokenizer with the refined priors (``train-tokenizer``), and
   ``tokenizer_rae``   the RAE-style baseline on the same VFM: no priors, the same decoder, the same steps;
5. ``latents_pae/rae`` latent caches of both splits (``cache-latents`` on the ImageFolder trees);
6. ``diffusability``   VIV, LNC, SEC, LDS/CDS, GSQ, eRank of both latent spaces, with plots (``diffusability``);
7. ``convergence``     a tiny LightningDiT per latent space and seed (``demo.convergence_seeds`` seeds from
                       ``seed``), the same steps (``train-dit``), each evaluated at log-spaced steps by the unguided
                       image FD of its samples (``convergence``: docs/method.md § Convergence): the plot and the
                       speed-up with its spread over the seeds;
   ``generator_pae/rae`` the run of ``seed`` of each space, its untrained initialisation saved beside it,
                       validation loss of both on held-out latents;
8. ``samples_pae/rae`` class-balanced samples of the trained and the untrained generator, decoded by the tokenizer
                       (``sample``), and their Fréchet distance to the held-out images in the VFM's feature space;
9. the summary: ``summary.md`` / ``summary.json``, per-class grids, plots (:mod:`pae_fast.stages.demo_report`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from pae_fast.config import Config, ConfigError, config_to_dict
from pae_fast.stages.demo_stages import StagePlan, StageRunner

__all__ = ["run_demo", "stage_costs", "MODELS"]

log = logging.getLogger("pae_fast.demo")

MODELS = ("pae", "rae")


def _sections(cfg: Config, *names: str) -> dict[str, Any]:
    d = config_to_dict(cfg)
    return {n: d[n] for n in names}


def stage_costs(cfg: Config) -> dict[str, float]:
    """Estimated single-thread CPU seconds per stage (measured per-step costs of the tiny models here, scaled by the
    settings); they only set the ETA before a stage has been timed."""
    d, t, s = cfg.demo, cfg.train, cfg.sample
    n_img = 8 * (d.train_per_class + d.heldout_per_class)
    width = (cfg.model.hidden_size or 96) / 96
    gen_step = 0.13 * t.global_batch_size / 32 * width**2 * (cfg.model.depth or 3) / 3
    n_samples = 8 * (s.per_class or 8)
    conv_evals = d.convergence_seeds * 2 * d.convergence_points
    conv_eval = 0.004 * 8 * d.convergence_per_class * d.convergence_sample_steps + 0.5
    sample_cost = 0.004 * n_samples * s.steps * (2 if s.sampler == "heun" else 1) * (2 if s.guidance == "cfg" else 1)
    tok_step = d.tokenizer_batch_size / 16
    return {
        "images": 0.01 * n_img,
        "vfm": 0.0 if cfg.tokenizer.vfm_weights else 0.3 * d.mae_steps * d.mae_batch_size / 64,
        "priors": 0.05 * d.refine_steps * d.refine_batch_size / 32,
        "tokenizer_pae": 0.3 * d.tokenizer_steps * tok_step,
        "tokenizer_rae": 0.12 * d.tokenizer_steps * tok_step,
        "latents_pae": 0.01 * n_img,
        "latents_rae": 0.01 * n_img,
        "diffusability": 10.0,
        "convergence": d.convergence_seeds * 2 * gen_step * t.steps + conv_evals * conv_eval,
        "generator_pae": 2.0,
        "generator_rae": 2.0,
        "samples_pae": 2 * sample_cost,
        "samples_rae": 2 * sample_cost,
    }


# ----------------------------------------------------------------------------------------------------------------
# stage configs: the demo's one Config specialised per stage
# ----------------------------------------------------------------------------------------------------------------


def _tokenizer_train(cfg: Config, steps: int, batch: int) -> Any:
    """The engine settings of the tokenizer stages: the demo's steps / batch / lr, the generator's other settings."""
    return dataclasses.replace(cfg.train, steps=steps, global_batch_size=batch, lr=cfg.demo.tokenizer_lr,
                               warmup_steps=min(cfg.train.warmup_steps, steps // 10), ckpt_every=steps,
                               log_every=max(1, min(cfg.train.log_every, steps // 5)), resume="auto")


def tokenizer_config(cfg: Config, model: str, out: Path, vfm: str, priors: str | None) -> Config:
    """The ``train-tokenizer`` config of ``model`` (``"pae"``: ``tokenizer`` as given, refined priors;
    ``"rae"``: ``demo.baseline`` with every prior regularizer off, same decoder, same steps)."""
    t = dataclasses.replace(cfg.tokenizer, vfm_weights=vfm, checkpoint=None,
                            heldout_items=8 * cfg.demo.heldout_per_class)
    if model == "pae":
        t = dataclasses.replace(t, priors="refined", priors_file=priors)
    else:
        t = dataclasses.replace(t, name=cfg.demo.baseline, ssr=False, mcr=False, scr=False, priors_file=None)
    train = _tokenizer_train(cfg, cfg.demo.tokenizer_steps, cfg.demo.tokenizer_batch_size)
    return dataclasses.replace(cfg, out_dir=str(out), tokenizer=t, train=train)


def _image_data(cfg: Config, root: str) -> Any:
    return dataclasses.replace(cfg.data, source="folder", root=root, file_list=None, num_classes=8, loader="pil",
                               num_workers=0, hflip=False, drop_last=False, batch_size=64)


# ----------------------------------------------------------------------------------------------------------------
# the stages
# ----------------------------------------------------------------------------------------------------------------


def _stage_images(cfg: Config, demo: Any, folder: Path) -> dict[str, Any]:
    from pae_fast.data.demo_images import write_demo_image_folders

    roots = write_demo_image_folders(demo, folder)
    return {"train": str(roots["train"]), "heldout": str(roots["heldout"]), "classes": list(demo.classes),
            "train_images": len(demo.train), "heldout_images": len(demo.heldout),
            "fingerprint": demo.train.fingerprint()[:16]}


def _stage_vfm(cfg: Config, demo: Any, folder: Path) -> dict[str, Any]:
    if cfg.tokenizer.vfm_weights:
        from pae_fast.stages.demo_measure import load_vfm, vfm_features
        from pae_fast.stages.pretrain_vfm import probe_accuracy

        vfm = load_vfm(cfg.tokenizer.vfm_weights)  # fails here, naming the file, if it is not a ViT-tiny encoder
        acc = probe_accuracy(vfm_features(vfm, demo.train.images), demo.train.labels,
                             vfm_features(vfm, demo.heldout.images), demo.heldout.labels)
        return {"source": "local", "path": str(cfg.tokenizer.vfm_weights), "probe_accuracy": acc}
    from pae_fast.stages.pretrain_vfm import MAEConfig, pretrain_vfm

    mae = MAEConfig(steps=cfg.demo.mae_steps, batch_size=cfg.demo.mae_batch_size, seed=cfg.seed)
    r = pretrain_vfm(folder / "vit_tiny_mae.safetensors", mae, demo.train.images, demo.train.labels,
                     demo.heldout.images, demo.heldout.labels, log_every=max(1, mae.steps // 10),
                     progress=None if cfg.train.progress else False)
    return {"source": "mae", "path": str(r.path), "steps": r.steps, "batch_size": mae.batch_size,
            "initial_loss": r.initial_loss, "final_loss": r.final_loss, "heldout_loss": r.heldout_loss,
            "probe_accuracy": r.probe_accuracy, "probe_accuracy_init": r.probe_accuracy_init}


def _stage_priors(cfg: Config, demo: Any, vfm: str, folder: Path) -> dict[str, Any]:
    from pae_fast.data.demo_images import DemoImageDataset
    from pae_fast.stages.refine_priors import refine_priors

    t = dataclasses.replace(cfg.tokenizer, vfm_weights=vfm, checkpoint=None)
    train = _tokenizer_train(cfg, cfg.demo.refine_steps, cfg.demo.refine_batch_size)
    rcfg = dataclasses.replace(cfg, out_dir=str(folder), tokenizer=t, train=train)
    path = refine_priors(rcfg, DemoImageDataset(demo.train, hflip=True))
    return {"path": str(path), "steps": cfg.demo.refine_steps, "batch_size": cfg.demo.refine_batch_size,
            "stats": str(folder / "stats.jsonl")}


def _stage_tokenizer(cfg: Config, demo: Any, model: str, vfm: str, priors: str | None, folder: Path
                     ) -> dict[str, Any]:
    import json

    from pae_fast.data.demo_images import DemoImageDataset
    from pae_fast.stages.train_tokenizer import train_tokenizer
    from pae_fast.weights import read_metadata

    tcfg = tokenizer_config(cfg, model, folder, vfm, priors)
    run = train_tokenizer(tcfg, DemoImageDataset(demo.train, hflip=True), DemoImageDataset(demo.heldout))
    # the weights the caches encode with and the samples decode with: tokenizer.encode_weights (demo_cpu: ema)
    weights, meta = read_metadata(run, cfg.tokenizer.encode_weights == "ema", "tokenizer weights")
    return {"run": str(run), "weights": str(weights), "name": tcfg.tokenizer.name, "steps": tcfg.train.steps,
            "batch_size": tcfg.train.global_batch_size, "losses": json.loads(meta.get("losses", "{}")),
            "priors": meta.get("priors", ""), "latent_shape": json.loads(meta["latent_shape"]),
            "stats": str(run / "stats.jsonl")}


def _stage_latents(cfg: Config, tok: dict[str, Any], images: dict[str, Any], folder: Path) -> dict[str, Any]:
    from pae_fast.stages.cache_latents import run_cache_latents

    out = {}
    for split in ("train", "heldout"):
        c = dataclasses.replace(cfg, data=_image_data(cfg, images[split]))
        out[split] = str(run_cache_latents(c, tok["name"], tok["weights"], folder / split, shard_size=4096,
                                           stats_items=None))
    return out


def _stage_convergence(cfg: Config, caches: dict[str, dict[str, str]], toks: dict[str, dict[str, Any]], vfm: str,
                       heldout: torch.Tensor, folder: Path) -> dict[str, Any]:
    from pae_fast.stages.convergence import ConvergencePlan, LatentSpace, run_convergence
    from pae_fast.stages.convergence_report import default_roofline

    d = cfg.demo
    roofline = default_roofline()
    seeds = tuple(cfg.seed + k for k in range(d.convergence_seeds))
    plan = ConvergencePlan(baseline="RAE", vfm_weights=vfm, seeds=seeds, points=d.convergence_points,
                           per_class=d.convergence_per_class, sample_steps=d.convergence_sample_steps,
                           roofline=str(roofline) if roofline else None)
    spaces = [LatentSpace(m.upper(), caches[m]["train"], toks[m]["weights"], toks[m]["name"]) for m in MODELS]
    model = dataclasses.replace(cfg.model, num_classes=8)
    r = run_convergence(dataclasses.replace(cfg, model=model), spaces, plan, heldout, folder)
    keep = ("baseline", "seeds", "settings", "points", "speedup", "gpu_hours", "runs", "files")
    return {k: r[k] for k in keep if k in r}


def _stage_generator(cfg: Config, cache: dict[str, str], tok: dict[str, Any], run: str | Path, folder: Path
                     ) -> dict[str, Any]:
    """The measurements of the trained run ``run`` (the convergence stage's run of ``seed``) and of its
    initialisation."""
    from pae_fast.data.latent_cache import LatentCache
    from pae_fast.stages.convergence import generator_config
    from pae_fast.stages.demo_measure import save_untrained_generator, validation_loss
    from pae_fast.stages.sample import load_generator

    run = Path(run)
    gcfg = generator_config(cfg, run, cache["train"], tok["latent_shape"], tok["name"], 8)
    untrained = save_untrained_generator(gcfg, folder / "untrained.safetensors")
    train_stats = LatentCache(cache["train"], normalize=False, hflip=False).stats
    z, y = LatentCache(cache["heldout"], normalize=False, hflip=False).load_all()
    z = train_stats.normalize(z)
    out: dict[str, Any] = {"run": str(run), "untrained": str(untrained), "steps": gcfg.train.steps,
                           "batch_size": gcfg.train.global_batch_size, "stats": str(run / "stats.jsonl")}
    for name, path in (("trained", run), ("untrained", untrained)):
        model, meta = load_generator(path, True, "cpu", fallback=gcfg.model, flow_cfg=gcfg.flow)
        shift = float(meta.get("train_shift", gcfg.flow.shift))
        out[f"val_loss_{name}"] = validation_loss(model, z, y, gcfg.flow, shift, cfg.demo.val_draws, cfg.seed)
    return out


def _stage_samples(cfg: Config, gen: dict[str, Any], tok: dict[str, Any], vfm: str, heldout: torch.Tensor,
                   folder: Path) -> dict[str, Any]:
    from pae_fast.stages.demo_measure import image_fd, load_npz_images, load_vfm
    from pae_fast.stages.sample import sample

    feats_vfm = load_vfm(vfm)
    out: dict[str, Any] = {}
    for name in ("trained", "untrained"):
        sc = dataclasses.replace(cfg.sample, checkpoint=gen[name if name == "untrained" else "run"],
                                 tokenizer_checkpoint=tok["weights"], output_dir=str(folder / name),
                                 save_npz=True, per_class=cfg.sample.per_class or 8)
        scfg = dataclasses.replace(cfg, out_dir=str(folder), sample=sc,
                                   tokenizer=dataclasses.replace(cfg.tokenizer, name=tok["name"]),
                                   data=dataclasses.replace(cfg.data, image_size=int(heldout.shape[-1])))
        sample(scfg)
        images, _ = load_npz_images(folder / name / "samples.npz")
        out[f"fd_{name}"] = image_fd(feats_vfm, images, heldout)
        out[f"npz_{name}"] = str(folder / name / "samples.npz")
    return out


# ----------------------------------------------------------------------------------------------------------------
# the whole demo
# ----------------------------------------------------------------------------------------------------------------


def run_demo(cfg: Config, fast: bool = False) -> dict[str, Any]:
    """Run (or resume) the demo described in the module docstring into ``cfg.out_dir``.

    Args:
        cfg: the demo config (``configs/demo_cpu.yaml``; ``demo`` holds the tokenizer-side sizes).
        fast: recorded in the summary (the CLI's ``--fast`` applies ``configs/demo_fast.yaml`` to ``cfg``).
    Returns:
        the summary dict (also written to ``<out_dir>/summary.json``).
    """
    from pae_fast.data.demo_images import build_demo_images
    from pae_fast.stages.demo_report import write_summary

    if cfg.tokenizer.name != "PAE-tiny" and not cfg.tokenizer.vfm_weights:
        raise ConfigError(f"tokenizer.name={cfg.tokenizer.name!r}: the demo pre-trains a ViT-tiny VFM, which only "
                          "PAE-tiny uses; give tokenizer.vfm_weights for another encoder")
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.demo
    demo = build_demo_images(d.train_per_class, d.heldout_per_class, seed=cfg.seed,
                             image_size=cfg.data.image_size)
    runner = StageRunner(out, StagePlan(stage_costs(cfg)))
    images = runner.run("images", {"demo": [d.train_per_class, d.heldout_per_class], "seed": cfg.seed,
                                   "size": cfg.data.image_size},
                        lambda f: _stage_images(cfg, demo, f))
    vfm = runner.run("vfm", {"weights": cfg.tokenizer.vfm_weights, "mae": [d.mae_steps, d.mae_batch_size]},
                     lambda f: _stage_vfm(cfg, demo, f), upstream=("images",))
    # the tokenizer stages read train's engine settings, not the generator's steps / batch / lr / intervals
    engine = {k: v for k, v in config_to_dict(cfg.train).items()
              if k not in ("steps", "global_batch_size", "lr", "ckpt_every", "log_every")}
    tok_settings = {**_sections(cfg, "tokenizer", "refine"), "engine": engine, "demo": config_to_dict(d)}
    priors = runner.run("priors", tok_settings, lambda f: _stage_priors(cfg, demo, vfm["path"], f),
                        upstream=("vfm",))
    toks = {
        "pae": runner.run("tokenizer_pae", tok_settings,
                          lambda f: _stage_tokenizer(cfg, demo, "pae", vfm["path"], priors["path"], f),
                          upstream=("priors",)),
        "rae": runner.run("tokenizer_rae", tok_settings,
                          lambda f: _stage_tokenizer(cfg, demo, "rae", vfm["path"], None, f), upstream=("vfm",)),
    }
    caches = {m: runner.run(f"latents_{m}", _sections(cfg, "data"),
                            lambda f, m=m: _stage_latents(cfg, toks[m], images, f), upstream=(f"tokenizer_{m}",))
              for m in MODELS}
    diff = runner.run("diffusability", _sections(cfg, "eval"), lambda f: _diffusability(cfg, caches, f),
                      upstream=tuple(f"latents_{m}" for m in MODELS))
    gen_settings = _sections(cfg, "model", "flow", "train", "seed")
    sample = config_to_dict(cfg.sample)  # what the evaluations read of it (steps, per_class, guidance: demo.*)
    conv_settings = {**gen_settings,
                     "sample": {k: sample[k] for k in ("sampler", "shift", "t_start", "t_end", "sde_noise_scale",
                                                       "batch_size", "precision")},
                     "convergence": [d.convergence_seeds, d.convergence_points, d.convergence_per_class,
                                     d.convergence_sample_steps]}
    conv = runner.run("convergence", conv_settings,
                      lambda f: _stage_convergence(cfg, caches, toks, vfm["path"], demo.heldout.images, f),
                      upstream=(*(f"latents_{m}" for m in MODELS), "vfm", "images"))
    gens = {m: runner.run(f"generator_{m}", {**gen_settings, "val_draws": d.val_draws},
                          lambda f, m=m: _stage_generator(cfg, caches[m], toks[m],
                                                          conv["runs"][m.upper()][str(cfg.seed)], f),
                          upstream=("convergence",))
            for m in MODELS}
    samples = {m: runner.run(f"samples_{m}", _sections(cfg, "sample", "tokenizer"),
                             lambda f, m=m: _stage_samples(cfg, gens[m], toks[m], vfm["path"], demo.heldout.images,
                                                           f),
                             upstream=(f"generator_{m}", "vfm"))
               for m in MODELS}
    stages = dict(images=images, vfm=vfm, priors=priors, tokenizers=toks, caches=caches, diffusability=diff,
                  convergence=conv, generators=gens, samples=samples)
    return write_summary(cfg, demo, stages, runner, out, fast=fast, seconds=time.perf_counter() - t0)


def _diffusability(cfg: Config, caches: dict[str, dict[str, str]], folder: Path) -> dict[str, Any]:
    from pae_fast.eval.report import json_safe, run_diffusability

    rep = run_diffusability({m.upper(): caches[m]["train"] for m in MODELS}, folder, cfg.eval)
    keep = ("viv", "lnc", "gsq", "sec", "lds", "cds", "erank")
    return {"metrics": {name: {k: json_safe(r[k]) for k in keep if k in r} for name, r in rep["results"].items()},
            "files": {k: str(v) for k, v in rep["files"].items()}}

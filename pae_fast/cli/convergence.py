"""Convergence of generators on two or more latent spaces: metric against steps, speed-up, predicted GPU-hours.

    python -m pae_fast convergence --config PRESET --out_dir runs/conv \\
        --space PAE runs/demo/latents_pae/train runs/demo/tokenizer_pae \\
        --space RAE runs/demo/latents_rae/train runs/demo/tokenizer_rae --baseline RAE \\
        --reference runs/demo/images/heldout --vfm-weights runs/demo/vfm/vit_tiny_mae.safetensors --seeds 0 1

Each --space is NAME SOURCE TOKENIZER_WEIGHTS (a weights file or a run folder): SOURCE a latent cache (its
metadata names the tokenizer), or with --data.latents online an image folder (then also --space-tokenizer NAME
REGISTERED_TOKENIZER). One generator per
space and seed is trained with the config's model / flow / train settings (train-dit's library function) and its
EMA weights are evaluated at log-spaced steps: FD of decoded samples to --reference (image folder or ADM npz) in
the VFM's feature space, and FID with --inception-weights. Writes <out_dir>/convergence.{json,md,png} and the runs
under <out_dir>/runs/. Predicted H100-hours use --roofline (default benchmarks/results/roofline.json when present).

Exit codes: 0 done, 2 config (e.g. fewer than two spaces, an unknown baseline), 3 a missing cache, image folder,
tokenizer / VFM weights or roofline file (the line names it), 4 stopped by a signal, 5 non-finite losses, 6 a run
folder in use. The work is pae_fast.stages.convergence.run_convergence.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pae_fast.cli.common import add_config_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--space", nargs=3, action="append", default=[], metavar=("NAME", "SOURCE", "TOKENIZER_WEIGHTS"),
                   help="a latent space (two or more)")
    p.add_argument("--space-tokenizer", nargs=2, action="append", default=[], metavar=("NAME", "TOKENIZER"),
                   help="the registered tokenizer of a space (default: the cache's metadata)")
    p.add_argument("--baseline", help="the space whose final value is the target (default: the last --space)")
    p.add_argument("--reference", required=True, help="reference images: an image folder or an ADM npz (arr_0)")
    p.add_argument("--vfm-weights", help="VFM weights for the FD feature space (default: tokenizer.vfm_weights)")
    p.add_argument("--vfm", default="ViT-tiny", help="the registered VFM encoder (default ViT-tiny)")
    p.add_argument("--inception-weights", help="FID Inception weights (default: eval.inception_weights; none: no FID)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds (default 0 1)")
    p.add_argument("--eval-steps", nargs="+", type=int, default=[], help="evaluation steps (default: log-spaced)")
    p.add_argument("--points", type=int, default=6, help="log-spaced evaluation steps: the last, halved (default 6)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class per evaluation (default 8)")
    p.add_argument("--sample-steps", type=int, default=10, help="sampler steps per evaluation (default 10)")
    p.add_argument("--guidance", default="none", choices=["none", "cfg"], help="guidance of the evaluations")
    p.add_argument("--roofline", help="roofline results for predicted H100-hours (default: this checkout's "
                   "benchmarks/results/roofline.json when present; 'none': no hours)")
    p.add_argument("--roofline-model", default="LightningDiT-XL/1", help="the roofline model pricing a step")


def main(args: argparse.Namespace, extra: list[str]) -> int:
    import logging

    from pae_fast.cli.common import resolve_config
    from pae_fast.errors import ConfigError, raise_if_preempted

    cfg = resolve_config(args, extra)
    if cfg is None:
        return 0
    from pae_fast.stages.convergence import ConvergencePlan, LatentSpace, run_convergence

    tok = dict(args.space_tokenizer)
    spaces = [LatentSpace(n, s, w, tok.get(n)) for n, s, w in args.space]
    unknown = sorted(set(tok) - {s.name for s in spaces})
    if unknown:
        raise ConfigError(f"--space-tokenizer names spaces that no --space gives: {unknown}")
    vfm = args.vfm_weights or cfg.tokenizer.vfm_weights
    if not vfm:
        raise ConfigError("convergence needs the VFM's weights for its FD feature space: pass --vfm-weights FILE")
    from pae_fast.stages.convergence_report import default_roofline

    roofline = args.roofline or (str(default_roofline()) if default_roofline() else None)
    inception = args.inception_weights or cfg.eval.inception_weights
    plan = ConvergencePlan(
        baseline=args.baseline or (spaces[-1].name if spaces else ""), vfm_weights=vfm, vfm=args.vfm,
        seeds=tuple(args.seeds), eval_steps=tuple(args.eval_steps), points=args.points, per_class=args.per_class,
        sample_steps=args.sample_steps, guidance=args.guidance,
        inception_weights=None if inception in (None, "none") else inception,
        roofline=None if roofline == "none" else roofline, roofline_model=args.roofline_model)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    r = run_convergence(cfg, spaces, plan, args.reference)
    raise_if_preempted()
    if not r:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    print(Path(r["files"]["md"]).read_text(encoding="utf-8"))
    print(f"convergence: {r['files']['md']}")
    return 0

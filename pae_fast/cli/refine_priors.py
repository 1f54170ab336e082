"""Stage 0: train the refined priors (projector P_t: D -> the tokenizer's latent width and a ViT reconstructor Q_t)
on the frozen VFM tokens of the images in data (docs/method.md § Refined priors).

Examples:
    python -m pae_fast refine-priors --config tokenizer_tiny_cpu --out_dir runs/priors
    python -m pae_fast refine-priors --config pae_tokenizer_dinov2l_d32 --data.root IMAGENET/train \\
        --tokenizer.vfm_weights dinov2_vitl14_reg.safetensors --out_dir runs/priors

Exit codes: 0 done, 2 config, 3 data / weights, 4 stopped by SIGTERM/SIGINT after a checkpoint (rerun to resume),
5 non-finite losses, 6 the folder is in use (see README "When things go wrong").

Writes <out_dir>/priors.safetensors (the projector that initialises the tokenizer's and gives the SSR / SCR targets,
with the targets' recipe in its metadata: upsampler, low-pass strength, grid), the engine's checkpoints, logs and
stats.jsonl. Pass it to train-tokenizer as --tokenizer.priors_file. The work is
pae_fast.stages.refine_priors.refine_priors(cfg).
"""

from __future__ import annotations

import argparse

from pae_fast.cli.common import add_config_arguments, run_training_stage


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def main(args: argparse.Namespace, extra: list[str]) -> int:
    return run_training_stage(args, extra, "refine_priors:refine_priors", "refined priors")

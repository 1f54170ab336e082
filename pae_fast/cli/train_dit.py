"""Train a LightningDiT / DiT^DH generator with flow matching on a latent cache (data.root).

Without data.root and with data.source=synthetic (the tiny preset) it trains on an in-memory synthetic class-Gaussian
latent set (data.latent_channels, data.latent_size, data.num_classes, data.synthetic_size).

Examples:
    python -m pae_fast train-dit --config tiny_cpu --out_dir runs/dit
    python -m pae_fast train-dit --config tiny_cpu --data.root runs/latents --out_dir runs/dit
    torchrun --nproc_per_node=8 -m pae_fast train-dit --config configs/<preset>.yaml --data.root CACHE
    python -m pae_fast train-dit --config tiny_cpu --flow.dimension_shift true --dry-run

Exit codes: 0 done, 2 config, 3 data, 4 stopped by SIGTERM/SIGINT after a checkpoint (rerun to resume),
5 non-finite losses, 6 the folder is in use (see README "When things go wrong").

Writes <out_dir>/config.yaml, <out_dir>/run_identity.json (what the run was started with; a resume with other
data or model settings is refused), and the engine's checkpoints, logs and stats under <out_dir>; every weights
file carries the latent statistics that sampling needs to de-normalise. The work is
pae_fast.stages.train_generator.train_generator(cfg).
"""

from __future__ import annotations

import argparse

from pae_fast.cli.common import add_config_arguments, run_training_stage


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def main(args: argparse.Namespace, extra: list[str]) -> int:
    return run_training_stage(args, extra, "train_generator:train_generator", "generator run")

"""Sample a trained generator: ODE/SDE with CFG-interval or AutoGuidance, decoded images or latents.

Examples:
    python -m pae_fast sample --config tiny_cpu --sample.checkpoint runs/dit
    python -m pae_fast sample --config configs/<preset>.yaml --sample.checkpoint runs/dit/checkpoints/0100000 \
        --sample.tokenizer_checkpoint runs/tok --sample.per_class 50 --sample.steps 250 --sample.cfg_scale 2.5

--sample.checkpoint takes a run folder (its newest valid checkpoint), a checkpoint folder or a weights file.
With --sample.tokenizer_checkpoint (and tokenizer.name) the latents are decoded into grid.png, images/*.png and an
ADM-format samples.npz; otherwise latents.safetensors and latent_grid.png are written. Output folder:
sample.output_dir, default <out_dir>/samples. The work is pae_fast.stages.sample.sample(cfg).
"""

from __future__ import annotations

import argparse

from pae_fast.cli.common import add_config_arguments, resolve_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def main(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = resolve_config(args, extra)
    if cfg is None:
        return 0
    import logging

    from pae_fast.stages.sample import sample

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    paths = sample(cfg)  # errors (a damaged checkpoint: exit 3) become one line in pae_fast.cli.main
    for path in paths:
        print(path)
    return 0

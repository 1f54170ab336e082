"""Train a PAE or RAE tokenizer (L1 / LPIPS / GAN, SSR / MCR / SCR, RAE noise augmentation) on images.

Examples:
    python -m pae_fast train-tokenizer --config tokenizer_tiny_cpu --out_dir runs/tok
    python -m pae_fast refine-priors --config tokenizer_tiny_cpu --out_dir runs/priors
    python -m pae_fast train-tokenizer --config tokenizer_tiny_cpu --tokenizer.priors refined \\
        --tokenizer.priors_file runs/priors/priors.safetensors --out_dir runs/tok_refined
    torchrun --nproc_per_node=8 -m pae_fast train-tokenizer --config pae_tokenizer_dinov2l_d32 \\
        --data.root IMAGENET/train --tokenizer.vfm_weights dinov2_vitl14_reg.safetensors \\
        --tokenizer.priors_file runs/priors/priors.safetensors --tokenizer.lpips_weights vgg.pth \\
        --tokenizer.lpips_backbone_weights vgg16.pth --tokenizer.disc_weights dino_vits8.pth

Exit codes: 0 done, 2 config, 3 data / weights (e.g. LPIPS or discriminator weights missing), 4 stopped by
SIGTERM/SIGINT after a checkpoint (rerun to resume), 5 non-finite losses, 6 the folder is in use (see README
"When things go wrong").

Writes <out_dir>/config.yaml, run_identity.json, the engine's checkpoints (model / ema / disc .safetensors: the
tokenizer's full state dict, loadable by create_tokenizer(name, weights=<out_dir>)), stats.jsonl (one key per loss
term, disc/* for the discriminator), eval.jsonl (held-out PSNR / SSIM / LPIPS / rFID per checkpoint) and
grids/step_*.png (inputs above reconstructions). The work is pae_fast.stages.train_tokenizer.train_tokenizer(cfg).
"""

from __future__ import annotations

import argparse

from pae_fast.cli.common import add_config_arguments, run_training_stage


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def main(args: argparse.Namespace, extra: list[str]) -> int:
    return run_training_stage(args, extra, "train_tokenizer:train_tokenizer", "tokenizer run")

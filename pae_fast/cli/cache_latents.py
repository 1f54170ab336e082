"""Encode an image data set with a frozen tokenizer into a sharded latent cache (resumable, one shard set per rank).

Examples:
    python -m pae_fast cache-latents --tokenizer PAE-DINOv2-L-d32 --weights runs/pae/tokenizer.safetensors \\
        --data.root /data/imagenet/train --out runs/latents
    torchrun --nproc_per_node=8 -m pae_fast cache-latents --tokenizer NAME --weights W --data.root DIR --out CACHE
    python -m pae_fast cache-latents --tokenizer PAE-tiny --random-init --data.root DIR --data.image_size 64 \
        --out runs/latents_check   # pipeline check with a random tokenizer (never silently: the flag is required)

Writes shard-*.safetensors (latents, latents_flip, labels), stats.safetensors, class_mapping.json, cache.json and,
last, index.json into --out. Re-running resumes from the finished shards; a folder written by another tokenizer or
other weights is refused. data.image_size must be the tokenizer's resolution. The folder is locked while written.

Exit codes: 0 done, 2 usage/config (unknown tokenizer, no --weights without --random-init), 3 data (image folder,
weights file, a folder holding another cache), 6 the folder is in use.
"""

from __future__ import annotations

import argparse

from pae_fast.cli.common import add_config_arguments, resolve_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--tokenizer", required=True, help="registered tokenizer name (python -m pae_fast info)")
    p.add_argument("--weights", help="the tokenizer's weights: safetensors / .pt file or folder")
    p.add_argument("--random-init", action="store_true",
                   help="allow a random tokenizer when no --weights is given (seeded by the config seed; pipeline "
                        "checks only)")
    p.add_argument("--out", required=True, help="the cache folder")
    p.add_argument("--shard-size", type=int, default=4096, help="items per shard file")
    p.add_argument("--stats-items", type=int, default=10_000,
                   help="latents the statistics are computed from (0: all)")


def main(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = resolve_config(args, extra)
    if cfg is None:  # --dry-run printed the config
        return 0
    from pae_fast.stages.cache_latents import run_cache_latents

    out = run_cache_latents(cfg, args.tokenizer, args.weights, args.out, shard_size=args.shard_size,
                            stats_items=args.stats_items or None, random_init=args.random_init)
    print(f"latent cache: {out}")
    return 0

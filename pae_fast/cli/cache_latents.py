"""Encode an image data set with a frozen tokenizer into a sharded latent cache (resumable, one shard set per rank).

Examples:
    python -m pae_fast cache-latents --tokenizer PAE-DINOv2-L-d32 --weights runs/pae/tokenizer.safetensors \\
        --data.root /data/imagenet/train --out runs/latents
    torchrun --nproc_per_node=8 -m pae_fast cache-latents --tokenizer NAME --weights W --data.root DIR --out CACHE
    python -m pae_fast cache-latents --tokenizer PAE-tiny --random-init --data.root DIR --data.image_size 64 \
        --out runs/latents_check   # pipeline check with a random tokenizer (never silently: the flag is required)

Writes shard-*.safetensors (latents, latents_flip, labels), stats.safetensors, class_mapping.json, cache.json and,
last, index.json into --out. Re-running resumes from the finished shards; a folder written by another tokenizer or
other weights, or a folder holding other files, is refused. data.image_size must be the tokenizer's resolution;
data.batch_size defaults to 64 images per process; without --config or --data.num_classes the classes are the
folder's (any number). The folder is locked while written.
A progress line per shard is logged (a bar on a terminal).

Exit codes: 0 done, 2 usage/config (unknown tokenizer, no --weights without --random-init), 3 data (image folder,
weights file, a folder holding another cache or other files, an unwritable --out), 4 stopped by SIGTERM/SIGINT
(the finished shards are kept: rerun the same command to resume), 6 the folder is in use.
"""

from __future__ import annotations

import argparse

from pae_fast.cli.common import add_config_arguments, resolve_config

DEFAULT_BATCH_SIZE = 64  # images per process and encoder call when data.batch_size is unset


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
    import dataclasses
    import logging
    from pathlib import Path

    cfg = resolve_config(args, extra)
    if cfg is None:  # --dry-run printed the config
        return 0
    from pae_fast.cli.common import check_output_dir, stop_on_signal
    from pae_fast.errors import OutputError
    from pae_fast.stages.cache_latents import CACHE_FILE, run_cache_latents

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    out = check_output_dir(args.out)
    others = sorted(p.name for p in out.iterdir() if p.name != ".lock") if out.is_dir() else []
    if others and not (out / CACHE_FILE).is_file():
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise OutputError(f"--out {str(out)!r} holds other files ({shown}) and no {CACHE_FILE}: not a cache to "
                          "resume; choose an empty or new folder")
    if cfg.data.batch_size is None:  # the presets' training layout leaves it unset
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=DEFAULT_BATCH_SIZE))
    if not args.config and not any(a.split("=")[0] == "--data.num_classes" for a in extra):
        # no class count asked for: the cache takes the folder's classes (train-dit checks them against the model)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_classes=None))
    with stop_on_signal("cache-latents", "the finished shards are kept; run the same command again to resume") \
            as check_stop:
        out = run_cache_latents(cfg, args.tokenizer, args.weights, Path(args.out), shard_size=args.shard_size,
                                stats_items=args.stats_items or None, random_init=args.random_init,
                                check_stop=check_stop)
    print(f"latent cache: {out}")
    return 0

"""Pre-train the demo's frozen VFM (timm ViT-tiny, 64 px) as a masked autoencoder on the demo images, on CPU.

    python -m pae_fast pretrain-vfm [--out runs/vfm/vit_tiny_mae.safetensors] [--steps 300] [--batch-size 64]

Writes the encoder's weights (timm key names) as safetensors with metadata (steps, losses, linear-probe accuracy
of the features before and after training); load them with encoder "ViT-tiny". A file already trained with the
same configuration is reused unless --no-reuse; any other existing --out is refused unless --overwrite (exit code
3, before training), as are a folder or an unwritable place. See pae_fast/stages/pretrain_vfm.py for the recipe.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pae_fast.cli.common import no_extra

_DEFAULT_OUT = "runs/vfm/vit_tiny_mae.safetensors"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pae_fast.stages.pretrain_vfm import MAEConfig

    d = MAEConfig()
    p.add_argument("--out", default=_DEFAULT_OUT, help=f"weights file to write (default {_DEFAULT_OUT})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default {d.lr})")
    p.add_argument("--mask-ratio", type=float, default=d.mask_ratio, help=f"masked patches (default {d.mask_ratio})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the demo images, the init and the masks")
    p.add_argument("--images-per-class", type=int, default=256,
                   help="training crops per class of the demo images; held-out: a quarter of it (default 256)")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines without a terminal")
    p.add_argument("--no-reuse", action="store_true", help="train even if --out holds this configuration's weights")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file that is not reused (default: refuse it, exit code 3)")


def main(args: argparse.Namespace, extra: list[str]) -> int:
    import logging

    no_extra(extra, "pretrain-vfm")
    from pae_fast.io import check_output_file

    if not Path(args.out).is_file():  # an existing file is checked by the stage (reused, or refused / replaced)
        check_output_file(args.out, args.overwrite)  # a folder or an unwritable place: refused before anything runs
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    from pae_fast.stages.pretrain_vfm import MAEConfig, pretrain_vfm

    cfg = MAEConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, mask_ratio=args.mask_ratio,
                    seed=args.seed)
    from pae_fast.config import ConfigError

    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"pretrain-vfm: {e}") from e
    if args.images_per_class < 4:
        raise ConfigError(f"pretrain-vfm: --images-per-class={args.images_per_class}; expected >= 4")
    from pae_fast.data.demo_images import build_demo_images

    demo = build_demo_images(train_per_class=args.images_per_class, heldout_per_class=args.images_per_class // 4,
                             seed=args.seed)
    from pae_fast.cli.common import stop_on_signal

    with stop_on_signal("pretrain-vfm", f"{args.out} was not written; run the same command again") as check_stop:
        r = pretrain_vfm(args.out, cfg, demo.train.images, demo.train.labels, demo.heldout.images,
                         demo.heldout.labels, log_every=args.log_every, reuse=not args.no_reuse,
                         overwrite=args.overwrite, check_stop=check_stop)
    state = "reused" if r.skipped else f"trained in {r.seconds:.0f} s"
    print(f"VFM weights {r.path} ({state}): {r.steps} steps, MAE loss {r.initial_loss:.4f} -> {r.final_loss:.4f} "
          f"(held-out {r.heldout_loss:.4f}); linear probe on held-out crops {r.probe_accuracy:.3f} "
          f"(random init {r.probe_accuracy_init:.3f})")
    return 0

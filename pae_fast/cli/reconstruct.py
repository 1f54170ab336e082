"""Reconstruct images with a tokenizer: input | reconstruction PNGs and PSNR / SSIM per image.

Examples:
    python -m pae_fast reconstruct --tokenizer PAE-DINOv2-L-d32 --weights pae_dinov2l_d32.pt a.jpg b.png --out recon/
    python -m pae_fast reconstruct --tokenizer PAE-tiny --weights runs/tok --vfm-weights vit_tiny_mae.safetensors \
        photos/*.png --out recon/
    python -m pae_fast reconstruct --tokenizer PAE-tiny --random-init a.png --out recon/   # pipeline check only

--weights takes a pae_fast tokenizer file / checkpoint folder / run folder, or the PAE authors' released checkpoint
(converted by name). Without --weights, --random-init must be given: the tokenizer is then random (never silently).
Inputs of the same file name from different folders get distinct outputs (eval.reconstruct.output_names); outputs
already in --out are refused unless --overwrite. SIGTERM / SIGINT stop it before the next batch: the pairs written so
far stay, grid.png and metrics.json are not written; the same command with --overwrite redoes the job. Exit codes:
0 done, 2 usage, 3 an image / weights file / the output folder, 4 stopped by a signal (see README "When things go
wrong").
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (centre-cropped, resized to the tokenizer)")
    p.add_argument("--tokenizer", required=True, metavar="NAME", help="a registered tokenizer (see `info`)")
    p.add_argument("--weights", metavar="PATH", help="tokenizer weights (pae_fast or the authors' PAE checkpoint)")
    p.add_argument("--vfm-weights", metavar="PATH", help="the encoder's own timm-layout weights file")
    p.add_argument("--random-init", action="store_true", help="allow random weights (no --weights); for testing")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in --out (default: refuse)")


def main(args: argparse.Namespace, extra: list[str]) -> int:
    from pae_fast.cli.common import no_extra, stop_on_signal

    no_extra(extra, "reconstruct")
    if args.weights is None and not args.random_init:
        print("error: reconstruct: no --weights given; pass --random-init to run with a random tokenizer "
              "(only meaningful as a pipeline check)", file=sys.stderr)
        return 2
    import logging

    from pae_fast.config import ConfigError
    from pae_fast.eval.reconstruct import output_names, reconstruct_files
    from pae_fast.io import check_output_dir
    from pae_fast.registry import create_tokenizer

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size}: expected >= 1")
    check_output_dir(args.out)  # a file or an unwritable place: refused before the tokenizer is built
    output_names(args.images)  # the same file twice: refused now
    resume = (f"the *_recon.png pairs written so far stay in {args.out} (grid.png and metrics.json were not written); "
              "run the same command with --overwrite to finish")
    with stop_on_signal("reconstruct", resume) as check_stop:
        try:  # a weights problem (missing, damaged, pickled, wrong layout, NaN/Inf) is a WeightsError: exit code 3
            tok = create_tokenizer(args.tokenizer, pretrained=args.weights is not None, weights=args.weights,
                                   vfm_weights=args.vfm_weights)
        except KeyError as e:
            raise ConfigError(f"--tokenizer: {e.args[0]}") from None
        metrics = reconstruct_files(tok, args.images, args.out, batch_size=args.batch_size, device=args.device,
                                    overwrite=args.overwrite, check_stop=check_stop)
    for row in metrics["images"]:
        print(f"{row['file']}\tPSNR {row['psnr']:.2f} dB\tSSIM {row['ssim']:.4f}")
    print(f"mean\tPSNR {metrics['mean_psnr']:.2f} dB\tSSIM {metrics['mean_ssim']:.4f}\t-> {args.out}")
    return 0

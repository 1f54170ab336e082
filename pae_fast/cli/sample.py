"""Sample a trained generator: ODE/SDE with CFG-interval or AutoGuidance, decoded images or latents.

Examples:
    python -m pae_fast sample --config tiny_cpu --sample.checkpoint runs/dit
    python -m pae_fast sample --config configs/<preset>.yaml --sample.checkpoint runs/dit/checkpoints/0100000 \
        --sample.tokenizer_checkpoint runs/tok --sample.per_class 50 --sample.steps 250 --sample.cfg_scale 2.5

--sample.checkpoint takes a run folder (its newest valid checkpoint), a checkpoint folder or a weights file.
With --sample.tokenizer_checkpoint (and tokenizer.name) the latents are decoded into grid.png, images/*.png and an
ADM-format samples.npz; otherwise latents.safetensors and latent_grid.png are written. The decoder must be the
tokenizer whose latents the generator learned (recorded in its checkpoint; --allow-tokenizer-mismatch for an
experiment). Output folder: --out (or sample.output_dir), default beside the checkpoint sampled
(<run>/samples/<step>); finished samples there are refused unless --overwrite. The work is
pae_fast.stages.sample.sample(cfg).

Exit codes: 0 done, 2 config, 3 a missing / damaged checkpoint or tokenizer, a decoder that is not the generator's
tokenizer, an output folder that holds samples or cannot be written, 4 stopped by SIGTERM/SIGINT (nothing
finished is lost: rerun the same command), 5 NaN/Inf samples, 6 the output folder is in use.
"""

from __future__ import annotations

import argparse

from pae_fast.cli.common import add_config_arguments, resolve_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--out", metavar="DIR", help="output folder (sets sample.output_dir; default beside the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace finished samples already in the output folder")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="decode with a tokenizer other than the one the generator's latents came from (experiments)")


def main(args: argparse.Namespace, extra: list[str]) -> int:
    if args.out is not None:
        extra = [*extra, "--sample.output_dir", args.out]
    cfg = resolve_config(args, extra)
    if cfg is None:
        return 0
    import logging

    from pae_fast.cli.common import stop_on_signal
    from pae_fast.stages.sample import sample

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    with stop_on_signal("sample", "nothing finished was lost; run the same command again") as check_stop:
        # errors (a damaged checkpoint: exit 3) become one line in pae_fast.cli.main
        paths = sample(cfg, overwrite=args.overwrite, allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
                       check_stop=check_stop)
    for path in paths:
        print(path)
    return 0

"""Latent diffusability report (VIV, LNC, SEC, LDS, CDS, GSQ, eRank; SSC with --segments) for latent sets.

Each INPUT is a latent cache folder or a ``.safetensors`` file with ``latents`` (N, C, H, W) and ``labels`` (N,).
Writes ``diffusability.json``, ``report.md`` and PNG plots (VIV time profile, DCT spectrum, token cosine vs
distance) with all inputs side by side. A progress line is logged per input. SIGTERM / SIGINT stop it before the
next metric with exit code 4; the report is written only at the end, so nothing is written then (an earlier report
in the folder stays as it was) and the same command finishes the job.

    python -m pae_fast diffusability caches/pae caches/rae --names PAE RAE --out runs/diffusability
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pae_fast.cli.common import add_config_arguments, resolve_config, write_run_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="latent cache folders or latents .safetensors files")
    p.add_argument("--names", nargs="+", help="one display name per input (default: folder / file names)")
    p.add_argument("--out", help="report folder (default: out_dir)")
    p.add_argument("--segments", help="safetensors with 'segments' (N, H, W) segment ids: adds SSC")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in the output folder")
    add_config_arguments(p)


def main(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = resolve_config(args, extra)
    if cfg is None:
        return 0
    names = args.names or [Path(p).stem if Path(p).is_file() else Path(p).name for p in args.inputs]
    if len(names) != len(args.inputs):
        print(f"error: --names gives {len(names)} names for {len(args.inputs)} inputs", file=sys.stderr)
        return 2
    if len(set(names)) != len(names):
        print(f"error: input names must be distinct, got {names}; pass --names", file=sys.stderr)
        return 2
    import logging

    from pae_fast.cli.common import check_output_dir, stop_on_signal
    from pae_fast.config import ConfigError
    from pae_fast.errors import DataError, OutputError
    from pae_fast.eval.report import METRIC_DOCS, run_diffusability
    from pae_fast.io import load_safetensors

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    out = check_output_dir(args.out or cfg.out_dir)
    if (out / "diffusability.json").exists() and not args.overwrite:
        raise OutputError(f"{out} already holds a diffusability report; pass --overwrite to replace it, or --out "
                          "another folder")
    try:
        segments = None
        if args.segments:
            tensors, _ = load_safetensors(args.segments)
            if "segments" not in tensors:
                raise KeyError(f"{args.segments} has no 'segments' tensor (has {sorted(tensors)})")
            segments = tensors["segments"]
        with stop_on_signal("diffusability", f"nothing was written to {out}; run the same command again") \
                as check_stop:
            report = run_diffusability(dict(zip(names, args.inputs)), out, cfg.eval, segments=segments,
                                       check_stop=check_stop)
    except ConfigError:
        raise
    except (KeyError, ValueError) as e:  # a malformed cache / latents / segments file: a data error (exit code 3)
        raise DataError(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)) from e
    write_run_config(cfg, out)
    width = max(len(n) for n in names)
    print(f"{'':<8}" + "".join(f"{n:>{max(width, 9) + 2}}" for n in names))
    for key in METRIC_DOCS:
        if key in report["results"][names[0]]:
            vals = [report["results"][n][key] for n in names]
            print(f"{key:<8}" + "".join(f"{v:>{max(width, 9) + 2}.4f}" for v in vals))
    print(f"wrote {report['files']['markdown']}")
    return 0

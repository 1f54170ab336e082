"""Generation metrics of samples against a reference: FID, sFID, IS, precision/recall (and FD_DINOv2).

SAMPLES and REFERENCE are ADM-format npz files (``arr_0`` uint8 (N, H, W, 3)) or image folders. A reference npz
with precomputed ``mu``/``sigma`` (``mu_s``/``sigma_s``) uses them; precision/recall need its images.
``--eval.protocol adm`` (default) or ``torch-fidelity`` chooses the IS splits and the k-NN distance precision; the
table and the JSON name the protocol that produced the numbers. The FID
Inception weights come from a local file (pytorch-fid's pt_inception-2015-12-05 port), FD_DINOv2 is added when
``--eval.dino_weights`` is set.

    python -m pae_fast evaluate samples.npz VIRTUAL_imagenet256_labeled.npz --eval.inception_weights pt_inception.pth

An existing result JSON (or --save-reference-stats file) is refused unless --overwrite, before any work. Exit codes:
0 done, 2 usage / config (no reference, eval.inception_weights unset), 3 a missing / damaged input, weights or
output, 4 stopped by SIGTERM/SIGINT (nothing written: rerun the same command).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pae_fast.cli.common import add_config_arguments, resolve_config

_ORDER = ("fid", "sfid", "is", "precision", "recall", "fd_dinov2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="samples: ADM npz (arr_0) or an image folder")
    p.add_argument("reference", nargs="?", help="reference npz / image folder (default: eval.reference)")
    p.add_argument("--out", help="result JSON (default: <out_dir>/evaluate.json)")
    p.add_argument("--save-reference-stats", metavar="NPZ", help="also write the reference statistics for reuse")
    p.add_argument(
        "--with-images",
        action="store_true",
        help="with --save-reference-stats: embed the reference images as arr_0, so ADM's evaluator can read the file",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result JSON / reference statistics")
    add_config_arguments(p)


def format_table(metrics: dict) -> str:
    """A two-column text table of the metrics present."""
    rows = [("protocol", str(metrics.get("protocol")))]
    rows += [(k, f"{metrics[k]:.4f}") for k in _ORDER if k in metrics]
    rows += [("samples", str(metrics.get("num_samples"))), ("reference", str(metrics.get("num_reference")))]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"(skipped {k}: {why})" for k, why in metrics.get("skipped", {}).items()]
    return "\n".join(lines)


def main(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = resolve_config(args, extra)
    if cfg is None:
        return 0
    import logging

    from pae_fast.cli.common import check_output_file, stop_on_signal
    from pae_fast.config import ConfigError
    from pae_fast.errors import DataError
    from pae_fast.eval.fid import evaluate_generation, load_dino, resolve_device
    from pae_fast.eval.report import json_safe
    from pae_fast.io import atomic_write_text

    ev = cfg.eval
    reference = args.reference or ev.reference
    if reference is None:
        print("error: no reference: pass REFERENCE or set eval.reference", file=sys.stderr)
        return 2
    if ev.inception_weights is None:
        raise ConfigError("eval.inception_weights is not set: FID needs the local Inception weights file "
                          "(pytorch-fid's pt_inception-2015-12-05); pass --eval.inception_weights PATH")
    out = Path(args.out) if args.out else Path(cfg.out_dir) / "evaluate.json"
    check_output_file(out, args.overwrite)  # before any work: an existing result, a folder, an unwritable place
    if args.save_reference_stats:
        check_output_file(args.save_reference_stats, args.overwrite, key="--save-reference-stats")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    with stop_on_signal("evaluate", "nothing was written; run the same command again") as check_stop:
        try:
            device = resolve_device(ev.device)
            dino = load_dino(ev.dino_model, ev.dino_weights, device=device) if ev.dino_weights else None
            metrics = evaluate_generation(
                args.samples,
                reference,
                inception_weights=ev.inception_weights,
                dino=dino,
                batch_size=ev.batch_size,
                inception_size=ev.inception_size,
                is_splits=ev.is_splits,
                knn_k=ev.knn_k,
                protocol=ev.protocol,
                device=device,
                progress=not args.no_progress,
                reference_stats_out=args.save_reference_stats,
                reference_stats_images=args.with_images,
                check_stop=check_stop,
            )
        except ConfigError:
            raise
        except (KeyError, ValueError) as e:  # a malformed samples / reference file: a data error (exit code 3)
            raise DataError(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)) from e
    record = {"samples": str(args.samples), "reference": str(reference), **metrics}
    atomic_write_text(out, json.dumps(json_safe(record), indent=1))
    print(format_table(metrics))
    layout = metrics.get("reference_stats_layout")
    if layout == "adm":
        print(f"wrote {args.save_reference_stats}: statistics + reference images (arr_0), an ADM reference batch")
    elif layout == "pae_fast":
        print(f"wrote {args.save_reference_stats}: statistics only, for pae_fast; ADM's evaluator needs arr_0 "
              "(add --with-images)")
    print(f"wrote {out}")
    return 0

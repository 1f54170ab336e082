"""Run the end-to-end demo on an embedded default on CPU (synthetic latents -> generator -> samples -> report).

    python -m pae_fast demo --config configs/demo_cpu.yaml [--train.steps 100] [--out_dir runs/demo]

See pae_fast/demo.py for the stages; results land in <out_dir>/demo_report.md.
"""

from __future__ import annotations

import argparse

from pae_fast.cli.common import add_config_arguments, resolve_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def main(args: argparse.Namespace, extra: list[str]) -> int:
    import logging

    if args.config is None:
        args.config = "demo_cpu"
    cfg = resolve_config(args, extra)
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from pathlib import Path

    from pae_fast.demo import run_demo

    res = run_demo(cfg)
    print()
    print(Path(cfg.out_dir, "demo_report.md").read_text())
    fd = res["classwise_frechet"]
    print(f"demo finished in {res['seconds']:.0f} s; per-class FD: "
          + ", ".join(f"{k} {v:.3f}" for k, v in fd.items()))
    return 0

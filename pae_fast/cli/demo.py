"""The end-to-end demo on real images on a CPU: PAE against an RAE-style baseline (``make demo``).

    python -m pae_fast demo [--config configs/demo_cpu.yaml] [--fast] [--out_dir runs/demo] [--section.key value]

``--fast`` applies ``configs/demo_fast.yaml`` (a ~2-minute smoke run) on top of the preset, before the overrides.
Local pretrained ViT-tiny weights: ``--tokenizer.vfm_weights FILE`` (otherwise a ViT-tiny is MAE-pre-trained in
the run); LPIPS / GAN weights: ``--tokenizer.lpips_weights`` / ``--tokenizer.disc_weights`` (otherwise off).
Re-running skips finished stages. Results: ``<out_dir>/summary.md``. See pae_fast/stages/demo.py for the stages.
"""

from __future__ import annotations

import argparse

from pae_fast.cli.common import add_config_arguments

FAST_PRESET = "demo_fast"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--fast", action="store_true", help=f"smoke version: apply configs/{FAST_PRESET}.yaml")


def load_demo_config(config: str | None, fast: bool, extra: list[str]):
    """The demo config: the preset (default ``demo_cpu``), then ``demo_fast`` when ``fast``, then ``extra``."""
    from pae_fast.config import apply_overrides, config_from_dict, parse_override_args, preset_path, read_preset
    from pae_fast.config_io import merge_config_data

    path = preset_path(config or "demo_cpu")
    data = read_preset(path)
    where = f" in {path}"
    if fast:
        fast_path = preset_path(FAST_PRESET)
        data = merge_config_data(data, read_preset(fast_path))
        where += f" + {fast_path}"
    cfg = config_from_dict(data, where=where)
    overrides = parse_override_args(extra)
    return apply_overrides(cfg, overrides) if overrides else cfg


def main(args: argparse.Namespace, extra: list[str]) -> int:
    import logging

    from pae_fast.config import dump_yaml
    from pae_fast.config_checks import check_command_devices

    cfg = load_demo_config(args.config, args.fast, extra)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    check_command_devices(cfg, "demo")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    from pathlib import Path

    from pae_fast.stages.demo import run_demo

    s = run_demo(cfg, fast=args.fast)
    print()
    print(Path(cfg.out_dir, "summary.md").read_text())
    fd = s["image_fd"]
    print(f"demo finished in {s['seconds']:.0f} s; image FD trained (untrained): PAE {fd['PAE']['trained']:.2f} "
          f"({fd['PAE']['untrained']:.2f}), RAE {fd['RAE']['trained']:.2f} ({fd['RAE']['untrained']:.2f}); "
          f"summary: {Path(cfg.out_dir, 'summary.md')}")
    return 0

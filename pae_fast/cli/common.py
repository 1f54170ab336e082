"""Shared CLI plumbing: ``--config`` presets, dotted overrides, ``--dry-run``, resolved config per run."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pae_fast.config import (
    Config,
    ConfigError,
    dump_yaml,
    list_presets,
    load_config,
    parse_override_args,
    preset_path,
    save_resolved,
)
from pae_fast.config_checks import check_command_devices
from pae_fast.io import check_output_dir, check_output_file

__all__ = ["add_config_arguments", "resolve_config", "run_training_stage", "preset_path", "list_presets", "no_extra",
           "check_output_dir", "check_output_file", "stop_on_signal"]


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="YAML preset: a path, or the name of a bundled preset (see `python -m pae_fast info --presets`)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and exit")


def resolve_config(args: argparse.Namespace, extra: list[str]) -> Config | None:
    """Load ``--config`` (its ``base:`` chain merged) with the overrides in ``extra``; on ``--dry-run`` print the
    merged, resolved config and return None."""
    path = preset_path(args.config) if getattr(args, "config", None) else None
    cfg = load_config(path, parse_override_args(extra))
    if getattr(args, "dry_run", False):
        print(dump_yaml(cfg), end="")
        if getattr(args, "command", None) == "sample":  # the grid and model calls the sample section asks for
            from pae_fast.flow.grid import plan_from_config

            try:
                shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)  # the config's generator
                print(f"# sampling plan: {plan_from_config(cfg.sample, shape).describe()}")
            except ValueError as e:
                raise ConfigError(str(e)) from e
        return None
    command = getattr(getattr(args, "_command", None), "__name__", "").rsplit(".", 1)[-1].replace("_", "-")
    check_command_devices(cfg, command)  # the device this command runs on must exist, before anything is written
    return cfg


def write_run_config(cfg: Config, out_dir: str | Path | None = None) -> Path:
    """Write the resolved config to the run folder (``cfg.out_dir`` by default)."""
    return save_resolved(cfg, out_dir if out_dir is not None else cfg.out_dir)


def no_extra(extra: list[str], command: str) -> None:
    if extra:
        raise ConfigError(f"`{command}` takes no config overrides; unexpected arguments: {' '.join(extra)}")


def run_training_stage(args: argparse.Namespace, extra: list[str], stage: str, label: str) -> int:
    """The body of a training command: resolve the config (``--dry-run`` prints it), run the stage function
    ``stage`` (``"module:function"`` under ``pae_fast.stages``, imported only now), exit 4 when SIGTERM stopped it
    after a checkpoint, else print ``<label>: <result path>``.

    The stage seeds before it builds its model and checks the run identity before it writes anything.
    """
    import importlib

    from pae_fast.errors import raise_if_preempted

    cfg = resolve_config(args, extra)
    if cfg is None:  # --dry-run printed the config
        return 0
    module, func = stage.split(":")
    out = getattr(importlib.import_module(f"pae_fast.stages.{module}"), func)(cfg)
    raise_if_preempted()  # SIGTERM: checkpoint written, exit code 4 instead of the success line
    print(f"{label}: {out}")
    return 0


@contextmanager
def stop_on_signal(command: str, resume: str) -> Iterator[Callable[[], None]]:
    """SIGTERM / SIGINT during a long command that is not a training run (``cache-latents``, ``sample``,
    ``evaluate``, ``pretrain-vfm``, ``reconstruct``, ``diffusability``): the training engine's handler
    (:class:`pae_fast.engine.monitor.Preemption`, a second Ctrl-C still interrupts at once) records the signal, and
    the yielded ``check()`` - called by the command between batches (metrics) - raises
    :class:`~pae_fast.errors.PreemptedError` (exit code 4, one line naming the signal and ``resume``: what is kept
    and how to go on). Outputs are written atomically, so what was finished stays; a
    signal that comes after the last check (while the final files are written) lets the command finish.
    """
    import signal

    from pae_fast.engine.monitor import Preemption
    from pae_fast.errors import PreemptedError

    with Preemption(then=f"stopping {command} before its next batch") as preempt:

        def check() -> None:
            if preempt.requested is not None:
                raise PreemptedError(f"{command} stopped by {signal.Signals(preempt.requested).name}; {resume}")

        yield check  # a signal after the last check: the work finished, so the command reports its success

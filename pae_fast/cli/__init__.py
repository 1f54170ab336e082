"""Command-line entry point. Each module in this package is one subcommand (``train_dit.py`` -> ``train-dit``).

A command module keeps its imports light at the top and defines:

- its docstring (first line = the one-line help),
- ``add_arguments(parser)``: its own arguments (config commands call ``common.add_config_arguments``),
- ``main(args, extra) -> int``: ``extra`` holds the unparsed ``--section.key value`` overrides.

Errors: a command raises; :func:`main` turns expected errors (:mod:`pae_fast.errors`, checkpoint / weights errors,
missing files) into one ``error: ...`` line and their exit code. ``--debug`` is a global flag that shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

__all__ = ["main", "commands"]

_NOT_COMMANDS = {"common"}


def commands() -> dict[str, ModuleType]:
    """Discover the subcommand modules of this package."""
    import pae_fast.cli as pkg

    out = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in _NOT_COMMANDS:
            continue
        mod = importlib.import_module(f"pae_fast.cli.{info.name}")
        if hasattr(mod, "main") and hasattr(mod, "add_arguments"):
            out[info.name.replace("_", "-")] = mod
    return out


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(
        prog="python -m pae_fast",
        description="pae_fast: Prior-Aligned Autoencoders for latent diffusion on fused Triton kernels. "
        "Config commands take --config PRESET.yaml, dotted overrides (--train.steps 20) and --dry-run.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line (also PAE_FAST_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cmds = commands()
    for name, mod in cmds.items():
        doc = (mod.__doc__ or "").strip()
        sp = sub.add_parser(
            name,
            help=doc.splitlines()[0] if doc else name,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(sp)
        sp.set_defaults(_command=mod)
    return parser, cmds


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (see :mod:`pae_fast.errors`).

    Expected failures print one line ``error: ...`` on stderr and return their code; ``--debug`` (anywhere on the
    command line) or ``PAE_FAST_DEBUG=1`` prints the traceback instead.
    """
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PAE_FAST_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser, _ = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 2
    from pae_fast.errors import EXIT_INTERNAL, describe, exit_code_for, take_preemption

    take_preemption()  # a preemption recorded by an earlier in-process call is not this command's
    try:
        code = int(args._command.main(args, extra) or 0)
    except (Exception, KeyboardInterrupt) as e:
        if debug:
            raise
        code = exit_code_for(e)
        if code == EXIT_INTERNAL:
            print(f"error: internal error {type(e).__name__}: {_one_line(e)} (a bug; rerun with --debug for the "
                  "traceback)", file=sys.stderr)
        else:
            print(f"error: {describe(e)}", file=sys.stderr)
        return code
    preempted = take_preemption()  # a command that did not check for it itself
    if preempted is not None and code == 0:
        print(f"error: {preempted}", file=sys.stderr)
        return preempted.exit_code
    return code


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split())

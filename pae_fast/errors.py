"""The expected failures of a run and the exit code of each: one line on the command line, no traceback.

Every error a user can cause (a bad config value, a missing or damaged file, a busy output folder, a run stopped
by a signal or by non-finite values) derives from :class:`PaeError` and carries the process exit code the CLI
returns for it. Unexpected exceptions (bugs) exit with :data:`EXIT_INTERNAL`.

=====  ==========================================================================================================
code   meaning
=====  ==========================================================================================================
0      success
1      internal error (a bug: rerun with ``--debug`` for the traceback)
2      usage / config: a bad key, value, device or command line; a resume that does not match the run
3      data / weights / checkpoint / output: a missing, damaged or malformed input file (weights holding NaN/Inf
       too); an output that exists (no ``--overwrite``), is a file where a folder is needed, or cannot be written
4      preempted: SIGTERM / SIGINT stopped the command after its last complete output (a checkpoint, a shard);
       rerun the same command to resume
5      non-finite: training stopped on NaN/Inf losses or gradients
6      busy: another process holds the output folder's lock
130    a second Ctrl-C (KeyboardInterrupt)
=====  ==========================================================================================================

This module imports nothing from the package, so every module may import it.
"""

from __future__ import annotations

import sys

__all__ = [
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "EXIT_DATA",
    "EXIT_PREEMPTED",
    "EXIT_NONFINITE",
    "EXIT_BUSY",
    "EXIT_KEYBOARD",
    "PaeError",
    "ConfigError",
    "DataError",
    "NonFiniteError",
    "PreemptedError",
    "RunLockedError",
    "OutputError",
    "exit_code_for",
    "describe",
    "record_preemption",
    "take_preemption",
    "raise_if_preempted",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_PREEMPTED = 4
EXIT_NONFINITE = 5
EXIT_BUSY = 6
EXIT_KEYBOARD = 130


class PaeError(Exception):
    """An expected failure; ``exit_code`` is what the command line returns for it."""

    exit_code: int = EXIT_INTERNAL


class ConfigError(PaeError, ValueError):
    """A config file, key or value is not valid; the message names it and lists what is expected."""

    exit_code = EXIT_USAGE


class DataError(PaeError, ValueError):
    """An input data file (latent cache, shard, index, statistics) is missing, damaged or malformed; the message
    names the file (and the item when one is at fault)."""

    exit_code = EXIT_DATA


class NonFiniteError(PaeError, FloatingPointError):
    """Training stopped because losses or gradients were NaN/Inf (the message names the steps)."""

    exit_code = EXIT_NONFINITE


class PreemptedError(PaeError):
    """A signal stopped the run after its checkpoint was written; rerunning the command resumes it."""

    exit_code = EXIT_PREEMPTED


class RunLockedError(PaeError):
    """Another process holds the lock of the output folder (the message names the folder and the holder's pid)."""

    exit_code = EXIT_BUSY


class OutputError(PaeError):
    """An output cannot be written as asked: it exists and ``--overwrite`` was not given, it is a file where a folder
    is needed (or the reverse), or its folder is not writable. Nothing was written; the message names the path."""

    exit_code = EXIT_DATA


def exit_code_for(exc: BaseException) -> int:
    """The process exit code of an exception (the one place that maps exception types to exit codes):
    :class:`PaeError` subclasses (``CheckpointError`` is a :class:`DataError`) carry theirs;
    ``pae_fast.weights.WeightsError`` (missing, truncated, pickled, wrong layout, NaN/Inf weights) and every
    ``OSError`` (a missing input, an unwritable / read-only output, an output that is a file where a folder is
    needed, a full disk) are data errors (3); anything else is internal (1)."""
    if isinstance(exc, PaeError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_KEYBOARD
    if isinstance(exc, OSError):
        return EXIT_DATA
    weights = sys.modules.get("pae_fast.weights")  # not imported: the exception cannot be one of its errors
    if weights is not None and isinstance(exc, weights.WeightsError):
        return EXIT_DATA
    return EXIT_INTERNAL


def describe(exc: BaseException) -> str:
    """The one-line message of an expected error; an ``OSError`` names its path(s) and the system's reason."""
    if isinstance(exc, OSError) and not isinstance(exc, PaeError) and exc.strerror:
        paths = " -> ".join(repr(str(p)) for p in (exc.filename, exc.filename2) if p is not None)
        return f"{paths}: {exc.strerror}" if paths else exc.strerror
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


_pending_preemption: list[PreemptedError] = []  # process-wide: signals are process-wide too


def record_preemption(error: PreemptedError) -> None:
    """Called by the training engine when a signal stopped a run after its checkpoint: the command line then exits
    with :data:`EXIT_PREEMPTED` instead of reporting success (library callers see ``TrainResult.interrupted``)."""
    _pending_preemption.append(error)


def take_preemption() -> PreemptedError | None:
    """The last recorded preemption (cleared), or None when no run of this process was preempted."""
    err = _pending_preemption[-1] if _pending_preemption else None
    _pending_preemption.clear()
    return err


def raise_if_preempted() -> None:
    """Raise the recorded :class:`PreemptedError` (exit code 4), if any; a command calls it before its success
    line."""
    err = take_preemption()
    if err is not None:
        raise err

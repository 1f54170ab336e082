"""Run monitoring for the engine: rank-0 logger (stdout + ``log.txt``), ``stats.jsonl``, optional tensorboard,
throughput / memory / MFU numbers, and the preemption (SIGTERM / SIGINT) handler."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from pae_fast.io import atomic_write_text

__all__ = [
    "LOGGER_NAME",
    "setup_logger",
    "close_logger",
    "StatsWriter",
    "peak_memory_gb",
    "peak_flops",
    "Preemption",
]

LOGGER_NAME = "pae_fast.train"

# Dense bf16 tensor-core peaks (FLOP/s) for MFU (docs/method.md § Compute accounting), matched against
# torch.cuda.get_device_name(). CPUs have no entry: MFU is reported as null there.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
              "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def setup_logger(out_dir: Path | None, main: bool) -> tuple[logging.Logger, list[logging.Handler]]:
    """The training logger: INFO to stdout and ``out_dir/log.txt`` on rank 0, warnings only elsewhere.

    Returns:
        The logger and the handlers added (pass them to :func:`close_logger`).
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO if main else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = []
    stream = logging.StreamHandler(sys.stdout)
    handlers.append(stream)
    if main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out_dir / "log.txt", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger, handlers


def close_logger(handlers: list[logging.Handler]) -> None:
    logger = logging.getLogger(LOGGER_NAME)
    for h in handlers:
        logger.removeHandler(h)
        h.close()


class StatsWriter:
    """Appends one JSON object per log step to ``stats.jsonl`` (rank 0) and mirrors scalars to tensorboard."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None):
        self.path, self.enabled = path, enabled
        self.tb = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError as e:  # torch ships the wrapper, the tensorboard package is optional
                logging.getLogger(LOGGER_NAME).warning("train.tensorboard=true but tensorboard is unavailable (%s)", e)

    def rewind(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run repeats those steps); rewrites the file atomically."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line)
            except (ValueError, AttributeError):
                continue  # a torn last line from a crash
        atomic_write_text(self.path, "".join(f"{line}\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
        if self.tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory (GiB) on ``device``; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return rss_kb / 2**20
    except ImportError:  # pragma: no cover - non-POSIX
        return float("nan")


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` for MFU (None on CPU or an unknown GPU).

    ``PAE_FAST_PEAK_TFLOPS`` overrides the table (e.g. for an unlisted GPU)."""
    if device.type != "cuda":
        return None
    env = os.environ.get("PAE_FAST_PEAK_TFLOPS")
    if env:
        try:
            return float(env) * 1e12
        except ValueError:
            warnings.warn(f"PAE_FAST_PEAK_TFLOPS={env!r} is not a number; MFU not reported", stacklevel=2)
            return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(_PEAK_BF16, key=len, reverse=True):
        if key in name:
            return _PEAK_BF16[key]
    return None


class Preemption:
    """Context manager: SIGTERM / SIGINT request a clean stop (finish the step, checkpoint, return).

    A second SIGINT raises ``KeyboardInterrupt`` at once. The previous handlers are restored on exit. Outside the
    main thread signals cannot be caught; then nothing is installed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, then: str = "finishing the current step, then writing a checkpoint") -> None:
        self.requested: int | None = None
        self.then = then  # what the logged line says happens next
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        logging.getLogger(LOGGER_NAME).warning(
            "received %s: %s", signal.Signals(signum).name, self.then
        )

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()

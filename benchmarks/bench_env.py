"""Machine, versions and git revision recorded with every benchmark result."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def git_revision(root: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}``; ``error`` says why the commit is unknown."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()

    out: dict[str, Any] = {"commit": None, "dirty": None}
    try:
        out["commit"] = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError) as e:
        out["error"] = f"no commit: {getattr(e, 'stderr', '') or e}".strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    return out


def environment() -> dict[str, Any]:
    """Machine, library versions, accelerator and git revision (JSON-serialisable)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton missing or broken: the record says so instead of failing the benchmark
        triton_version = None
    env: dict[str, Any] = {
        "machine": {
            "node": platform.node(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
        },
        "accelerator": None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "git": git_revision(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["accelerator"] = {
            "name": props.name,
            "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
            "count": torch.cuda.device_count(),
        }
    return env


def device_label() -> str:
    """A short label for result file names: ``cuda`` or ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def time_steps(step: Any, device: Any, backend: str, warmup: int, steps: int) -> tuple[list[float], list[float], Any]:
    """Run ``step()`` ``warmup + steps`` times under ``pae_fast.kernels.use_backend(backend)``, synchronising a CUDA
    ``device`` around each call (peak-memory statistics reset first).

    Returns:
        ``(timed seconds, warm-up seconds, the last call's result)``.
    """
    import time

    import torch

    from pae_fast import kernels

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    warm: list[float] = []
    result = None
    with kernels.use_backend(backend):
        for i in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            result = step()
            sync()
            (warm if i < warmup else times).append(time.perf_counter() - t0)
    return times, warm, result

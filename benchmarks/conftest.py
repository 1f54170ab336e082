"""pytest-benchmark setup for the op suites: options, parametrisation over ``pae_fast.kernels.OPS``, machine info.

    pytest benchmarks/test_bench_ops.py -m benchmark --benchmark-enable --benchmark-json OUT.json \\
        [--bench-size auto|small|model] [--bench-cases N] [--bench-ops latent_norm,swiglu]
        [--bench-impls fused,reference,compiled] [--bench-device auto|cpu|cuda]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("pae_fast benchmarks")
    g.addoption(
        "--bench-size",
        default="auto",
        choices=["auto", "small", "model"],
        help="op case sizes: model (real widths) on CUDA, small on CPU by default",
    )
    g.addoption("--bench-cases", type=int, default=None, help="cases per op (default: all on CUDA, the first on CPU)")
    g.addoption("--bench-ops", default=None, help="comma-separated op names (default: every op in OPS)")
    g.addoption("--bench-impls", default=None, help="comma-separated of fused,reference,compiled (default: all)")
    g.addoption(
        "--bench-device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default: cuda when available)"
    )


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # CPU: one thread, as the tests run. The small CPU cases are dominated by per-op overhead, and on a shared
    # machine extra OpenMP threads only add contention (PAE_FAST_BENCH_THREADS overrides).
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("PAE_FAST_BENCH_THREADS", "1")))


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    from bench_env import environment

    env = environment()
    machine_info["pae_fast"] = env
    machine_info["git_commit"] = env["git"].get("commit")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "op_case" not in metafunc.fixturenames:
        return
    from bench_ops_cases import collect_cases

    cfg = metafunc.config
    try:
        cases = collect_cases(
            size=cfg.getoption("--bench-size"),
            max_cases=cfg.getoption("--bench-cases"),
            ops=cfg.getoption("--bench-ops"),
            device=cfg.getoption("--bench-device"),
        )
    except (ValueError, RuntimeError) as e:
        raise pytest.UsageError(str(e)) from e
    from bench_ops_cases import IMPLS, MODES

    impls = [i.strip() for i in (cfg.getoption("--bench-impls") or ",".join(IMPLS)).split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise pytest.UsageError(f"--bench-impls: unknown {bad}; valid: {', '.join(IMPLS)}")
    metafunc.parametrize("op_case", cases, ids=[c.id for c in cases])
    metafunc.parametrize("impl", impls)
    metafunc.parametrize("mode", MODES)

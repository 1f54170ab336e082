"""Fixtures for the engine tests: the tiny MLP task module (``tiny_task.py``, also run as a script)."""

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _load_tiny():
    name = "pae_fast_engine_tiny_task"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "tiny_task.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="session")
def tiny():
    """The ``tiny_task`` module: ``make_task``, ``tiny_cfg``, ``state_of``, ``TinyMLP``, ``RandomRegression``."""
    return _load_tiny()


@pytest.fixture(scope="session")
def tiny_script() -> Path:
    return HERE / "tiny_task.py"

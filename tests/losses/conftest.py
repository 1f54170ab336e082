"""Fixtures for the loss tests: ``tiny_parts.py`` (a tiny decoder, a tiny discriminator, a counting LPIPS)."""

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def parts():
    """The ``tiny_parts`` module."""
    name = "pae_fast_losses_tiny_parts"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "tiny_parts.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]

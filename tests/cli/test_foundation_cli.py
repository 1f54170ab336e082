"""The CLI works from the installed package, outside the repository folder too."""

import os
import subprocess
import sys

import pytest


def _run(args, cwd, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands(tmp_path):
    out = _run(["-m", "pae_fast", "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "info" in out.stdout and "COMMAND" in out.stdout


def test_info_outside_repo(tmp_path):
    out = _run(["-m", "pae_fast", "info", "--presets"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "optional components" in out.stdout
    assert "flash_attn" in out.stdout and "presets:" in out.stdout and "tiny_cpu" in out.stdout


def test_kernels_info_outside_repo(tmp_path):
    out = _run(["-m", "pae_fast.kernels.info"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "latent_norm" in out.stdout


def test_dry_run_prints_resolved_yaml_outside_repo(tmp_path):
    out = _run(["-m", "pae_fast", "train-dit", "--config", "tiny_cpu", "--train.steps", "7", "--dry-run"], tmp_path)
    if "invalid choice: 'train-dit'" in out.stderr:
        pytest.fail("train-dit is not registered")
    assert out.returncode == 0, out.stderr
    assert "steps: 7" in out.stdout
    assert not any(tmp_path.iterdir()), "a dry run must not write anything"


def test_bad_override_is_a_clear_error(tmp_path):
    out = _run(["-m", "pae_fast", "train-dit", "--config", "tiny_cpu", "--train.stepz", "7", "--dry-run"], tmp_path)
    assert out.returncode == 2
    assert "unknown config key 'train.stepz'" in out.stderr and "Valid keys here" in out.stderr

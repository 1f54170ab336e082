"""`python -m pae_fast.kernels.validate` and `.info` run on CPU (validate restarts itself under the interpreter)."""

import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_validate_runs_on_cpu_without_interpreter_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "pae_fast.kernels.validate", "--ops", "latent_norm", "swiglu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "0 failed" in out.stdout and "latent_norm" in out.stdout and "fp16" in out.stdout


def test_validate_rejects_unknown_ops_and_bf16_on_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pae_fast.kernels.validate", "--ops", "nope"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "unknown op 'nope'" in out.stderr
    if not torch.cuda.is_available():
        out = subprocess.run([sys.executable, "-m", "pae_fast.kernels.validate", "--dtypes", "bf16"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and "no bf16" in out.stderr


def test_info_lists_every_op_with_backends(tmp_path):
    from pae_fast import kernels

    out = subprocess.run([sys.executable, "-m", "pae_fast.kernels.info"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in kernels.OPS:
        assert name in out.stdout
    assert "available:" in out.stdout

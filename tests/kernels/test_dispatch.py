"""Kernel dispatch rules: per call, per scope, per process; auto on CPU picks torch; explicit triton explains itself."""

import os
import subprocess
import sys

import pytest
import torch

from pae_fast import kernels
from pae_fast.kernels import resolve_backend, use_backend


def test_auto_on_cpu_picks_the_reference():
    x = torch.randn(3, 5)
    assert resolve_backend(None, x) == "torch"
    assert resolve_backend("auto", x) == "torch"


def test_scope_and_call_precedence():
    x = torch.randn(3, 5)
    with use_backend("torch"):
        assert kernels.current_backend() == "torch"
        with use_backend("triton"):
            assert kernels.current_backend() == "triton"
            assert resolve_backend("torch", x) == "torch"  # the call wins over the scope
        assert kernels.current_backend() == "torch"
    assert kernels.current_backend() == kernels.process_backend()


def test_unknown_backend_names_are_errors():
    with pytest.raises(ValueError, match=r"unknown kernel backend 'cuda'.*valid: auto, triton, torch"):
        resolve_backend("cuda", torch.randn(2))
    with pytest.raises(ValueError, match="use_backend"), use_backend("fast"):
        pass


def test_meta_device_may_use_triton_fakes():
    assert resolve_backend("triton", torch.empty(2, 3, device="meta")) == "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only rule")
def test_explicit_triton_on_cpu_without_interpreter_raises():
    code = (
        "import torch\nfrom pae_fast.kernels import latent_norm, BackendUnavailable\n"
        "try:\n    latent_norm(torch.randn(4, 8), backend='triton')\n"
        "except BackendUnavailable as e:\n    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "RAISED" in out.stdout, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout


def test_process_backend_env_is_read(tmp_path):
    code = "from pae_fast import kernels\nprint(kernels.current_backend())\n"
    env = dict(os.environ, PAE_FAST_KERNEL_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "torch", out.stderr
    env["PAE_FAST_KERNEL_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "unknown kernel backend 'bogus'" in out.stderr


def test_unavailable_reasons():
    if kernels.interpreter_enabled():
        assert kernels.triton_unavailable_reason("cpu") is None
    if not torch.cuda.is_available():
        assert "no CUDA device" in kernels.triton_unavailable_reason("cuda")
    assert "do not run on device type" in kernels.triton_unavailable_reason("mps")

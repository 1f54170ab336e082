"""Fused Triton kernels of pae_fast, installed as ``pae_fast.kernels``.

Every op has a public function with ``backend=`` (``auto | triton | torch``), a PyTorch reference ``<op>_ref``
(the spec, the CPU path and the fallback) and a ``torch.library`` custom op ``pae_fast::<op>`` with a fake
implementation, so models trace under ``torch.compile`` and run on the meta device.

    python -m pae_fast.kernels.info       # every op, its backends and why any is unavailable
    python -m pae_fast.kernels.validate   # every op against its reference on this device
"""

from ._dispatch import (
    BACKENDS,
    ENV_VAR,
    OPS,
    BackendUnavailable,
    current_backend,
    interpreter_enabled,
    process_backend,
    resolve_backend,
    triton_unavailable_reason,
    use_backend,
)
from .latent_norm import latent_norm, latent_norm_ref

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "OPS",
    "BackendUnavailable",
    "current_backend",
    "interpreter_enabled",
    "process_backend",
    "resolve_backend",
    "triton_unavailable_reason",
    "use_backend",
    "latent_norm",
    "latent_norm_ref",
]

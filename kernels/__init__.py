"""Fused Triton kernels of pae_fast, installed as ``pae_fast.kernels``.

Every op has a public function with ``backend=`` (``auto | triton | torch``), a PyTorch reference ``<op>_ref``
(the spec, the CPU path and the fallback) and a ``torch.library`` custom op ``pae_fast::<op>`` with a fake
implementation, so models trace under ``torch.compile`` and run on the meta device.

    python -m pae_fast.kernels.info       # every op, its backends and why any is unavailable
    python -m pae_fast.kernels.validate   # every op against its reference on this device
    python -m pae_fast.kernels.tools.compile_check --ptxas   # every kernel launch compiled for sm_90, no GPU needed
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
from .adaln_modulate import adaln_modulate, adaln_modulate_ref
from .attention import attention, attention_ref, use_attention_backend
from .fused_adamw_ema import fused_adamw_ema, fused_adamw_ema_ref
from .gated_residual_adaln import gated_residual_adaln, gated_residual_adaln_ref
from .gelu_mlp import gelu_mlp, gelu_mlp_ref
from .gram_loss import gram_loss, gram_loss_ref
from .latent_norm import latent_norm, latent_norm_ref
from .lpips_distance import lpips_distance, lpips_distance_ref
from .lpips_relu_distance import lpips_relu_distance, lpips_relu_distance_ref
from .lpips_relu_distance_pool import lpips_relu_distance_pool, lpips_relu_distance_pool_ref
from .maxpool2x2 import maxpool2x2, maxpool2x2_ref
from .qk_norm_rope import qk_norm_rope, qk_norm_rope_ref, rope_2d_tables
from .qkv_heads import linear_qkv_heads, qkv_heads, qkv_heads_ref
from .qkv_norm_rope import qkv_norm_rope, qkv_norm_rope_ref
from .residual_layernorm import residual_layernorm, residual_layernorm_ref
from .sphere_perturb import sphere_perturb, sphere_perturb_ref
from .swiglu import swiglu, swiglu_ref
from .swiglu_mlp import swiglu_mlp, swiglu_mlp_ref

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
    "swiglu",
    "swiglu_ref",
    "swiglu_mlp",
    "swiglu_mlp_ref",
    "gelu_mlp",
    "gelu_mlp_ref",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "qkv_norm_rope",
    "qkv_norm_rope_ref",
    "qkv_heads",
    "qkv_heads_ref",
    "linear_qkv_heads",
    "rope_2d_tables",
    "attention",
    "attention_ref",
    "use_attention_backend",
    "adaln_modulate",
    "adaln_modulate_ref",
    "gated_residual_adaln",
    "gated_residual_adaln_ref",
    "sphere_perturb",
    "sphere_perturb_ref",
    "gram_loss",
    "gram_loss_ref",
    "fused_adamw_ema",
    "fused_adamw_ema_ref",
    "residual_layernorm",
    "residual_layernorm_ref",
    "lpips_distance",
    "lpips_distance_ref",
    "lpips_relu_distance",
    "lpips_relu_distance_ref",
    "lpips_relu_distance_pool",
    "lpips_relu_distance_pool_ref",
    "maxpool2x2",
    "maxpool2x2_ref",
]

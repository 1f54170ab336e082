"""attention: softmax(q k^T / sqrt(hd)) v over a registry of attention backends.

pae_fast has no Triton attention kernel: attention is compute-bound and torch SDPA (FlashAttention-2, cuDNN,
memory-efficient) or the optional flash-attn / xformers packages already run it near peak. What this module adds is
an explicit, testable choice of backend, so a run never silently falls back to SDPA's MATH kernel:

=============  ===============================================================================================
``sdpa``       ``torch.nn.functional.scaled_dot_product_attention`` with the SDPA kernels pinned on CUDA through
               ``torch.nn.attention.sdpa_kernel`` in priority order (default ``flash, cudnn, efficient``); pick
               the order with ``"sdpa:<kernel>[,<kernel>...]"``, kernels ``flash | cudnn | efficient | math``
               (e.g. ``"sdpa:cudnn"``: cuDNN attention handles head_dim 72 without FA2's padding to 96).
               Off CUDA the pinning is not applied (CPU/meta SDPA picks its own kernel).
``flash_attn`` ``flash_attn.flash_attn_func`` (CUDA, fp16/bf16), only when the flash-attn package imports.
``xformers``   ``xformers.ops.memory_efficient_attention`` (CUDA), only when xformers imports.
``math``       :func:`attention_ref`: the explicit ``softmax(q k^T / sqrt(hd)) v`` in fp32 (the reference).
=============  ===============================================================================================

The generic kernel-backend names map as: ``auto`` -> ``sdpa`` (default order), ``torch`` -> ``math`` (so
``with pae_fast.kernels.use_backend("torch")`` gives the reference exactly), ``triton`` -> ``sdpa:flash``
(FlashAttention pinned on CUDA; elsewhere plain SDPA).

Precedence: the ``backend=`` argument, then the innermost ``use_attention_backend(...)`` scope, then the process
default ``PAE_FAST_ATTENTION_BACKEND`` (read once), then the generic kernel backend in force
(``use_backend`` / ``PAE_FAST_KERNEL_BACKEND``) mapped as above.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ._dispatch import BackendUnavailable, OpSpec, current_backend, register_op, tensor_bytes

__all__ = [
    "ATTENTION_BACKENDS",
    "ATTENTION_ENV_VAR",
    "SDPA_KERNELS",
    "DEFAULT_SDPA_ORDER",
    "attention",
    "attention_ref",
    "use_attention_backend",
    "resolve_attention_backend",
    "attention_backend_reasons",
]

ATTENTION_BACKENDS = ("sdpa", "flash_attn", "xformers", "math")
ATTENTION_ENV_VAR = "PAE_FAST_ATTENTION_BACKEND"
SDPA_KERNELS = ("flash", "cudnn", "efficient", "math")
DEFAULT_SDPA_ORDER = ("flash", "cudnn", "efficient")
_GENERIC = {"auto": "sdpa", "torch": "math", "triton": "sdpa:flash"}
_PACKAGES = {"flash_attn": ("flash_attn", "flash-attn"), "xformers": ("xformers.ops", "xformers")}

_SCOPE_STACK: list[str] = []
_PROCESS: list[str | None] = []  # filled once from the environment
_IMPORT_ERRORS: dict[str, str | None] = {}  # backend -> why its package cannot be imported (None: it can)


# ----------------------------------------------------------------------------------------------------------------
# Backend names and availability
# ----------------------------------------------------------------------------------------------------------------


def _parse(name: str, where: str) -> tuple[str, tuple[str, ...]]:
    """``name`` -> (backend, sdpa kernel order); generic names are mapped, everything else validated."""
    if not isinstance(name, str):
        raise ValueError(f"attention backend must be a string ({where}), got {type(name).__name__}")
    name = _GENERIC.get(name, name)
    base, _, kernels = name.partition(":")
    valid = ", ".join((*ATTENTION_BACKENDS, *_GENERIC, "sdpa:<kernel>[,<kernel>...]"))
    if base not in ATTENTION_BACKENDS or (kernels and base != "sdpa"):
        raise ValueError(f"unknown attention backend {name!r} ({where}); valid: {valid}")
    if base != "sdpa":
        return base, ()
    order = tuple(k.strip() for k in kernels.split(",")) if kernels else DEFAULT_SDPA_ORDER
    bad = [k for k in order if k not in SDPA_KERNELS]
    if bad or not order:
        raise ValueError(
            f"unknown SDPA kernel(s) {bad or [kernels]} in attention backend {name!r} ({where}); "
            f"valid kernels: {', '.join(SDPA_KERNELS)}"
        )
    return base, order


def _process_backend() -> str | None:
    if not _PROCESS:
        env = os.environ.get(ATTENTION_ENV_VAR) or None
        if env is not None:
            _parse(env, f"environment {ATTENTION_ENV_VAR}")
        _PROCESS.append(env)
    return _PROCESS[0]


@contextlib.contextmanager
def use_attention_backend(name: str) -> Iterator[None]:
    """Scope the attention backend: ``with use_attention_backend("sdpa:cudnn"): ...`` (names: module docstring)."""
    _parse(name, "use_attention_backend")
    _SCOPE_STACK.append(name)
    try:
        yield
    finally:
        _SCOPE_STACK.pop()


@torch.compiler.assume_constant_result  # evaluated once while tracing, not traced (import_module is not traceable)
def _import_error(backend: str) -> str | None:
    """Why the optional package behind ``backend`` cannot be used (None when it imports)."""
    if backend not in _IMPORT_ERRORS:
        module, pip_name = _PACKAGES[backend]
        try:
            importlib.import_module(module)
            _IMPORT_ERRORS[backend] = None
        except Exception as e:  # ImportError, or a broken build raising anything at import
            _IMPORT_ERRORS[backend] = f"the {pip_name} package is not usable: importing {module} failed ({e})"
    return _IMPORT_ERRORS[backend]


def attention_backend_reasons() -> dict[str, str | None]:
    """``{backend: why unavailable, or None}`` for every attention backend (and the generic ``triton`` alias)."""
    cuda = torch.cuda.is_available()
    out: dict[str, str | None] = {"sdpa": None}
    for b in ("flash_attn", "xformers"):
        out[b] = _import_error(b) or (None if cuda else "needs a CUDA device")
    out["math"] = None
    out["triton"] = None  # alias: SDPA with FlashAttention pinned on CUDA (not a Triton kernel)
    return out


def resolve_attention_backend(backend: str | None, q: torch.Tensor) -> tuple[str, tuple[str, ...]]:
    """The concrete ``(backend, sdpa_kernel_order)`` for a call on ``q``; raises BackendUnavailable with the reason.

    ``backend`` None uses the scope, then ``PAE_FAST_ATTENTION_BACKEND``, then the generic kernel backend.
    """
    if backend is not None:
        base, order = _parse(backend, "backend= argument")
    elif _SCOPE_STACK:
        base, order = _parse(_SCOPE_STACK[-1], "use_attention_backend")
    elif _process_backend() is not None:
        base, order = _parse(_process_backend(), f"environment {ATTENTION_ENV_VAR}")
    else:
        base, order = _parse(current_backend(), "kernel backend in force")
    if base in _PACKAGES:
        why = _import_error(base)
        if why is None and q.device.type != "cuda":
            why = f"it runs on CUDA tensors only, got {q.device}"
        if why is None and base == "flash_attn" and q.dtype not in (torch.float16, torch.bfloat16):
            why = f"flash-attn supports fp16/bf16 only, got {q.dtype}"
        if why is not None:
            raise BackendUnavailable(f"attention backend {base!r} cannot run: {why}")
    half = q.dtype in (torch.float16, torch.bfloat16)
    if base == "sdpa" and q.device.type == "cuda" and not half and not {"efficient", "math"} & set(order):
        raise BackendUnavailable(
            f"attention backend 'sdpa:{','.join(order)}' cannot run: SDPA's flash/cudnn kernels need fp16/bf16 on "
            f"CUDA, got {q.dtype}; add 'efficient' (e.g. 'sdpa:flash,efficient') or use 'sdpa'"
        )
    return base, order


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: tuple[str, ...]) -> torch.Tensor:
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    try:
        pinned = sdpa_kernel([kinds[name] for name in order], set_priority=True)
    except TypeError:  # torch < 2.6 has no priority order: the listed kernels are allowed, SDPA picks among them
        pinned = sdpa_kernel([kinds[name] for name in order])
    with pinned:
        return F.scaled_dot_product_attention(q, k, v)


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    # flash-attn takes (B, N, H, hd)
    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import xformers.ops as xops

    # xformers takes (B, N, H, hd)
    return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T / sqrt(hd)) v`` (no mask, no dropout) on the chosen backend.

    Args:
        q: ``(B, H, Nq, hd)``.
        k: ``(B, H, Nk, hd)``.
        v: ``(B, H, Nk, hd_v)``.
        backend: ``sdpa | sdpa:<kernel>[,...] | flash_attn | xformers | math`` or the generic
            ``auto | triton | torch`` (see the module docstring); None: the scope / process default.

    Returns:
        ``(B, H, Nq, hd_v)`` in q's dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be (B, H, N, head_dim), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"attention: q, k, v must share dtype/device; {name} is {t.dtype}/{t.device}")
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"attention: batch and head dims must match, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[3] != q.shape[3] or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"attention: need k (B, H, Nk, {q.shape[3]}) and v (B, H, Nk, hd_v), got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    base, order = resolve_attention_backend(backend, q)
    if base == "math":
        return attention_ref(q, k, v)
    if base == "flash_attn":
        return _flash_attn(q, k, v)
    if base == "xformers":
        return _xformers(q, k, v)
    return _sdpa(q, k, v, order)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit ``softmax(q k^T / sqrt(hd)) v``: scores and softmax in fp32 for half inputs (fp64 stays fp64)."""
    dt = q.dtype
    if dt in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Nq, Nk)
    return (scores.softmax(dim=-1) @ v).to(dt)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    q, k, v = (kwargs.get(n, args[i] if len(args) > i else None) for i, n in enumerate(("q", "k", "v")))
    o = q.numel() // q.shape[-1] * v.shape[-1] * q.element_size()
    fwd = tensor_bytes(q, k, v) + o  # read q, k, v; write o (the fp32 log-sum-exp rows are ignored)
    bwd = tensor_bytes(q, k, v) + 2 * o + tensor_bytes(q, k, v)  # read q, k, v, o, do; write dq, dk, dv
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)

    def packed(B, N, H, hd):  # the models' layout: views of one (B, N, 3 * H * hd) projection
        return tuple(rnd(B, N, 3 * H * hd).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0))

    if size == "model":  # LightningDiT-XL trunk (hd 72) and the DiT^DH head (hd 128), 256 tokens, batch 32
        return [
            ("packed qkv (32,16,256,72)", packed(32, 256, 16, 72), {}),
            ("(32,16,256,128)", (rnd(32, 16, 256, 128), rnd(32, 16, 256, 128), rnd(32, 16, 256, 128)), {}),
        ]
    return [
        ("(1,2,257,72)", (rnd(1, 2, 257, 72), rnd(1, 2, 257, 72), rnd(1, 2, 257, 72)), {}),
        ("packed qkv (2,3,17,128)", packed(2, 17, 3, 128), {}),
        ("cross Nq=9 Nk=13 (1,2,.,64)", (rnd(1, 2, 9, 64), rnd(1, 2, 13, 64), rnd(1, 2, 13, 64)), {}),
    ]


register_op(
    OpSpec(
        name="attention",
        fn=attention,
        ref=attention_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="softmax(qk^T/sqrt(hd))v; backends sdpa (pinned kernels) | flash_attn | xformers | math; "
        "auto/triton -> sdpa, torch -> math",
        backends=attention_backend_reasons,
        # Softmax-weighted sums over Nk keys; fused kernels round P to half precision before the PV product, so
        # half-precision errors grow past the elementwise defaults (fp32 stays at the default).
        tolerances={
            torch.float64: (1e-10, 1e-10),
            torch.float32: (2e-5, 2e-5),
            torch.float16: (5e-3, 5e-3),
            torch.bfloat16: (3e-2, 3e-2),
        },
    )
)

"""Tile machinery shared by the Triton GEMMs with element-wise epilogues (``swiglu_mlp``, ``gelu_mlp``).

Each such op is an MLP ``act(x @ w1^T + b1) @ w2^T`` whose activation lives in the epilogue of two Triton GEMMs
(docs/method.md § SwiGLU in GEMM epilogues, § GELU in GEMM epilogues): forward ``x @ w1^T`` over ``(BLOCK_M,
BLOCK_N)`` tiles of the hidden dim, backward ``dh = dy @ w2`` over the same tiles, with fp32 accumulators and the
programs ordered in groups of ``GROUP_M`` row blocks so neighbouring programs share weight tiles in L2. This module
holds what the ops' kernels share: the tile configs, the program -> tile map, the K-loop of one accumulator, the
launcher, the bias-gradient partials and the compute-dtype rule of the public functions.

On a GPU the tile sizes come from ``triton.autotune`` over a few H100-friendly configs (BLOCK_M is 128 in every config:
the backward's per-row-block bias partials have a fixed count). Under the interpreter (``TRITON_INTERPRET=1``) a
fixed small config is used instead (``tl.dot`` needs every block dim >= 16; the autotuner would time each config).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import counting_active, gemm_input_dtype, interpreter_enabled

__all__ = [
    "GPU_BLOCK_M",
    "GPU_CONFIGS",
    "INTERPRET_CONFIG",
    "autotuned",
    "autocast_on",
    "bias_partials",
    "block_m",
    "cublas_fp32",
    "gemm_operands",
    "launch",
    "mm_tile",
    "op_arg",
    "tile_offsets",
    "unit_cols",
]

GPU_BLOCK_M = 128
# (BLOCK_N, num_stages, num_warps); BLOCK_K 64. swiglu_mlp's forward holds two (BLOCK_M, BLOCK_N) fp32 accumulators.
_GPU_TILES = ((64, 3, 4), (64, 4, 4), (64, 3, 8), (64, 4, 8), (128, 3, 8))
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": GPU_BLOCK_M, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bn, s, w in _GPU_TILES
]
# under the interpreter: partial blocks in every dim of the test shapes, and the grouped program order exercised
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, rm, rn, rk, rm_load)`` of this program's output tile: its row block ``pid_m`` (row blocks in groups
    of GROUP_M, column-major inside a group: L2 reuse), the row / column / K offsets, and the rows to load (int64):
    rows past the end load a valid row instead (their results are never stored), so no M mask in the K-loop."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, rm, rn, tl.arange(0, BLOCK_K), (rm % M).to(tl.int64)


@triton.jit
def mm_tile(a_ptr, b_ptr, K, stride_bk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``(BLOCK_M, BLOCK_N)`` = ``sum_k a[:, k] b[k, :]`` over ``k < K``: ``a_ptr`` the ``(BLOCK_M, BLOCK_K)``
    pointers of the first K-slice of A (unit K stride), ``b_ptr`` the ``(BLOCK_K, BLOCK_N)`` pointers of B's, whose K
    stride is ``stride_bk``. Rows / columns past the end must point at valid memory (``tile_offsets``' wrapped rows)."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptr + k0, mask=kmask[None, :], other=0.0)
        b = tl.load(b_ptr + k0 * stride_bk, mask=kmask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")  # half inputs: tensor cores, fp32 sums
    return acc


def autotuned(kernel):
    """``kernel`` autotuned over :data:`GPU_CONFIGS` (one choice per ``(M, N, K)``)."""
    return triton.autotune(configs=GPU_CONFIGS, key=["M", "N", "K"])(kernel)


def unit_cols(t: torch.Tensor) -> torch.Tensor:
    """``t (R, C)`` with a unit column stride and row stride >= C (a copy only when it has neither)."""
    if t.stride(1) != 1 or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        return t.contiguous()
    return t


def launch(tuned, kernel, M: int, N: int, *args, **flags) -> int:
    """Launch ``kernel`` over the ``(M, N)`` tiles (``tuned``, its :func:`autotuned` form, on a GPU); returns the
    BLOCK_M used."""
    if interpreter_enabled():
        cfg = INTERPRET_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        kernel[grid](*args, **flags, **cfg)
        return cfg["BLOCK_M"]
    tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
    return GPU_BLOCK_M


def block_m() -> int:
    """Row-block height of the kernels in this process (the backward's bias partials come one per row block)."""
    return INTERPRET_CONFIG["BLOCK_M"] if interpreter_enabled() else GPU_BLOCK_M


def bias_partials(M: int, width: int, with_bias: bool, device: torch.device) -> torch.Tensor:
    """The fp32 buffer a backward kernel fills with per-row-block column sums ``(cdiv(M, BLOCK_M), width)`` (zeros
    when ``M == 0``: no program runs), or, without ``with_bias``, a ``(1,)`` buffer the kernel is handed but never
    writes (its ``HAS_BIAS`` is off); its ``sum(0)`` is the bias gradient (deterministic, no atomics)."""
    if not with_bias:
        return torch.empty((1,), dtype=torch.float32, device=device)
    if M == 0:
        return torch.zeros((1, width), dtype=torch.float32, device=device)
    return torch.empty((triton.cdiv(M, block_m()), width), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------------------------
# The public functions' compute dtype
# ----------------------------------------------------------------------------------------------------------------


def op_arg(args: tuple, kwargs: dict, i: int, name: str):
    """Argument ``name`` (position ``i``) of an op-table call, for its FLOP and traffic formulas; None if absent."""
    return kwargs[name] if name in kwargs else (args[i] if len(args) > i else None)


def autocast_on(x: torch.Tensor) -> bool:
    """Autocast enabled for ``x``'s device type (False for a device type without autocast, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:
        return False


def cublas_fp32(x: torch.Tensor) -> bool:
    """fp32 compute (fp32 ``x``, no autocast) on a GPU, or on the fake tensors that stand for one while counting
    (:func:`~pae_fast.kernels._dispatch.counting_only`): there the GEMM-epilogue ops keep cuBLAS's GEMMs, since a
    Triton GEMM with IEEE fp32 products runs on CUDA cores and spills registers (compile_check)."""
    return (x.device.type == "cuda" or counting_active()) and x.dtype == torch.float32 and not autocast_on(x)


def gemm_operands(op: str, names: tuple[str, ...], x: torch.Tensor, *others: torch.Tensor | None) -> tuple:
    """``(x, *others)`` in the compute dtype: under autocast every one cast to the autocast dtype (as ``F.linear``
    would cast them), else unchanged after checking that they share ``x.dtype`` (None entries pass through).

    Raises:
        ValueError: outside autocast, a dtype differs from x's (``names`` name the tensors in the message).
    """
    if autocast_on(x):
        dt = gemm_input_dtype(x)
        return tuple(t.to(dt) if t is not None else None for t in (x, *others))
    if any(t is not None and t.dtype != x.dtype for t in others):
        got = ", ".join(str(None if t is None else t.dtype) for t in (x, *others))
        raise ValueError(f"{op}: {', '.join(names[:-1])} and {names[-1]} must share a dtype outside autocast, "
                         f"got {got}")  # fmt: skip
    return (x, *others)

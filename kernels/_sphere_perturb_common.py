"""Building blocks of :mod:`.sphere_perturb` shared by its fused kernels, its launchers and its reference.

The noise stream: the in-kernel Philox draw ``_token_noise`` (``tl.randn(seed, token_index * C + channel)``), the
noise-only kernel and its launcher, and a pure-PyTorch emulation of Triton's Philox-4x32-10 + Box-Muller (integers
and uniforms bit-exact; log/cos/sqrt within float32 rounding) for devices where Triton cannot run. Also the launch
geometry shared by the forward and backward launchers (angle chunks and their scalars, row blocks, the seed
argument). The math is in :mod:`.sphere_perturb`'s docstring (docs/method.md § MCR).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._dispatch import interpreter_enabled
from ._utils import row_block, row_warps

_MAX_ANGLES = 4  # angles per kernel launch (more angles: several launches, the noise is regenerated identically)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _token_noise(SEED, rows, cols, C, SEED_FROM_PTR: tl.constexpr):
    """e[r, c] = tl.randn(seed, r * C + c) for a (BLOCK_R, BLOCK_C) block (rows int32 or int64)."""
    if SEED_FROM_PTR:
        seed = tl.load(SEED)  # 0-dim int tensor on the device: no host sync, CUDA-graph friendly
    else:
        seed = SEED
    return tl.randn(seed, rows[:, None] * C + cols[None, :])


@triton.jit
def _pick(a: tl.constexpr, v0, v1, v2, v3):
    """The a-th of four scalars (a is a compile-time index)."""
    if a == 0:
        r = v0
    elif a == 1:
        r = v1
    elif a == 2:
        r = v2
    else:
        r = v3
    return r


@triton.jit
def _sphere_noise_kernel(
    E,  # (R, C) fp32 noise, contiguous
    SEED,  # int seed, or pointer to a 0-dim int tensor (SEED_FROM_PTR)
    R,
    C,
    SEED_FROM_PTR: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if OFFS64:
        rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    e = _token_noise(SEED, rows, cols, C, SEED_FROM_PTR)
    tl.store(E + rows[:, None] * C + cols[None, :], e, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launch geometry and the noise-only launcher
# ----------------------------------------------------------------------------------------------------------------


def _coefficients(angles: Sequence[float], geodesic: bool, C: int) -> list[tuple[float, float]]:
    """Per angle the kernel's (P, Q) scalars: noise (tan(theta) / sqrt(C), 0); geodesic (cos, sin)."""
    out = []
    for deg in angles:
        th = math.radians(float(deg))
        out.append((math.cos(th), math.sin(th)) if geodesic else (math.tan(th) / math.sqrt(C), 0.0))
    return out


def _seed_arg(seed: int, seed_t: torch.Tensor | None):
    return (seed_t, True) if seed_t is not None else (int(seed), False)


def _launch_chunks(angles: Sequence[float], geodesic: bool, C: int):
    """Yield (first angle index, [(P, Q)] of at most _MAX_ANGLES angles), padded to four scalar pairs."""
    coef = _coefficients(angles, geodesic, C)
    for a0 in range(0, len(coef), _MAX_ANGLES):
        chunk = coef[a0 : a0 + _MAX_ANGLES]
        padded = chunk + [(0.0, 0.0)] * (_MAX_ANGLES - len(chunk))
        yield a0, len(chunk), [p for p, _ in padded], [q for _, q in padded]


def _blocks(R: int, C: int) -> tuple[int, int]:
    """Row blocks: on a GPU at most 2048 elements per program, since in-kernel Philox and up to 4 angles keep many
    values live (8192-element tiles spilled ~10 KB per thread on sm_90, `compile_check --ptxas`)."""
    return row_block(R, C, None if interpreter_enabled() else 2048)


def _noise_triton(R: int, C: int, seed: int, seed_t: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    e = torch.empty((R, C), dtype=torch.float32, device=device)
    if R * C == 0:
        return e
    BLOCK_R, BLOCK_C = _blocks(R, C)
    s, from_ptr = _seed_arg(seed, seed_t)
    _sphere_noise_kernel[(triton.cdiv(R, BLOCK_R),)](
        e, s, R, C, SEED_FROM_PTR=from_ptr, OFFS64=R * C >= 2**31, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        num_warps=row_warps(BLOCK_R, BLOCK_C),
    )
    return e


# ----------------------------------------------------------------------------------------------------------------
# PyTorch emulation of the Philox stream (the reference's noise where Triton cannot run)
# ----------------------------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85  # Philox-4x32 key increments (Weyl constants)
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 round multipliers
_PHILOX_ROUNDS = 10  # Triton's default


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` (uint32 constant times uint32 values held in int64), exactly.

    16-bit limbs keep every partial product below 2^50, so int64 never overflows.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    mid = a_hi * b_lo + a_lo * b_hi  # < 2^33
    t = ((mid & 0xFFFF) << 16) + a_lo * b_lo  # < 2^33
    return a_hi * b_hi + (mid >> 16) + (t >> 32), t & _M32


def _philox_randn_torch(offsets: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """PyTorch emulation of Triton's ``tl.randn(seed, offsets)`` (Philox-4x32-10, then Box-Muller in fp32).

    Args:
        offsets: int64 tensor of non-negative counters.
        seed: int, or 0-dim integer tensor (its 64 bits are the key).

    Returns:
        float32 tensor shaped like ``offsets``.
    """
    if isinstance(seed, torch.Tensor):
        s = seed.to(device=offsets.device, dtype=torch.int64)
        k0, k1 = s & _M32, (s >> 32) & _M32
    else:
        s = seed % 2**64
        k0, k1 = s & _M32, s >> 32
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32

    def uniform(i: torch.Tensor) -> torch.Tensor:
        i = torch.where(i >= 2**31, i - 2**32, i)  # bitcast to int32
        i = torch.where(i < 0, -i - 1, i)
        return i.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=i.device)

    u1 = torch.clamp_min(uniform(c0), 1.0e-7)
    th = torch.tensor(6.283185307179586, dtype=torch.float32, device=u1.device) * uniform(c1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(th)

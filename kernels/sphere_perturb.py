"""sphere_perturb: the MCR latent perturbation on the per-token hypersphere, every angle from ONE noise draw.

For each token z_i (last dim C) one Gaussian direction ``e_i ~ N(0, I_C)`` is drawn from a counter-based
generator (Philox, Triton's ``tl.randn(seed, offset)``, offset = token_index * C + channel) and shared by all
angles. With ``n_i = sqrt(||z_i||^2 + C * eps)`` (``= ||z_i||``; eps only keeps all-zero tokens finite):

    mode="noise"     (sphere-encoder rule)   v = z_i + tan(theta) * rms(z_i) * e_i,   z_i' = n_i * v / ||v||
                     (the angle is theta on average: for C = 32 the mean is 42.0 deg / 85.0 deg for theta =
                     42.5 / 85, per-token spread 5.9 / 10.2 deg; rms(z_i) = n_i / sqrt(C))
    mode="geodesic"  (exact rotation)        w = e_i - (e_i.z_i / n_i^2) z_i,  u = w / ||w||,
                     z_i' = cos(theta) z_i + sin(theta) n_i u

Both rules keep the norm (``||z_i'|| = ||z_i||``) and put every output in the plane spanned by z_i and e_i.

Backward (noise constant, g_a = dL/dz'_a, k_a = tan(theta_a) / sqrt(C)):
    noise:     vh = v / m, m = ||v||:  dv = (n/m)(g - vh (vh.g)),  dn += g.vh + k e.dv,  dz += dv
    geodesic:  dz += cos g,  dn += sin (g.u),  du += sin n g  (summed over angles, u is shared);
               dw = (du - u (u.du)) / ||w||,  dq = -z.dw (q = p / n^2, p = e.z),  dz += -q dw + (dq / n^2) e,
               dn += -2 p dq / n^3
    both:      dz += (dn / n) z
The noise is regenerated from the seed in the backward kernel: it is never stored.

The reference's noise (``sphere_perturb_noise``): the same Philox stream, produced by a noise-only Triton kernel
that shares the fused kernels' noise helper whenever Triton can run on the device (CUDA, or CPU under
``TRITON_INTERPRET=1``), so reference and fused op agree bit-for-bit there; elsewhere a pure-PyTorch emulation of
Triton's Philox-4x32-10 + Box-Muller (integers and uniforms bit-exact; log/cos/sqrt within float32 rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._dispatch import (
    OpSpec,
    interpreter_enabled,
    register_op,
    resolve_backend,
    tensor_bytes,
    triton_unavailable_reason,
)
from ._utils import as_rows, row_block, row_warps

__all__ = ["sphere_perturb", "sphere_perturb_ref", "sphere_perturb_noise"]

MODES = ("noise", "geodesic")
_EPS = 1e-12  # n^2 = ||z||^2 + C * eps: exact norm for real latents, finite values and gradients for zero tokens
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


@triton.jit
def _sphere_perturb_fwd_kernel(
    Z,  # (R, C) input tokens, row stride stride_z, unit column stride
    OUT,  # (NUM_ANGLES, R, C) outputs of this launch's angles, angle stride stride_oa, contiguous rows
    SEED,  # int seed, or pointer to a 0-dim int tensor (SEED_FROM_PTR)
    R,
    C,
    stride_z,
    stride_oa,
    eps,
    P0, P1, P2, P3,  # per angle: noise k = tan(theta) / sqrt(C); geodesic cos(theta)
    Q0, Q1, Q2, Q3,  # per angle: geodesic sin(theta) (unused in noise mode)
    NUM_ANGLES: tl.constexpr,
    GEODESIC: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if OFFS64:
        rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    mask = rmask[:, None] & (cols < C)[None, :]
    x = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    e = tl.where(mask, _token_noise(SEED, rows, cols, C, SEED_FROM_PTR), 0.0)
    n = tl.sqrt(tl.sum(x * x, axis=1) + C * eps)  # (BLOCK_R,) ||z_i||
    out_offs = rows[:, None] * C + cols[None, :]
    if GEODESIC:
        p = tl.sum(e * x, axis=1)
        w = e - (p / (n * n))[:, None] * x  # tangent part of e at z
        u = w / tl.where(rmask, tl.sqrt(tl.sum(w * w, axis=1)), 1.0)[:, None]  # padding rows: no 0 / 0
        for a in tl.static_range(NUM_ANGLES):
            c = _pick(a, P0, P1, P2, P3)
            s = _pick(a, Q0, Q1, Q2, Q3)
            y = c * x + (s * n)[:, None] * u
            tl.store(OUT + a * stride_oa + out_offs, y.to(OUT.dtype.element_ty), mask=mask)
    else:
        for a in tl.static_range(NUM_ANGLES):
            k = _pick(a, P0, P1, P2, P3)
            v = x + (k * n)[:, None] * e  # z + tan(theta) * rms(z) * e
            y = v * (n / tl.where(rmask, tl.sqrt(tl.sum(v * v, axis=1)), 1.0))[:, None]
            tl.store(OUT + a * stride_oa + out_offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _sphere_perturb_bwd_kernel(
    G,  # (NUM_ANGLES, R, C) upstream gradients of this launch's outputs, angle stride stride_ga, contiguous rows
    Z,  # (R, C) forward input, row stride stride_z, unit column stride
    DZ,  # (R, C) gradient of z (fp32 partial when angles span several launches), contiguous
    SEED,  # int seed, or pointer to a 0-dim int tensor (SEED_FROM_PTR)
    R,
    C,
    stride_z,
    stride_ga,
    eps,
    P0, P1, P2, P3,  # as in the forward kernel
    Q0, Q1, Q2, Q3,
    NUM_ANGLES: tl.constexpr,
    GEODESIC: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if OFFS64:
        rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    mask = rmask[:, None] & (cols < C)[None, :]
    x = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    e = tl.where(mask, _token_noise(SEED, rows, cols, C, SEED_FROM_PTR), 0.0)
    n = tl.sqrt(tl.sum(x * x, axis=1) + C * eps)
    g_offs = rows[:, None] * C + cols[None, :]
    dz = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    dn = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if GEODESIC:
        p = tl.sum(e * x, axis=1)
        q = p / (n * n)
        w = e - q[:, None] * x
        wn = tl.where(rmask, tl.sqrt(tl.sum(w * w, axis=1)), 1.0)
        u = w / wn[:, None]
        du = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for a in tl.static_range(NUM_ANGLES):
            c = _pick(a, P0, P1, P2, P3)
            s = _pick(a, Q0, Q1, Q2, Q3)
            g = tl.load(G + a * stride_ga + g_offs, mask=mask, other=0.0).to(tl.float32)
            dz += c * g
            dn += s * tl.sum(g * u, axis=1)
            du += (s * n)[:, None] * g
        dw = (du - u * tl.sum(u * du, axis=1)[:, None]) / wn[:, None]
        dq = -tl.sum(x * dw, axis=1)
        dz += -q[:, None] * dw + (dq / (n * n))[:, None] * e
        dn += -2.0 * p * dq / (n * n * n)
    else:
        for a in tl.static_range(NUM_ANGLES):
            k = _pick(a, P0, P1, P2, P3)
            g = tl.load(G + a * stride_ga + g_offs, mask=mask, other=0.0).to(tl.float32)
            v = x + (k * n)[:, None] * e
            m = tl.where(rmask, tl.sqrt(tl.sum(v * v, axis=1)), 1.0)
            vh = v / m[:, None]
            dv = (n / m)[:, None] * (g - vh * tl.sum(vh * g, axis=1)[:, None])
            dz += dv
            dn += tl.sum(g * vh, axis=1) + k * tl.sum(e * dv, axis=1)
    dz += (dn / n)[:, None] * x
    tl.store(DZ + g_offs, dz.to(DZ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
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


def _fwd(z: torch.Tensor, angles: Sequence[float], seed: int, seed_t: torch.Tensor | None, geodesic: bool):
    x, R, C = as_rows(z)
    A = len(angles)
    out = torch.empty((A, R, C), dtype=z.dtype, device=z.device)
    if R * C == 0:
        return out.view(A, *z.shape)
    BLOCK_R, BLOCK_C = _blocks(R, C)
    s, from_ptr = _seed_arg(seed, seed_t)
    big = R * max(C, x.stride(0)) >= 2**31
    for a0, na, P, Q in _launch_chunks(angles, geodesic, C):
        _sphere_perturb_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](
            x, out[a0:], s, R, C, x.stride(0), R * C, _EPS, *P, *Q,
            NUM_ANGLES=na, GEODESIC=geodesic, SEED_FROM_PTR=from_ptr, OFFS64=big,
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=row_warps(BLOCK_R, BLOCK_C),
        )  # fmt: skip
    return out.view(A, *z.shape)


def _bwd(g: torch.Tensor, z: torch.Tensor, angles: Sequence[float], seed: int, seed_t: torch.Tensor | None,
         geodesic: bool) -> torch.Tensor:  # fmt: skip
    x, R, C = as_rows(z)
    A = len(angles)
    g = g.reshape(A, R, C).contiguous()
    if R * C == 0:
        return torch.zeros_like(z)
    BLOCK_R, BLOCK_C = _blocks(R, C)
    s, from_ptr = _seed_arg(seed, seed_t)
    big = R * max(C, x.stride(0)) >= 2**31
    chunks = list(_launch_chunks(angles, geodesic, C))
    parts = []
    for a0, na, P, Q in chunks:
        dz = torch.empty((R, C), dtype=z.dtype if len(chunks) == 1 else torch.float32, device=z.device)
        _sphere_perturb_bwd_kernel[(triton.cdiv(R, BLOCK_R),)](
            g[a0:], x, dz, s, R, C, x.stride(0), R * C, _EPS, *P, *Q,
            NUM_ANGLES=na, GEODESIC=geodesic, SEED_FROM_PTR=from_ptr, OFFS64=big,
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=row_warps(BLOCK_R, BLOCK_C),
        )  # fmt: skip
        parts.append(dz)
    dz = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0).to(z.dtype)
    return dz.view(z.shape)


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (one op each way, with fake implementations and autograd)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("pae_fast::sphere_perturb", mutates_args=())
def _sphere_perturb_op(
    z: torch.Tensor, angles: list[float], seed: int, seed_t: torch.Tensor | None, geodesic: bool
) -> torch.Tensor:
    return _fwd(z, angles, seed, seed_t, geodesic)


@_sphere_perturb_op.register_fake
def _(z, angles, seed, seed_t, geodesic):
    return z.new_empty((len(angles), *z.shape))


@torch.library.custom_op("pae_fast::sphere_perturb_backward", mutates_args=())
def _sphere_perturb_backward_op(
    g: torch.Tensor, z: torch.Tensor, angles: list[float], seed: int, seed_t: torch.Tensor | None, geodesic: bool
) -> torch.Tensor:
    return _bwd(g, z, angles, seed, seed_t, geodesic)


@_sphere_perturb_backward_op.register_fake
def _(g, z, angles, seed, seed_t, geodesic):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    z, angles, seed, seed_t, geodesic = inputs
    ctx.save_for_backward(z, seed_t)
    ctx.angles, ctx.seed, ctx.geodesic = list(angles), seed, geodesic


def _backward(ctx, g):
    z, seed_t = ctx.saved_tensors
    dz = _sphere_perturb_backward_op(g, z, ctx.angles, ctx.seed, seed_t, ctx.geodesic)
    return dz, None, None, None, None


_sphere_perturb_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _check_args(z: torch.Tensor, angles_deg: Sequence[float], seed: int | torch.Tensor, mode: str) -> list[float]:
    """Validate the arguments; returns the angles as a list of floats."""
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(f"sphere_perturb: z must be a floating-point tensor (..., C), got {type(z).__name__}"
                        + (f" of dtype {z.dtype}" if isinstance(z, torch.Tensor) else ""))  # fmt: skip
    if z.dim() < 1 or z.shape[-1] < 2:
        raise ValueError(f"sphere_perturb: z must have shape (..., C) with C >= 2 channels, got {tuple(z.shape)}")
    if mode not in MODES:
        raise ValueError(f"sphere_perturb: unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if isinstance(angles_deg, (int, float)) or len(angles_deg) == 0:
        raise ValueError(f"sphere_perturb: angles_deg must be a non-empty sequence of degrees, got {angles_deg!r}")
    angles = [float(a) for a in angles_deg]
    hi = 90.0 if mode == "noise" else 180.0
    for a in angles:
        if not (0.0 <= a < hi or (mode == "geodesic" and a == hi)):
            rng = "[0, 90) (tan(theta) must be finite)" if mode == "noise" else "[0, 180]"
            raise ValueError(f"sphere_perturb: angle {a} deg out of range for mode={mode!r}; expected {rng}")
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise ValueError(
                f"sphere_perturb: a tensor seed must be a 0-dim integer tensor, got shape {tuple(seed.shape)} "
                f"dtype {seed.dtype}"
            )
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"sphere_perturb: seed must be an int or a 0-dim integer tensor, got {type(seed).__name__}")
    elif not -(2**63) <= seed < 2**63:
        raise ValueError(f"sphere_perturb: seed {seed} does not fit in 64 signed bits")
    return angles


def sphere_perturb(
    z: torch.Tensor,
    angles_deg: Sequence[float] = (42.5, 85.0),
    seed: int | torch.Tensor = 0,
    mode: str = "noise",
    backend: str | None = None,
) -> tuple[torch.Tensor, ...]:
    """Perturb every token of ``z`` by each angle, all angles from ONE shared noise draw per token.

    Args:
        z: ``(..., C)`` latent tokens, channels last (C >= 2; any leading dims, any strides).
        angles_deg: perturbation angles theta in degrees (MCR: medium 42.5, large 85). ``mode="noise"``:
            ``0 <= theta < 90``; ``mode="geodesic"``: ``0 <= theta <= 180``.
        seed: the Philox key: a Python int (any int64 value), or a 0-dim integer tensor (its int64 value; keep it on
            z's device: the kernel reads it there, so changing it per step needs no host sync, no recompilation
            under ``torch.compile`` and works inside CUDA graphs). The noise of token r (flattened leading dims,
            row-major) channel c is ``tl.randn(seed, r * C + c)``: same seed, same noise on every call and backend.
        mode: ``"noise"`` (``z' = f(z + tan(theta) rms(z) e)``, f rescales to ||z||; theta on average) or
            ``"geodesic"`` (rotation by exactly theta towards the tangent part of e).
        backend: ``auto | triton | torch`` (None: the scope / process default).

    Returns:
        One ``(..., C)`` tensor per angle in ``z.dtype`` (computed in fp32), each with the norm of z per token;
        all outputs of a token lie in the plane of z_i and its noise e_i. Differentiable w.r.t. z (the noise is
        a constant).
    """
    angles = _check_args(z, angles_deg, seed, mode)
    if resolve_backend(backend, z) == "torch":
        return sphere_perturb_ref(z, angles, seed, mode)
    if isinstance(seed, torch.Tensor):
        seed_t, seed_i = seed.to(device=z.device, dtype=torch.int64), 0
    else:
        seed_t, seed_i = None, seed
    return tuple(_sphere_perturb_op(z, angles, seed_i, seed_t, mode == "geodesic").unbind(0))


# ----------------------------------------------------------------------------------------------------------------
# Reference (the spec, the CPU path and the fallback) and its noise
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


def sphere_perturb_noise(
    shape: Sequence[int], seed: int | torch.Tensor = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """The noise ``e`` that :func:`sphere_perturb` draws for tokens of shape ``(..., C)``, as fp32.

    Made by a noise-only Triton kernel (bit-identical to the fused kernels' in-register noise) when Triton can
    run on ``device``, else by the PyTorch emulation of the same Philox stream.
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    C = shape[-1]
    R = math.prod(shape[:-1])
    seed_t = seed.to(device=device, dtype=torch.int64) if isinstance(seed, torch.Tensor) else None
    if device.type != "meta" and triton_unavailable_reason(device) is None:
        return _noise_triton(R, C, 0 if seed_t is not None else seed, seed_t, device).view(shape)
    offsets = torch.arange(R * C, dtype=torch.int64, device=device)
    return _philox_randn_torch(offsets, seed_t if seed_t is not None else seed).view(shape)


def sphere_perturb_ref(
    z: torch.Tensor,
    angles_deg: Sequence[float] = (42.5, 85.0),
    seed: int | torch.Tensor = 0,
    mode: str = "noise",
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """PyTorch reference of :func:`sphere_perturb` (fp32 math for half inputs; fp64 stays fp64).

    ``noise``: an explicit ``(..., C)`` noise tensor instead of the seeded draw (e.g. to gradcheck with it fixed).
    """
    angles = _check_args(z, angles_deg, seed, mode)
    x = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    if noise is None:
        noise = sphere_perturb_noise(z.shape, seed, z.device)
    elif noise.shape != z.shape:
        raise ValueError(f"sphere_perturb_ref: noise must have z's shape {tuple(z.shape)}, got {tuple(noise.shape)}")
    e = noise.to(x.dtype)
    C = z.shape[-1]
    n = torch.sqrt(x.pow(2).sum(-1, keepdim=True) + C * _EPS)  # ||z_i||
    outs = []
    for deg in angles:
        th = math.radians(deg)
        if mode == "noise":
            v = x + math.tan(th) * (n / math.sqrt(C)) * e  # z + tan(theta) * rms(z) * e
            y = n * v / v.norm(dim=-1, keepdim=True)
        else:
            w = e - (e * x).sum(-1, keepdim=True) / n.pow(2) * x
            u = w / w.norm(dim=-1, keepdim=True)
            y = math.cos(th) * x + math.sin(th) * n * u
        outs.append(y.to(z.dtype))
    return tuple(outs)


# ----------------------------------------------------------------------------------------------------------------
# Op table entry: traffic floor and test cases
# ----------------------------------------------------------------------------------------------------------------


def _num_angles(args: tuple, kwargs: dict) -> int:
    return len(kwargs.get("angles_deg", args[1] if len(args) > 1 else (42.5, 85.0)))


def _min_bytes(args: tuple, kwargs: dict, backward: bool) -> int:
    z, A = args[0], _num_angles(args, kwargs)
    fwd = (1 + A) * tensor_bytes(z)  # read z, write one output per angle (the noise is generated in registers)
    bwd = (2 + A) * tensor_bytes(z)  # read z and one upstream gradient per angle, write dz
    return fwd + (bwd if backward else 0)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)

    shapes = [(32, 256, 32), (8, 256, 768)] if size == "model" else [(2, 257, 32), (3, 5, 33)]
    out = []
    for shp in shapes:
        for mode in MODES:
            out.append((f"{shp} {mode}", (rnd(*shp),), {"seed": 3, "mode": mode}))
    x = rnd(33, 2, 40)
    out.append(("non-contiguous (2,33,40) noise", (x.transpose(0, 1),), {"seed": 5}))
    seed_t = torch.tensor(2**40 + 7, device=device)
    out.append(("tensor seed, 3 angles geodesic", (rnd(4, 17, 32),),
                {"angles_deg": (10.0, 42.5, 85.0), "seed": seed_t, "mode": "geodesic"}))  # fmt: skip
    return out


register_op(
    OpSpec(
        name="sphere_perturb",
        fn=sphere_perturb,
        ref=sphere_perturb_ref,
        min_bytes=_min_bytes,
        cases=_cases,
        description="MCR hypersphere perturbation: one in-kernel Philox draw per token, one output per angle",
    )
)

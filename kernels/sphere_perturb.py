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
The noise stream and the launch geometry shared by the kernels live in :mod:`._sphere_perturb_common`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch._guards import detect_fake_mode

from ._dispatch import OpSpec, register_op, resolve_backend, tensor_bytes, triton_unavailable_reason
from ._sphere_perturb_common import (
    _blocks,
    _launch_chunks,
    _noise_triton,
    _philox_randn_torch,
    _pick,
    _seed_arg,
    _token_noise,
)
from ._utils import as_rows, row_warps

__all__ = ["sphere_perturb", "sphere_perturb_ref", "sphere_perturb_noise"]

MODES = ("noise", "geodesic")
_EPS = 1e-12  # n^2 = ||z||^2 + C * eps: exact norm for real latents, finite values and gradients for zero tokens


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


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
    # a real launch needs real memory: meta and fake tensors (counting, tracing) take the emulation
    if device.type != "meta" and detect_fake_mode() is None and triton_unavailable_reason(device) is None:
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

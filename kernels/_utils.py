"""Small helpers shared by the kernel launchers (layout and block sizes)."""

from __future__ import annotations

import torch
import triton

from ._dispatch import interpreter_enabled

__all__ = ["as_rows", "row_block", "row_warps", "fp32_scalar"]


def as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """View ``x (..., C)`` as ``(R, C)`` rows with unit column stride (copies only when no such view exists)."""
    C = x.shape[-1]
    R = x.numel() // C if C else 0
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        rows = x.view(R, C)
    except RuntimeError:
        rows = x.reshape(R, C)
    if rows.stride(1) != 1 or (R > 1 and rows.stride(0) < C):
        rows = rows.contiguous()
    return rows, R, C


def row_block(R: int, C: int, max_elems: int | None = None) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for row-wise kernels: the whole row in one block, as many rows as fit ``max_elems``.

    Under the interpreter programs run one at a time, so blocks are made larger to cut the program count.
    """
    BLOCK_C = triton.next_power_of_2(max(C, 1))
    if max_elems is None:
        max_elems = 65536 if interpreter_enabled() else 8192
    BLOCK_R = max(1, min(triton.next_power_of_2(max(R, 1)), max_elems // BLOCK_C))
    return BLOCK_R, BLOCK_C


def row_warps(BLOCK_R: int, BLOCK_C: int) -> int:
    """Warps for a row-block program: about 32 fp32 elements of each live tile per thread, 4 to 16 warps.

    Fewer warps leave 64+ elements per thread and spill registers (ptxas, sm_90; see ``compile_check --ptxas``).
    """
    return max(4, min(16, triton.next_power_of_2(BLOCK_R * BLOCK_C) // 1024))


def fp32_scalar(v: float) -> float:
    """Python float for a kernel scalar argument (Triton passes Python floats as fp32)."""
    return float(v)

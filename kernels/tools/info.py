"""``python -m pae_fast.kernels.info``: every fused op, its backends, and why any backend is unavailable."""

from __future__ import annotations

import argparse
import os

import torch


def op_table() -> list[dict]:
    """One row per registered op: name, description, {backend: reason or None}."""
    from pae_fast import kernels

    rows = []
    for name, spec in sorted(kernels.OPS.items()):
        rows.append({"op": name, "description": spec.description, "backends": spec.available_backends()})
    return rows


def format_table(rows: list[dict]) -> str:
    from pae_fast.kernels import current_backend, interpreter_enabled

    lines = [
        f"kernel backend in force: {current_backend()} (env PAE_FAST_KERNEL_BACKEND="
        f"{os.environ.get('PAE_FAST_KERNEL_BACKEND', '<unset>')}); "
        f"CUDA: {torch.cuda.is_available()}; TRITON_INTERPRET: {interpreter_enabled()}",
        "",
    ]
    w = max((len(r["op"]) for r in rows), default=4)
    for r in rows:
        avail = [b for b, why in r["backends"].items() if why is None]
        lines.append(f"{r['op']:<{w}}  available: {', '.join(avail) or '-':<32} {r['description']}")
        for b, why in r["backends"].items():
            if why is not None:
                lines.append(f"{'':<{w}}    {b}: unavailable: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m pae_fast.kernels.info", description=__doc__).parse_args(argv)
    print(format_table(op_table()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

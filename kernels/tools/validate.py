"""``python -m pae_fast.kernels.validate``: every fused op against its reference on this device.

On CUDA: the compiled Triton kernels in fp32, fp16 and bf16 at small and model sizes. On CPU: the Triton
interpreter (``TRITON_INTERPRET=1``, set automatically when this module starts without CUDA) in fp32 and fp16 at
small sizes. Forward outputs and every gradient are compared with the reference evaluated in fp64; the table lists
the worst errors against the op's tolerances. Exit status 1 when anything is out of tolerance.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[name]


def run(ops: list[str] | None, dtypes: list[str], size: str, device: str, verbose: bool) -> list[dict]:
    import torch

    from pae_fast import kernels
    from pae_fast.kernels.tools.testing import compare_op

    dev = torch.device(device)
    rows = []
    names = ops or sorted(kernels.OPS)
    for name in names:
        if name not in kernels.OPS:
            raise SystemExit(f"unknown op {name!r}; valid: {', '.join(sorted(kernels.OPS))}")
        spec = kernels.OPS[name]
        if "triton" not in spec.available_backends():
            continue
        for dt_name in dtypes:
            dt = _dtype(dt_name)
            atol, rtol = spec.tolerances.get(dt, (1e-3, 1e-3))
            for label, args, kwargs in spec.cases(size, dev, dt):
                t0 = time.perf_counter()
                try:
                    res = compare_op(
                        spec.fn, spec.ref, args, kwargs, atol=atol, rtol=rtol, name=f"{name} {label} {dt_name}",
                        ref_dtype=torch.float64, atol_rms=spec.atol_rms,
                    )
                    err = None
                except Exception as e:  # a crash is a failure of that case, reported like a mismatch
                    res, err = None, f"{type(e).__name__}: {e}"
                dt_s = time.perf_counter() - t0
                row = {
                    "op": name, "case": label, "dtype": dt_name, "seconds": dt_s,
                    "ok": bool(res is not None and res.ok),
                    "max_abs": max((r.max_abs for r in res.rows), default=0.0) if res else float("nan"),
                    "atol": atol, "rtol": rtol, "error": err, "report": res.report() if res else err,
                }  # fmt: skip
                rows.append(row)
                if verbose or not row["ok"]:
                    print(row["report"], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pae_fast.kernels.validate", description=__doc__)
    p.add_argument("--ops", nargs="*", help="ops to check (default: all)")
    p.add_argument("--dtypes", nargs="*", help="fp32 fp16 bf16 (default: by device)")
    p.add_argument("--size", choices=["small", "model"], help="case sizes (default: model on CUDA, small on CPU)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every comparison, not only failures")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
        # Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when pae_fast.kernels was imported (before
        # this function ran): start again in a fresh process with the interpreter on.
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pae_fast.kernels.validate", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.call(cmd, env=env)

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    dtypes = a.dtypes or (["fp32", "fp16", "bf16"] if on_cuda else ["fp32", "fp16"])
    if not on_cuda and "bf16" in dtypes:
        raise SystemExit("bf16 cannot be validated on CPU: the Triton interpreter has no bf16")
    size = a.size or ("model" if on_cuda else "small")
    rows = run(a.ops, dtypes, size, device, a.verbose)
    print(f"\n{'op':<22} {'case':<34} {'dtype':<5} {'max|err|':>10} {'atol':>8} {'time':>7}  result")
    for r in rows:
        print(
            f"{r['op']:<22} {r['case'][:34]:<34} {r['dtype']:<5} {r['max_abs']:>10.2e} {r['atol']:>8.1e} "
            f"{r['seconds']:>6.2f}s  {'ok' if r['ok'] else 'FAIL'}"
        )
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

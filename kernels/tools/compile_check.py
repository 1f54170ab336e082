"""``python -m pae_fast.kernels.tools.compile_check``: compile every Triton kernel launch of every op for a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what a kernel computes, but not that it compiles: it never builds
Triton IR, so type errors, unsupported bf16 ops, bad ``tl.dot`` shapes or register spills only show on a GPU. This tool
closes that gap on any machine:

1. record (a subprocess under the interpreter): every op of :data:`pae_fast.kernels.OPS` runs its "small" and "model"
   cases, forward and backward, in fp32, fp16 and bf16, with ``backend="triton"`` and the GPU block-size heuristics;
   kernel launches are recorded (kernel, argument types, constexpr values, ``num_warps``) but not executed, so model
   sizes and bf16 cost nothing; an autotuned kernel (``triton.autotune``, e.g. ``swiglu_mlp``'s GEMMs) records one
   launch per config, so every config it may pick on a GPU is compiled;
2. compile (a subprocess without the interpreter): each distinct launch goes through ``triton.compile`` for
   ``cuda:<arch>`` (Triton IR -> LLVM -> PTX -> cubin with the ptxas bundled with triton), and ``ptxas -v`` reports
   registers and spills.

Exit status 1 when any launch fails to compile. ``--max-launches`` bounds the work (the CI test compiles a few).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

_TRITON_DTYPES = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64", "int32": "i32",
    "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
}  # fmt: skip
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


# ----------------------------------------------------------------------------------------------------------------
# Phase 1: record launches under the interpreter (nothing is executed)
# ----------------------------------------------------------------------------------------------------------------


def _describe(value: Any) -> dict[str, Any]:
    import torch

    if isinstance(value, torch.Tensor):
        # the JIT specializes pointers aligned to 16 bytes (and ints divisible by 16, below): a GEMM's loads become
        # pipelined async copies only with that knowledge, so the compile here must see it too
        return {"kind": "tensor", "dtype": _TRITON_DTYPES[str(value.dtype).replace("torch.", "")],
                "div16": value.data_ptr() % 16 == 0}  # fmt: skip
    if isinstance(value, bool):
        return {"kind": "bool", "value": value}
    if isinstance(value, int):
        return {"kind": "int", "value": value, "div16": value % 16 == 0}
    if isinstance(value, float):
        return {"kind": "float", "value": value}
    if value is None:
        return {"kind": "none"}
    return {"kind": "other", "value": repr(value)}


def record_launches(ops: list[str] | None, sizes: list[str], dtypes: list[str]) -> list[dict[str, Any]]:
    """Run the ops' cases with launches recorded instead of executed (needs ``TRITON_INTERPRET=1``)."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    from pae_fast import kernels
    from pae_fast.kernels.tools.testing import flatten_tensors

    launches: list[dict[str, Any]] = []
    current: dict[str, str] = {}

    def record(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        launches.append({
            "module": self.fn.__module__, "kernel": self.fn.__qualname__, "op": current.get("op"),
            "case": current.get("case"), "args": {n: _describe(bound[n]) for n in names if n in bound},
            "options": {k: v for k, v in kwargs.items() if k in _OPTIONS},
        })  # fmt: skip

    # GPU block sizes: modules pick larger blocks under the interpreter; make them pick the GPU's.
    for name in list(sys.modules):
        mod = sys.modules[name]
        ours = name.startswith("pae_fast.kernels.") and not name.endswith("._dispatch")
        if ours and getattr(mod, "interpreter_enabled", None) is kernels.interpreter_enabled:
            mod.interpreter_enabled = lambda: False
    def record_every_config(self, *args, **kwargs):  # instead of timing the configs (needs a GPU)
        for config in self.configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    original, original_tuned = InterpretedFunction.run, Autotuner.run
    InterpretedFunction.run, Autotuner.run = record, record_every_config
    try:
        dev = torch.device("cpu")
        for op in ops or sorted(kernels.OPS):
            spec = kernels.OPS[op]
            for size in sizes:
                for dt_name in dtypes:
                    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt_name]
                    for label, args, kw in spec.cases(size, dev, dt):
                        current.update(op=op, case=f"{label} {dt_name}")
                        outs = [o for o in flatten_tensors(spec.fn(*args, **kw, backend="triton"))
                                if o.requires_grad and o.is_floating_point()]
                        leaves = [t for t in flatten_tensors(list(args) + list(kw.values())) if t.requires_grad]
                        if outs and leaves:
                            torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs], allow_unused=True)
    finally:
        InterpretedFunction.run, Autotuner.run = original, original_tuned
    return launches


def _dedupe(launches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for rec in launches:
        key = json.dumps({k: rec[k] for k in ("module", "kernel", "options")}, sort_keys=True) + json.dumps(
            {n: (a["kind"], a.get("dtype"), a.get("value") if a["kind"] in ("bool", "none") else None)
             for n, a in rec["args"].items()}, sort_keys=True)  # fmt: skip
        const_key = json.dumps({n: a.get("value") for n, a in rec["args"].items()}, sort_keys=True)
        full = key + const_key
        if full not in seen:
            seen.add(full)
            out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Phase 2: compile for a GPU target (no interpreter)
# ----------------------------------------------------------------------------------------------------------------


def _signature(jit_fn: Any, rec: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Triton signature (name -> type string) and constexprs of one recorded launch (see :func:`_attrs`)."""
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    for p in jit_fn.params:
        a = rec["args"].get(p.name)
        if a is None:  # a defaulted argument
            default = inspect.signature(jit_fn.fn).parameters[p.name].default
            a = _describe(default)
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[p.name] = a.get("value")
        elif a["kind"] == "tensor":
            sig[p.name] = "*" + a["dtype"]
        elif a["kind"] == "int":
            sig[p.name] = "i32" if -(2**31) <= a["value"] < 2**31 else "i64"
        elif a["kind"] == "float":
            sig[p.name] = "fp32"  # Triton passes Python floats as fp32
        elif a["kind"] == "bool":
            sig[p.name] = "i1"
        elif a["kind"] == "none":
            sig[p.name] = "constexpr"
            consts[p.name] = None
        else:
            raise TypeError(f"{rec['kernel']}: cannot type argument {p.name}={a}")
    return sig, consts


def _attrs(jit_fn: Any, rec: dict[str, Any]) -> dict[tuple[int, ...], list]:
    """``tt.divisibility`` 16 of the pointer and int arguments the JIT would specialize (16-byte aligned pointers,
    ints divisible by 16), as ``ASTSource(attrs=...)`` takes them."""
    out = {}
    for i, p in enumerate(jit_fn.params):
        a = rec["args"].get(p.name)
        if not p.is_constexpr and a is not None and a.get("div16") and not getattr(p, "do_not_specialize", False):
            out[(i,)] = [["tt.divisibility", 16]]
    return out


def compile_launches(launches: list[dict[str, Any]], arch: int, ptxas: bool) -> list[dict[str, Any]]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    target = GPUTarget("cuda", arch, 32)
    results = []
    for rec in launches:
        row = {k: rec[k] for k in ("op", "case", "kernel")}
        row["options"] = rec["options"]
        t0 = time.perf_counter()
        try:
            jit_fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
            sig, consts = _signature(jit_fn, rec)
            src = ASTSource(fn=jit_fn, signature=sig, constexprs=consts, attrs=_attrs(jit_fn, rec))
            compiled = triton.compile(src, target=target, options=dict(rec["options"]))
            row.update(ok=True, error=None, shared_bytes=compiled.metadata.shared)
            if ptxas and os.path.exists(ptxas_bin):
                row.update(_ptxas_stats(ptxas_bin, compiled.asm["ptx"], arch))
        except Exception as e:  # a compile failure is this tool's finding, reported per launch
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        row["seconds"] = time.perf_counter() - t0
        row["row_lane_waste"] = row_lane_waste(rec)
        if row.get("registers", -1) > 0:
            row["blocks_per_sm"] = blocks_per_sm(row["registers"], int(rec["options"].get("num_warps", 4)),
                                                 int(row.get("shared_bytes") or 0))  # fmt: skip
        results.append(row)
    return results


def blocks_per_sm(registers: int, num_warps: int, shared_bytes: int = 0) -> int:
    """Resident blocks per SM on sm_90: 64K registers (allocated per warp in units of 256, i.e. 8 per thread),
    64 warps, 32 blocks and 227 KB of shared memory per SM."""
    regs_per_warp = -(-registers // 8) * 8 * 32
    by_regs = 65536 // (regs_per_warp * num_warps)
    by_warps = 64 // num_warps
    by_smem = (227 * 1024) // shared_bytes if shared_bytes else 32
    return max(0, min(by_regs, by_warps, by_smem, 32))


def row_lane_waste(rec: dict[str, Any]) -> float | None:
    """Share of padding lanes in a row kernel's column tiles: ``1 - D / (BLOCK_C + BLOCK_C2)`` for kernels that
    hold whole rows of width ``D`` (None for other kernels)."""
    args = rec.get("args", {})

    def val(name: str) -> int | None:
        a = args.get(name)
        return a.get("value") if a and a.get("kind") == "int" else None

    d, c, c2 = val("D"), val("BLOCK_C"), val("BLOCK_C2") or 0
    if not d or not c:
        return None
    return max(0.0, 1.0 - d / (c + c2))


def _ptxas_stats(ptxas_bin: str, ptx: str, arch: int) -> dict[str, int]:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas_bin, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", f.name, "-o",
                              os.devnull], capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        os.unlink(f.name)
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", out.stderr)]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", out.stderr)]
    return {"registers": max(regs, default=-1), "spill_bytes": max(spills, default=0)}


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def _phase(argv: list[str], interpret: bool) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-m", "pae_fast.kernels.tools.compile_check", *argv], env=env,
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"compile_check phase {argv[0]} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(ops: list[str] | None, sizes: list[str], dtypes: list[str], arch: int, ptxas: bool,
        max_launches: int | None) -> list[dict[str, Any]]:  # fmt: skip
    """Record the launches, then compile the distinct ones; returns one row per compiled launch."""
    rec_args = ["--_record", "--sizes", *sizes, "--dtypes", *dtypes] + (["--ops", *ops] if ops else [])
    launches = _dedupe(_phase(rec_args, interpret=True))
    if max_launches is not None:
        launches = launches[:max_launches]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(launches, f)
    try:
        return _phase(["--_compile", f.name, "--arch", str(arch)] + (["--ptxas"] if ptxas else []), interpret=False)
    finally:
        os.unlink(f.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pae_fast.kernels.tools.compile_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--ops", nargs="*", help="ops to check (default: all)")
    p.add_argument("--sizes", nargs="*", default=["small", "model"], choices=["small", "model"])
    p.add_argument("--dtypes", nargs="*", default=["fp32", "fp16", "bf16"], choices=["fp32", "fp16", "bf16"])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200, 80 = A100)")
    p.add_argument("--ptxas", action="store_true", help="also report registers and spills (ptxas -v)")
    p.add_argument("--max-launches", type=int, help="compile at most this many distinct launches")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--_record", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_compile", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._record:
        from pae_fast import kernels

        unknown = [o for o in a.ops or [] if o not in kernels.OPS]
        if unknown:
            raise SystemExit(f"unknown op(s) {unknown}; valid: {', '.join(sorted(kernels.OPS))}")
        print(json.dumps(record_launches(a.ops, a.sizes, a.dtypes)))
        return 0
    if a._compile:
        with open(a._compile) as f:
            print(json.dumps(compile_launches(json.load(f), a.arch, a.ptxas)))
        return 0
    rows = run(a.ops, a.sizes, a.dtypes, a.arch, a.ptxas, a.max_launches)
    print(f"{'kernel':<40} {'op case':<58} {'warps':>5} {'regs':>5} {'spill':>6} {'blk/SM':>6} {'waste':>6}  result")
    for r in rows:
        warps, regs, spill = r["options"].get("num_warps", "-"), r.get("registers", "-"), r.get("spill_bytes", "-")
        waste = "-" if r.get("row_lane_waste") is None else f"{r['row_lane_waste']:.0%}"
        print(f"{r['kernel'][:40]:<40} {(str(r['op']) + ' ' + str(r['case']))[:58]:<58} {warps!s:>5} {regs!s:>5} "
              f"{spill!s:>6} {r.get('blocks_per_sm', '-')!s:>6} {waste:>6}  "
              f"{'ok' if r['ok'] else 'FAIL ' + str(r['error'])}")  # fmt: skip
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)} passed, {len(bad)} failed (sm_{a.arch}, distinct launches)")
    if a.json:
        from pae_fast.io import atomic_write_text

        atomic_write_text(a.json, json.dumps(rows, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

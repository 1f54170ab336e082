"""The branch-bias fold of gated_residual_adaln, the two-tile forward geometry of both adaLN ops, and their op-boundary
traffic against the floor (docs/method.md § Gated-residual bias fold)."""

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from pae_fast.kernels import OPS, adaln_modulate, gated_residual_adaln, gated_residual_adaln_ref
from pae_fast.kernels import _adaln_common as common
from pae_fast.kernels.tools.testing import assert_op_matches


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_(True)


@pytest.mark.parametrize("gate_kind", ["sample", "token"])
def test_folded_bias_equals_the_biased_linear(gate_kind):
    """x + gate * linear(o, W, b) == the fold (linear without b, b into the op): outputs and every gradient."""
    B, N, K, D = 2, 9, 24, 40
    o, W, b, x = rnd(B, N, K), rnd(D, K, scale=0.2), rnd(D), rnd(B, N, D)
    gate = rnd(*((B, D) if gate_kind == "sample" else (B, N, D)))
    shift, scale, w = rnd(B, D), rnd(B, N, D, scale=0.5), rnd(D)
    leaves = (o, W, b, x, gate, shift, scale, w)
    ups = (torch.randn(B, N, D), torch.randn(B, N, D))

    folded = gated_residual_adaln(x, F.linear(o, W), gate, shift, scale, w, backend="triton", bias=b)
    plain = gated_residual_adaln_ref(x, F.linear(o, W, b), gate, shift, scale, w)
    for a, e in zip(folded, plain):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    for a, e in zip(torch.autograd.grad(folded, leaves, ups), torch.autograd.grad(plain, leaves, ups)):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bias_gradient_is_the_column_sum_of_dy(dtype):
    B, N, D = 2, 5, 72
    x, y, gate, scale, bias = rnd(B, N, D, dtype=dtype), rnd(B, N, D, dtype=dtype), rnd(B, N, D, dtype=dtype), \
        rnd(B, D, dtype=dtype), rnd(D, dtype=dtype)  # fmt: skip
    r, h = gated_residual_adaln(x, y, gate, None, scale, backend="triton", bias=bias)
    dy, db = torch.autograd.grad(r.float().sum() + (h.float() * torch.linspace(-1, 1, D)).sum(), (y, bias))
    assert db.dtype == dtype and db.shape == (D,)
    # the kernel sums the fp32 dy before rounding it: compare against the rounded dy's sum at its precision
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(db.float(), dy.float().sum((0, 1)), atol=atol, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autocast_layout_fp32_master_bias(dtype):
    """Under autocast the linear's output is half while its bias stays an fp32 master parameter."""
    B, N, D = 2, 6, 40
    args = (rnd(B, N, D), rnd(B, N, D, dtype=dtype), rnd(B, D, dtype=dtype), rnd(B, D, dtype=dtype),
            rnd(B, D, dtype=dtype))  # fmt: skip
    atol, rtol = OPS["gated_residual_adaln"].tolerances[dtype]
    res = assert_op_matches(gated_residual_adaln, gated_residual_adaln_ref, args,
                            {"weight": rnd(D), "bias": rnd(D), "out_dtype": dtype}, atol=atol, rtol=rtol,
                            ref_dtype=torch.float64)  # fmt: skip
    assert res.ok


def test_forward_kernels_split_the_row_into_two_power_of_two_tiles():
    """At the model widths no forward lane idles (one 2048-wide tile left 44 % of them idle at 1152); 2 rows of
    ~2048-4096 elements per program at 8 warps (registers and blocks per SM: ``compile_check --ptxas``)."""
    with mock.patch.object(common, "interpreter_enabled", return_value=False):
        assert common.fwd_blocks(256, 1152) == (2, 1024, 128, 8)
        assert common.fwd_blocks(256, 2048) == (2, 2048, 0, 8)
        assert common.fwd_blocks(256, 384) == (8, 256, 128, 8)
        assert common.fwd_blocks(3, 1152)[0] == 2 and common.fwd_blocks(1, 1152)[0] == 1
    assert common.col_tiles(33) == (32, 16) and common.col_tiles(1984) == (2048, 0) and common.col_tiles(16) == (16, 0)
    for D in (1152, 2048, 768, 1024, 384, 1536):
        c, c2 = common.col_tiles(D)
        assert c + c2 >= D and 1 - D / (c + c2) <= 0.25


@pytest.mark.parametrize("D", [40, 1152])
def test_adaln_modulate_two_tile_forward_matches_reference(D):
    from pae_fast.kernels import adaln_modulate_ref

    B, N = 2, 3
    args = (rnd(B, N, D, scale=2.0), rnd(B, N, D, scale=0.5), rnd(B, D, scale=0.5))
    for norm, kw in (("rms", {"weight": rnd(D)}), ("layer", {})):
        assert_op_matches(adaln_modulate, adaln_modulate_ref, args, {"norm": norm, **kw}, atol=1e-4, rtol=1e-5,
                          ref_dtype=torch.float64)  # fmt: skip


def test_model_cases_move_exactly_their_floor():
    """Counted at the op boundary (meta device, bf16): forward + backward of both adaLN ops equal ``min_bytes`` (the
    backward ops are told the shift's kind and dtype instead of reading a per-token shift they do not use)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from roofline_step import op_traffic

    for name in ("gated_residual_adaln", "adaln_modulate"):
        rows = [r for r in op_traffic(OPS[name]) if "(32,256," in r["case"]]
        assert rows and all("error" not in r for r in rows), rows
        for r in rows:
            assert r["fused_bytes"] == r["min_bytes"], r


def test_r_written_and_x_reread_are_in_the_floor():
    """Why 10 row-tensors per call is the floor (not 8): r is an output the next block reads, and the backward needs
    r = x + gate * (y + b) for the norm and y for dgate, so it reads x and y besides dr and dh."""
    B, N, D = 32, 256, 1152
    meta = {"device": "meta", "dtype": torch.bfloat16}
    x, y = torch.empty(B, N, D, **meta), torch.empty(B, N, D, **meta)
    m, w = torch.empty(B, D, **meta), torch.empty(D, **meta)
    row = x.numel() * 2
    # gate/shift/scale/weight/bias read in forward, gate/scale/weight/bias read and all five gradients written back
    small = 2 * ((3 + 2 + 3) * m.numel() + (2 + 2 + 2) * w.numel())
    total = OPS["gated_residual_adaln"].min_bytes((x, y, m, m, m), {"weight": w, "bias": w}, True)
    assert total == 10 * row + small


@pytest.mark.slow
def test_forward_kernels_compile_for_sm90_without_idle_lanes(tmp_path):
    """``compile_check --ptxas`` on the model-width launches (bf16): the forward and backward kernels of both ops at
    width 1152 / 2048 use every lane (<= 25 % padding), spill nothing and fit >= 2 blocks per SM."""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--ops", "gated_residual_adaln", "adaln_modulate", "--sizes", "model", "--dtypes", "bf16", "--ptxas",
            "--json", str(tmp_path / "rows.json")]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "pae_fast.kernels.tools.compile_check", *args], env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    checked = [r for r in rows if "(32,256," in r["case"]]
    assert {r["kernel"] for r in checked} == {"_gated_residual_adaln_fwd_kernel", "_gated_residual_adaln_bwd_kernel",
                                              "_adaln_modulate_fwd_kernel", "_adaln_modulate_bwd_kernel"}  # fmt: skip
    for r in checked:
        if r.get("registers", -1) > 0:  # ptxas found (bundled with triton)
            assert r["blocks_per_sm"] >= 2 and r["spill_bytes"] == 0, r
        assert r["ok"] and r["row_lane_waste"] <= 0.25, r

"""The traffic counter's rules, and the benchmark scripts' result files (their shape and keys, never speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pae_fast import kernels
from pae_fast.kernels.tools.traffic import TrafficCounter, attention_flops, footprint_bytes, format_summary

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
META = torch.device("meta")


@pytest.fixture
def bench_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))


def _rows(tc: TrafficCounter) -> dict[tuple[str, str], dict]:
    return {(r["phase"], r["op"]): r for r in tc.summary()["rows"]}


# ----------------------------------------------------------------------------------------------------------------
# TrafficCounter
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_elementwise_add_bytes(device):
    x, y = torch.randn(64, 33, device=device), torch.randn(64, 33, device=device)
    with TrafficCounter() as tc:
        x + y
    s = tc.summary()
    row = _rows(tc)[("forward", "add")]
    assert (row["read_bytes"], row["written_bytes"], row["calls"]) == (2 * 64 * 33 * 4, 64 * 33 * 4, 1)
    assert s["other_bytes"] == 3 * 64 * 33 * 4 and s["launches"] == 1
    assert s["matmul_flops"] == 0 and s["matmul_bytes"] == 0


def test_mm_flops_and_category():
    a = torch.randn(16, 24, device=META, dtype=torch.bfloat16)
    b = torch.randn(24, 40, device=META, dtype=torch.bfloat16)
    w, bias = torch.randn(40, 24, device=META), torch.randn(40, device=META)
    with TrafficCounter() as tc:
        a @ b
        F.linear(torch.randn(3, 5, 24, device=META), w, bias)
    s = tc.summary()
    assert s["matmul_flops"] == 2 * 16 * 24 * 40 + 2 * 15 * 24 * 40
    mm = _rows(tc)[("forward", "mm")]
    assert mm["category"] == "matmul" and mm["flops"] == 2 * 16 * 24 * 40
    assert mm["read_bytes"] == (16 * 24 + 24 * 40) * 2 and mm["written_bytes"] == 16 * 40 * 2
    # the bias of addmm is broadcast over rows: read once
    addmm = _rows(tc)[("forward", "addmm")]
    assert addmm["read_bytes"] == (15 * 24 + 40 * 24 + 40) * 4
    assert addmm["category"] == "matmul"
    # besides the two products only the input made inside the counter (randn, written once) costs traffic
    assert {r["op"] for r in s["rows"] if r["category"] != "matmul"} == {"randn"}
    assert s["other_bytes"] == 3 * 5 * 24 * 4


def test_views_are_free():
    x = torch.randn(4, 6, 8, device=META)
    with TrafficCounter() as tc:
        v = x.view(24, 8).t().reshape(8, 4, 6).permute(2, 0, 1)
        x.unsqueeze(0).expand(3, 4, 6, 8)
        x.detach()
        x.transpose(0, 1)
        x.chunk(2, dim=-1)
        x[1:, ::2]
    s = tc.summary()
    assert s["total_bytes"] == 0 and s["launches"] == 0 and s["rows"] == [], s["rows"]
    assert v.shape == (6, 8, 4)
    with TrafficCounter() as tc:
        x.transpose(0, 1).reshape(6, 32)  # not viewable: one copy
    assert tc.summary()["total_bytes"] == 2 * x.numel() * 4 and tc.summary()["launches"] == 1


def test_inplace_and_copy_rules():
    x, y = torch.randn(10, 7, device=META), torch.randn(10, 7, device=META)
    n = 10 * 7 * 4
    with TrafficCounter() as tc:
        x.copy_(y)  # reads y only, writes x
        x.add_(y)  # reads x and y, writes x
        torch.zeros_like(x)  # reads nothing
        torch.add(x, y, out=torch.empty_like(x))  # out= is not read
    r = _rows(tc)
    assert (r[("forward", "copy_")]["read_bytes"], r[("forward", "copy_")]["written_bytes"]) == (n, n)
    assert (r[("forward", "add_")]["read_bytes"], r[("forward", "add_")]["written_bytes"]) == (2 * n, n)
    assert (r[("forward", "zeros_like")]["read_bytes"], r[("forward", "zeros_like")]["written_bytes"]) == (0, n)
    assert r[("forward", "add")]["read_bytes"] == 2 * n
    ema, p = [torch.randn(10, device=META) for _ in range(3)], [torch.randn(10, device=META) for _ in range(3)]
    with TrafficCounter() as tc:
        torch._foreach_lerp_(ema, p, 0.1)  # returns nothing: charged its mutated list as written
        x.new_zeros(4)
        x.size(), x.is_contiguous()  # metadata: free
    r = _rows(tc)
    lerp = r[("forward", "_foreach_lerp_")]
    assert (lerp["read_bytes"], lerp["written_bytes"]) == (240, 120)
    assert r[("forward", "new_zeros")]["read_bytes"] == 0 and len(r) == 2
    assert footprint_bytes(torch.empty(5, device=META).expand(3, 5)) == 20


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_custom_op_counts_as_one(device):
    h = torch.randn(2, 9, 32, device=device, requires_grad=True)
    with TrafficCounter() as tc:
        y = kernels.latent_norm(h, backend="triton" if device == "meta" else "torch")
        if device == "meta":
            with tc.paused():
                g = torch.ones_like(y)
            y.backward(g)
    if device == "cpu":  # the reference is many aten ops
        assert tc.summary()["launches"] > 3
        return
    r = _rows(tc)
    fwd = [k for k in r if k[0] == "forward"]
    assert fwd == [("forward", "pae_fast::latent_norm")], fwd
    row = r[("forward", "pae_fast::latent_norm")]
    n = h.numel() * 4
    assert row["calls"] == 1 and row["launches"] == 1
    assert row["read_bytes"] == n and row["written_bytes"] == n + 2 * 9 * 4  # y + fp32 rstd per row
    bwd = r[("backward", "pae_fast::latent_norm_backward")]
    assert bwd["calls"] == 1 and bwd["read_bytes"] == n + n + 2 * 9 * 4  # dz, h, rstd
    assert tc.summary()["phases"]["forward"]["launches"] == 1


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_sdpa_is_one_flash_style_op(device):
    B, H, N, D = 2, 3, 16, 8
    q, k, v = (torch.randn(B, H, N, D, device=device, requires_grad=True) for _ in range(3))
    with TrafficCounter() as tc:
        o = F.scaled_dot_product_attention(q, k, v)
        with tc.paused():
            g = torch.ones_like(o)
        o.backward(g)
    s = tc.summary()
    t = B * H * N * D * 4
    lse = B * H * N * 4
    r = _rows(tc)
    assert set(r) == {("forward", "attention"), ("backward", "attention_backward")}, set(r)
    assert r[("forward", "attention")]["read_bytes"] == 3 * t
    assert r[("forward", "attention")]["written_bytes"] == t + lse
    assert r[("backward", "attention_backward")]["read_bytes"] == 5 * t + lse  # dout, q, k, v, out, lse
    assert r[("backward", "attention_backward")]["written_bytes"] == 3 * t
    f = attention_flops(q.shape, k.shape, v.shape)
    assert f == 4 * B * H * N * N * D
    assert s["attention_model_flops"] == 3 * f and s["attention_flops"] == f + f * 5 // 2
    assert s["matmul_flops"] == 0 and s["other_bytes"] == 0
    assert q.grad is not None and q.grad.shape == q.shape
    if device == "cpu":
        ref = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
        torch.testing.assert_close(o.detach(), ref)
    assert "attention" in format_summary(s)


def test_pae_attention_backends_count_alike():
    q, k, v = (torch.randn(1, 2, 8, 16, device=META, requires_grad=True) for _ in range(3))
    totals = []
    for backend in ("auto", "triton"):
        with TrafficCounter() as tc:
            kernels.attention(q, k, v, backend=backend).sum().backward()
        totals.append(tc.summary()["attention_bytes"])
    assert totals[0] == totals[1] > 0


# ----------------------------------------------------------------------------------------------------------------
# Roofline
# ----------------------------------------------------------------------------------------------------------------


def _tiny_generator():
    from pae_fast import create_generator

    return create_generator("LightningDiT-B/1", depth=1, hidden_size=64, num_heads=2, input_size=4, num_classes=10)


def test_roofline_prediction_math(bench_path):
    import roofline

    hw = roofline.Hardware("X", peak_flops=1000e12, bandwidth=2e12)
    s = {"matmul_flops": 700e12, "attention_flops": 70e12, "attention_model_flops": 60e12,
         "attention_bytes": 2e12, "other_bytes": 4e12}  # fmt: skip
    p = roofline.predict(s, hw, gemm_efficiency=0.7, hbm_efficiency=1.0)
    assert p["matmul_s"] == pytest.approx(1.0) and p["bandwidth_s"] == pytest.approx(2.0)
    assert p["attention_s"] == pytest.approx(0.1 + 1.0) and p["step_s"] == pytest.approx(4.1)
    assert p["mfu"] == pytest.approx(760e12 / (4.1 * 1000e12))
    # HBM at 80 %, the optimizer + EMA bytes, FlashAttention-2's padded FLOPs
    s.update(update_bytes=1.6e12, attention_padded_flops=140e12)
    p = roofline.predict(s, hw, gemm_efficiency=0.7, hbm_efficiency=0.8, attention="fa2")
    assert p["bandwidth_s"] == pytest.approx(2.5) and p["update_s"] == pytest.approx(1.0)
    assert p["attention_s"] == pytest.approx(0.2 + 1.25) and p["step_s"] == pytest.approx(1.0 + 1.45 + 2.5 + 1.0)
    # DESIGN.md's / issue 27's charges: every byte at peak bandwidth, attention by its FLOPs only
    p = roofline.predict(s, hw, gemm_efficiency=0.7, **roofline.PEAK_CHARGES)
    assert p["attention_s"] == pytest.approx(0.1) and p["bandwidth_s"] == pytest.approx(2.0)
    assert p["step_s"] == pytest.approx(1.0 + 0.1 + 2.0 + 0.8)
    with pytest.raises(ValueError, match="attention"):
        roofline.predict(s, hw, attention="xformers")


def test_roofline_charges_fused_gemms_max_of_flops_and_bytes(bench_path):
    """A fused GEMM op's calls (part of matmul_flops) cost max(FLOPs at the GEMM rate, bytes at the bandwidth)."""
    import roofline

    hw = roofline.Hardware("X", peak_flops=1000e12, bandwidth=2e12)
    base = {"matmul_flops": 700e12, "attention_flops": 0, "attention_model_flops": 0, "attention_bytes": 0,
            "other_bytes": 0}  # fmt: skip
    plain = roofline.predict(base, hw, gemm_efficiency=0.7, hbm_efficiency=1.0)
    compute_bound = [{"phase": "forward", "op": "pae_fast::g", "flops": 70e12, "bytes": 0.1e12, "calls": 2}]
    p = roofline.predict(dict(base, fused_gemm=compute_bound), hw, gemm_efficiency=0.7, hbm_efficiency=1.0)
    assert p["matmul_s"] == pytest.approx(plain["matmul_s"]) == pytest.approx(1.0)
    assert p["fused_gemm_s"] == pytest.approx(0.2) and p["mfu"] == pytest.approx(plain["mfu"])
    # bandwidth-bound calls: 3 s of bytes instead of 0.1 s of FLOPs each
    bw_bound = [{"phase": "backward", "op": "pae_fast::g_backward", "flops": 70e12, "bytes": 6e12, "calls": 1}]
    p = roofline.predict(dict(base, fused_gemm=bw_bound), hw, gemm_efficiency=0.7, hbm_efficiency=1.0)
    assert p["matmul_s"] == pytest.approx(0.9 + 3.0) and p["fused_gemm_s"] == pytest.approx(3.0)
    assert p["model_flops"] == plain["model_flops"]  # the MFU numerator is the same FLOPs


def test_roofline_writes_documented_keys(bench_path, tmp_path):
    import roofline

    res = roofline.run({"tiny": _tiny_generator}, batch=2, ops=["latent_norm"], op_size="small", out_dir=tmp_path)
    data = json.loads((tmp_path / "roofline.json").read_text())
    md = (tmp_path / "roofline.md").read_text()
    assert set(data) >= {"environment", "date", "assumptions", "models", "ops"}
    assert set(data["environment"]) >= {"machine", "versions", "git"}
    m = data["models"]["tiny"]
    assert set(m) >= {"fused", "reference", "targets", "params", "input", "optimizer_ema_bytes"}
    for b in ("fused", "reference"):
        s = m[b]
        keys = {"matmul_flops", "matmul_bytes", "attention_flops", "attention_bytes", "other_bytes", "launches"}
        assert keys <= set(s)
        assert set(s["predicted"]) == {"H100", "H200"}
        assert set(s["predicted"]["H100"]) >= {"matmul_s", "attention_s", "bandwidth_s", "step_s", "mfu"}
    assert m["fused"]["matmul_flops"] == m["reference"]["matmul_flops"] > 0
    assert 0 < m["fused"]["other_bytes"] < m["reference"]["other_bytes"]
    assert m["fused"]["launches"] < m["reference"]["launches"]
    assert set(m["targets"]) >= {"bandwidth_ratio", "bandwidth_ratio_met", "h100_mfu", "h100_mfu_met", "step_gb",
                                 "h100_mfu_peak", "h100_mfu_peak_met"}
    assert m["targets"]["h100_mfu_peak"] == m["fused"]["predicted_peak"]["mfu"] > m["targets"]["h100_mfu"]
    assert "at peak bandwidth" in md
    # counted as the engine trains by default: its precision policy, optimizer and EMA
    from pae_fast.config import TrainConfig

    a = data["assumptions"]
    assert (a["precision"], a["optimizer"], a["ema"]) == (TrainConfig().precision, TrainConfig().optimizer, True)
    assert 0.85 <= a["hbm_efficiency"] <= 0.90 and "cuDNN" in a["attention"]
    n = m["params"]
    # train.optimizer=auto as the engine resolves it on one H100 with Triton: the one-kernel AdamW + EMA + compute
    # copy in the fused (default) row, torch's AdamW in the reference row (kernel_backend=torch)
    assert (a["optimizer_h100"], a["optimizer_reference"]) == ("fused_adamw_ema", "adamw")
    assert (m["fused"]["optimizer"], m["reference"]["optimizer"]) == ("fused_adamw_ema", "adamw")
    assert m["optimizer_ema_bytes"] == m["fused"]["update_bytes"] == pytest.approx(36 * n, rel=0.02)
    types = m["fused"]["op_types"]
    trainable = sum(p.numel() for p in _tiny_generator().parameters() if p.requires_grad)  # pos_embed is fixed
    assert types["optimizer + EMA"]["min_bytes"] == 36 * trainable <= types["optimizer + EMA"]["bytes"]
    assert {"fused:adaln_modulate", "fused:gated_residual_adaln", "gemm:swiglu_mlp"} <= set(types)
    assert "`gemm:<op>` rows are fused GEMM ops" in md
    assert all(t["min_bytes"] is not None and t["min_bytes"] <= t["bytes"] for t in types.values()), types
    assert "casts" in m["reference"]["op_types"] and "per op type" in md
    # the comparison row: the same fused step with torch's AdamW + foreach EMA (52 B/param with the bf16 copy)
    assert m["comparison"] == "fused + adamw"
    alt = m["fused + adamw"]
    assert alt["optimizer"] == "adamw" and alt["update_bytes"] > m["fused"]["update_bytes"]
    assert alt["other_bytes"] == m["fused"]["other_bytes"]
    assert "| tiny | fused + adamw (`adamw`, comparison) |" in md and "| tiny | fused (`fused_adamw_ema`) |" in md
    row = data["ops"][0]
    assert set(row) >= {"op", "case", "reference_bytes", "fused_bytes", "min_bytes"}, row
    assert row["min_bytes"] <= row["fused_bytes"] < row["reference_bytes"]
    assert "## Fused ops" in md and "latent_norm" in md
    assert res["models"]["tiny"]["params"] == sum(p.numel() for p in _tiny_generator().parameters())


def test_roofline_step_flops_match_profile(bench_path):
    """GEMM + attention FLOPs of a counted step ~ 6 x the profile's forward MACs (input/embedding grads aside)."""
    import roofline

    from pae_fast.models.profile import forward_gmacs

    with META:
        model = _tiny_generator()
    step = roofline.step_traffic(_tiny_generator, batch=3, precision="fp32", backend="fused")
    gmacs = forward_gmacs(model) * 3
    counted = step["matmul_flops"] + step["attention_model_flops"]
    assert counted == pytest.approx(6 * gmacs * 1e9, rel=0.05)
    assert counted <= 6 * gmacs * 1e9


def test_roofline_counts_the_precision_policy(bench_path):
    """bf16 compute weights: no weight casts in forward/backward; the update writes the bf16 copy instead. Under
    bf16-autocast every GEMM re-casts its fp32 weight (and the reference pays the same attention as the fused)."""
    import roofline

    n = sum(p.numel() for p in _tiny_generator().parameters())
    ac = roofline.step_traffic(_tiny_generator, batch=2, precision="bf16-autocast", backend="fused", optimizer="adamw")
    bf = roofline.step_traffic(_tiny_generator, batch=2, precision="bf16", backend="fused", optimizer="adamw")
    ref = roofline.step_traffic(_tiny_generator, batch=2, precision="bf16", backend="reference")
    casts = lambda s: s["op_types"].get("casts", {}).get("bytes", 0)  # noqa: E731
    assert casts(ac) >= 4 * n  # fp32 -> bf16 weight casts (6 B/param) and the gradients back
    assert casts(bf) < casts(ac) / 4
    assert ac["update_bytes"] == pytest.approx(40 * n, rel=0.02)  # fused AdamW 28 B/param + EMA 12 B/param
    assert bf["update_bytes"] == pytest.approx(52 * n, rel=0.02)  # + bf16 grads to fp32 (6) + the bf16 copy (6)
    assert ref["attention_flops"] == bf["attention_flops"] and ref["attention_bytes"] == bf["attention_bytes"]
    assert ref["matmul_flops"] == bf["matmul_flops"]
    # train.optimizer=auto (the default) on one H100: the one kernel, 36 B/param; the reference: torch's AdamW
    auto = roofline.step_traffic(_tiny_generator, batch=2, precision="bf16", backend="fused")
    assert auto["optimizer"] == "fused_adamw_ema" and auto["update_bytes"] == pytest.approx(36 * n, rel=0.02)
    assert (ref["optimizer"], bf["optimizer"]) == ("adamw", "adamw")


def test_roofline_fused_swiglu_gemm_keeps_the_mfu_numerator(bench_path):
    """A small LightningDiT counted fused (SwiGLU MLP = one fused GEMM op each way) and with the references (aten
    GEMMs): the same GEMM and attention FLOPs, so the same MFU numerator; the fused MLP's calls are matmul, not
    bandwidth-bound, and no swiglu pass remains."""
    import roofline

    fused = roofline.step_traffic(_tiny_generator, batch=2, precision="bf16", backend="fused")
    ref = roofline.step_traffic(_tiny_generator, batch=2, precision="bf16", backend="reference")
    assert fused["matmul_flops"] == ref["matmul_flops"] and fused["attention_model_flops"] == ref[
        "attention_model_flops"]  # fmt: skip
    hw = roofline.HARDWARE["H100"]
    assert roofline.predict(fused, hw)["model_flops"] == roofline.predict(ref, hw)["model_flops"]
    calls = {(c["phase"], c["op"]): c for c in fused["fused_gemm"]}
    fwd, bwd = calls[("forward", "pae_fast::swiglu_mlp")], calls[("backward", "pae_fast::swiglu_mlp_backward")]
    assert fwd["calls"] == bwd["calls"] == 1 and bwd["flops"] == 2 * fwd["flops"] > 0
    types = fused["op_types"]
    assert "gemm:swiglu_mlp" in types and "fused:swiglu" not in types
    assert types["gemm:swiglu_mlp"]["bytes"] == types["gemm:swiglu_mlp"]["min_bytes"] > 0
    assert types["gemm:swiglu_mlp"]["bytes"] == fwd["bytes"] + bwd["bytes"]


def test_roofline_unknown_model_is_reported(bench_path, tmp_path):
    import roofline

    res = roofline.run(["NoSuchModel-XL"], batch=1, ops=False, out_dir=tmp_path)
    assert "not registered" in res["models"]["NoSuchModel-XL"]["error"]
    with pytest.raises(ValueError, match="unknown op"):
        roofline.run([], ops=["no_such_op"], out_dir=None)


# ----------------------------------------------------------------------------------------------------------------
# Training step and summary
# ----------------------------------------------------------------------------------------------------------------


def test_train_step_writes_documented_keys(bench_path, tmp_path):
    import bench_train_step
    import run_all

    out = tmp_path / "train_step_tiny.json"
    rec = bench_train_step.run("tiny", batch=2, device="cpu", steps=2, warmup=1, build=_tiny_generator, json_out=out)
    data = json.loads(out.read_text())
    assert data["images_per_s"] == pytest.approx(rec["images_per_s"]) and data["images_per_s"] > 0
    assert data["step_seconds"] > 0 and len(data["step_seconds_all"]) == 2 and len(data["warmup_seconds"]) == 1
    assert data["peak_memory_bytes"] > 0 and "ru_maxrss" in data["peak_memory_method"]
    assert data["train_flops_per_image"] > 0 and data["mfu"] is None  # no MFU on CPU
    assert set(data["environment"]) >= {"machine", "versions", "git"}
    assert data["environment"]["versions"]["torch"] == torch.__version__
    assert (data["precision"], data["backend"], data["compile"]) == ("fp32", "auto", False)
    assert data["predicted"] is None and data["optimizer"] == "adamw"  # the roofline prediction is a CUDA column
    assert "images/s" in bench_train_step.format_record(rec)
    text = run_all.summarize(tmp_path)
    assert "## Training step" in text and "| tiny | 2 | cpu |" in text and "Machine:" in text


def test_op_benchmark_suite_writes_results(tmp_path):
    """The pytest-benchmark suite on one op (references only, one round): its JSON has our keys."""
    import os
    import subprocess

    out = tmp_path / "ops.json"
    cmd = [sys.executable, "-m", "pytest", str(BENCH / "test_bench_ops.py"), "-m", "benchmark", "--benchmark-enable",
           f"--benchmark-json={out}", "-p", "no:cacheprovider", "-q", "--bench-ops", "latent_norm",
           "--bench-impls", "reference,fused", "--bench-device", "cpu", "--benchmark-min-rounds=1",
           "--benchmark-max-time=0.0001", "--benchmark-warmup=off"]  # fmt: skip
    # a clean pytest environment: under pytest-xdist the worker variables would make pytest-benchmark stand down
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    proc = subprocess.run(cmd, cwd=BENCH.parent, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine_info"]["pae_fast"]["versions"]["torch"] == torch.__version__
    assert "git" in data["machine_info"]["pae_fast"]
    rows = {(b["extra_info"]["impl"], b["extra_info"]["mode"]): b for b in data["benchmarks"]}
    assert set(rows) == {("reference", "fwd"), ("reference", "fwd+bwd")}  # fused: skipped on CPU
    for b in rows.values():
        assert set(b["extra_info"]) >= {"op", "case", "impl", "mode", "device", "dtype", "min_bytes", "floor_GBps"}
        assert b["stats"]["median"] > 0
    assert "Triton timing needs CUDA" in proc.stdout


def test_train_step_bf16_policy_fused_optimizer_and_prediction(bench_path, monkeypatch):
    """bf16 compute weights + the one-kernel optimizer run on CPU; on an H100 the record carries the roofline's
    prediction for the same step beside the measurement."""
    import bench_train_step

    rec = bench_train_step.run("tiny", batch=2, device="cpu", steps=1, warmup=1, build=_tiny_generator,
                               precision="bf16", optimizer="fused_adamw_ema")  # fmt: skip
    assert rec["precision"] == "bf16" and rec["optimizer"] == "fused_adamw_ema" and rec["images_per_s"] > 0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    pred = bench_train_step._predicted(_tiny_generator, 2, "bf16", "auto", "adamw")
    assert pred["hardware"] == "H100 SXM" and pred["step_seconds"] > 0 and 0 < pred["mfu"] < 1
    rec.update(predicted=pred, step_seconds=2 * pred["step_seconds"])
    assert "roofline on H100 SXM" in bench_train_step.format_record(rec) and "predicted time 2.00" in (
        bench_train_step.format_record(rec))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    assert bench_train_step._predicted(_tiny_generator, 2, "bf16", "auto", "adamw") is None


def test_train_step_cli_rejects_bad_input(bench_path, capsys):
    import bench_train_step

    with pytest.raises(SystemExit):
        bench_train_step.main(["--model", "NoSuchModel", "--steps", "1"])
    assert "unknown generator" in capsys.readouterr().err
    with pytest.raises(ValueError, match="precision"):
        bench_train_step.run("x", precision="fp8", build=_tiny_generator)


def test_sampling_cost_per_preset(bench_path):
    """The summary's NFE table: the authors' grids give 249 (ODE), 250 (SDE) and 49 (RAE) model calls per image."""
    import run_all

    rows = {r["preset"]: r for r in run_all.sampling_cost_rows()}
    cost = {name: (r["nfe"], r["forwards"]) for name, r in rows.items()}
    assert cost["pae_lightningdit_xl1_80ep"] == (249, 249 + 135)  # 135 CFG calls run a batch of 2B
    assert cost["pae_lightningdit_xl1_80ep_sde"] == (250, 250)
    assert cost["rae_ditdh_xl_released"] == (49, 98)  # AutoGuidance: main + guide on every call
    assert "## Sampling cost per preset" in run_all.summarize(Path("/nonexistent"))


def test_cpu_guard_alternates_backends_and_compares_medians(bench_path, tmp_path, monkeypatch):
    """cpu_guard.py: runs alternate auto / torch, the verdict compares the medians of the runs' step times (the
    benchmark subprocess is replaced by one writing a record)."""
    import cpu_guard

    times = iter([5.0, 6.0, 9.0, 7.0, 5.5, 6.5])  # auto, torch, auto, torch, ...
    order = []
    real_run = cpu_guard.subprocess.run

    def fake_run(cmd, **kw):
        if "--backend" not in cmd:  # e.g. git, for the environment record
            return real_run(cmd, **kw)
        backend, out = cmd[cmd.index("--backend") + 1], cmd[cmd.index("--json") + 1]
        order.append(backend)
        t = next(times)
        rec = {"step_seconds": t, "step_seconds_all": [t], "warmup_seconds": [t], "peak_memory_bytes": 1,
               "optimizer": "adamw"}
        Path(out).write_text(json.dumps(rec))

    monkeypatch.setattr(cpu_guard.subprocess, "run", fake_run)
    res = cpu_guard.run("tiny", batch=2, rounds=3, steps=1, out_dir=tmp_path)
    assert order == ["auto", "torch"] * 3
    assert res["median_step_seconds"] == {"auto": 5.5, "torch": 6.5} and res["holds"]
    assert res["rounds_auto_not_slower"] == 2 and res["auto_over_torch"] == pytest.approx(5.5 / 6.5)
    saved = json.loads((tmp_path / "cpu_guard_tiny_b2_fp32.json").read_text())
    assert len(saved["runs"]) == 6 and "not slower" in saved["claim"]


def test_roofline_counts_clipping_as_the_engine_runs_it(bench_path):
    """train.grad_clip in the update: fused_adamw_ema reads each bf16 gradient once for the norm (36 -> 38 B/param);
    torch's clip on the fp32 masters reads them for the norm and reads + writes them to scale (52 -> 64 B/param).
    The default models are counted with their presets' clip (DiT^DH-XL: 1.0, as RAE trains it)."""
    import roofline

    n = sum(p.numel() for p in _tiny_generator().parameters())
    per = {}
    for opt in ("fused_adamw_ema", "adamw"):
        for clip in (0.0, 1.0):
            s = roofline.step_traffic(_tiny_generator, batch=2, precision="bf16", backend="fused", optimizer=opt,
                                      grad_clip=clip)  # fmt: skip
            per[opt, clip] = s["update_bytes"] / n
            assert s["grad_clip"] == clip
    assert per["fused_adamw_ema", 1.0] - per["fused_adamw_ema", 0.0] == pytest.approx(2.0, abs=0.1)
    assert per["adamw", 1.0] - per["adamw", 0.0] == pytest.approx(12.0, abs=0.3)
    assert per["fused_adamw_ema", 1.0] <= 36 + 8  # the bound: clipping costs <= 8 B/param over 36
    assert roofline.preset_grad_clip("DiTDH-XL") == 1.0 and roofline.preset_grad_clip("LightningDiT-XL/1") == 0.0


def test_roofline_triton_gemm_efficiency_column(bench_path, tmp_path):
    """The fused GEMM ops can be charged at their own efficiency: half the rate doubles a compute-bound call's time;
    run() reports the H100 MFU at every TRITON_GEMM_EFFICIENCIES value, never rising as the efficiency falls."""
    import roofline

    hw = roofline.Hardware("X", peak_flops=1000e12, bandwidth=2e12)
    s = {"matmul_flops": 700e12, "attention_flops": 0, "attention_model_flops": 0, "attention_bytes": 0,
         "other_bytes": 0, "fused_gemm": [{"phase": "forward", "op": "pae_fast::g", "flops": 70e12, "bytes": 1e9,
                                           "calls": 2}]}  # fmt: skip
    full = roofline.predict(s, hw, gemm_efficiency=0.7, hbm_efficiency=1.0)
    half = roofline.predict(s, hw, gemm_efficiency=0.7, hbm_efficiency=1.0, triton_gemm_efficiency=0.35)
    assert half["fused_gemm_s"] == pytest.approx(2 * full["fused_gemm_s"]) == pytest.approx(0.4)
    assert half["matmul_s"] - full["matmul_s"] == pytest.approx(0.2)
    res = roofline.run({"tiny": _tiny_generator}, batch=2, ops=False, out_dir=tmp_path)
    sens = res["models"]["tiny"]["fused"]["h100_mfu_by_triton_gemm_efficiency"]
    assert list(sens) == [f"{e:.2f}" for e in roofline.TRITON_GEMM_EFFICIENCIES]
    vals = list(sens.values())
    assert vals[0] == pytest.approx(res["models"]["tiny"]["fused"]["predicted"]["H100"]["mfu"])
    assert vals[0] >= vals[1] >= vals[2]  # the tiny model's fused GEMMs are bandwidth-bound: equal here
    assert "Triton GEMMs at 70% / 60% / 50%" in (tmp_path / "roofline.md").read_text()


def test_roofline_reports_the_tokenizer_step(bench_path, tmp_path):
    """run(tokenizers=...) counts each tokenizer's training step (update inside) and roofline.md shows its rows."""
    import roofline

    res = roofline.run({"tiny": _tiny_generator}, batch=1, ops=False, out_dir=tmp_path, tokenizers=["PAE-tiny"])
    tok = res["tokenizers"]["PAE-tiny"]
    assert tok["fused"]["update_bytes"] > 0 and tok["optimizer"] == "fused_adamw_ema"
    md = (tmp_path / "roofline.md").read_text()
    assert "## Tokenizer training step" in md and "| PAE-tiny step (batch 1) | fused (`fused_adamw_ema`" in md
    assert "PAE-tiny" in json.loads((tmp_path / "roofline.json").read_text())["tokenizers"]

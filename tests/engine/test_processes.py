"""The engine in other processes: SIGTERM preemption of a training subprocess, then exact resume; a 2-process gloo
DDP run (torchrun) against the single-process run with the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pae_fast.engine import latest_checkpoint, train
from pae_fast.weights import load_weights


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _wait_for(path, proc, timeout_s: float = 180.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"training process exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() - t0 > timeout_s:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.05)


def test_sigterm_checkpoints_exits_0_and_resumes_exactly(tiny, tiny_script, tmp_path):
    overrides = dict(steps=40, ckpt_every=2, log_every=2, schedule="cosine", grad_clip=1.0)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(tiny_script), "--out", str(out), "--cfg", json.dumps(overrides), "--sleep", "0.2",
         "--random-terms", "--dropout", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )
    _wait_for(out / "checkpoints" / "0000002" / "COMPLETE", proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    res = _result(output)
    assert res["interrupted"] is True and 2 <= res["step"] < 40, res
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and int(ckpt.name) == res["step"]
    assert "received SIGTERM" in (out / "log.txt").read_text()

    cfg = tiny.tiny_cfg(**overrides)
    kw = dict(random_terms=True, dropout=0.2)
    done = train(tiny.make_task(**kw), cfg, out, seed=0)  # resume: auto
    ref = train(tiny.make_task(**kw), cfg, tmp_path / "ref", seed=0)
    assert done.step == ref.step == 40
    for a, b in ((done.model, ref.model), (done.ema, ref.ema)):
        sa, sb = tiny.state_of(a), tiny.state_of(b)
        assert all(torch.equal(sa[k], sb[k]) for k in sb)


def _torchrun(script, out, overrides: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--out", str(out), "--cfg", json.dumps(overrides), "--init-seed-by-rank"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_process_gloo_matches_single_process(tiny, tiny_script, tmp_path, strategy):
    """World 2 (each rank initialised differently: rank 0's weights are broadcast) equals one process with the same
    global batch. FSDP2 also stops at step 3 and resumes to 6 (constant lr, so that equals a straight run)."""
    overrides = dict(steps=6, ckpt_every=3, log_every=3, global_batch_size=8, grad_clip=1.0, distributed=strategy)
    out = tmp_path / strategy
    if strategy == "fsdp":
        assert _result(_torchrun(tiny_script, out, {**overrides, "steps": 3}).stdout)["step"] == 3
    assert _result(_torchrun(tiny_script, out, overrides).stdout)["step"] == 6
    state = torch.load(out / "checkpoints" / "0000006" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2

    single = train(tiny.make_task(), tiny.tiny_cfg(**{**overrides, "distributed": "ddp"}), tmp_path / "one")
    for which, ref in (("model", single.model), ("ema", single.ema)):
        got = tiny.TinyMLP()
        load_weights(got, out, prefer=(which,))
        for k, v in tiny.state_of(ref).items():
            torch.testing.assert_close(tiny.state_of(got)[k], v, rtol=1e-5, atol=1e-6, msg=f"{which}.{k}")

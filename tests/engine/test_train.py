"""The training loop in one process: exact resume, preemption in-process, non-finite policies, accumulation,
damaged checkpoints, files of a run."""

import json
import signal
import threading

import pytest
import torch

from pae_fast.engine import (
    CheckpointError,
    NonFiniteLossError,
    TrainTask,
    latest_checkpoint,
    train,
)
from pae_fast.engine.optim import lr_factor
from pae_fast.weights import WeightsError, load_weights


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _sigterm_at(task: TrainTask, at: int) -> TrainTask:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed in the main thread")
    inner = task.loss_fn

    def loss_fn(model, batch, step):
        if step == at:
            signal.raise_signal(signal.SIGTERM)
        return inner(model, batch, step)

    task.loss_fn = loss_fn
    return task


def test_exact_resume_is_bitwise(tiny, tmp_path):
    """Uninterrupted vs. SIGTERM at step 5 (checkpoint at 6) + auto-resume: identical weights, EMA and Adam state."""
    cfg = tiny.tiny_cfg(steps=12, schedule="cosine", warmup_steps=3, grad_clip=1.0, log_every=4, ckpt_every=4)
    kw = dict(random_terms=True, dropout=0.2)  # torch and numpy RNG inside the step
    ref = train(tiny.make_task(**kw), cfg, tmp_path / "ref", seed=3)
    assert ref.step == 12 and not ref.interrupted
    assert not _equal(tiny.state_of(ref.ema), tiny.state_of(ref.model))  # the EMA moves, and lags

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    part = train(_sigterm_at(tiny.make_task(**kw), 5), cfg, tmp_path / "run", seed=3)
    assert part.interrupted and part.step == 6
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    assert part.checkpoint_dir == tmp_path / "run" / "checkpoints" / "0000006"
    assert latest_checkpoint(tmp_path / "run") == part.checkpoint_dir

    done = train(tiny.make_task(seed=99, **kw), cfg, tmp_path / "run", seed=3)  # other init: weights come from disk
    assert done.step == 12 and not done.interrupted
    assert _equal(tiny.state_of(done.model), tiny.state_of(ref.model))
    assert _equal(tiny.state_of(done.ema), tiny.state_of(ref.ema))
    s_ref = torch.load(ref.checkpoint_dir / "state.pt", weights_only=True)
    s_new = torch.load(done.checkpoint_dir / "state.pt", weights_only=True)
    for idx, st in s_ref["optimizer"]["state"].items():
        assert all(torch.equal(v, s_new["optimizer"]["state"][idx][k]) for k, v in st.items())
    assert s_new["scheduler"]["last_epoch"] == 12
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert steps == [4, 6, 8, 12]  # one record per logged step, none repeated by the resume
    rec = json.loads((tmp_path / "run" / "stats.jsonl").read_text().splitlines()[0])
    assert rec["lr"] == pytest.approx(cfg.lr * lr_factor(3, schedule="cosine", steps=12, lr=cfg.lr,
                                                         min_lr=cfg.min_lr, warmup_steps=3))  # lr used by step 4


def test_run_files_metadata_and_state(tiny, tmp_path):
    cfg = tiny.tiny_cfg(steps=8, ckpt_every=4, keep_last=1)
    res = train(tiny.make_task(), cfg, tmp_path, seed=0, config_yaml="train:\n  steps: 8\n")
    assert (tmp_path / "config.yaml").read_text() == "train:\n  steps: 8\n"
    assert "step 8/8" in (tmp_path / "log.txt").read_text()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["0000008"]  # keep_last=1
    rec = [json.loads(line) for line in res.stats_path.read_text().splitlines()]
    assert [r["step"] for r in rec] == [4, 8]
    for key in ("loss", "mse", "lr", "grad_norm", "images_per_s", "peak_mem_gb", "skipped", "skipped_total"):
        assert key in rec[-1], key
    state = torch.load(res.checkpoint_dir / "state.pt", weights_only=True)
    assert state["step"] == 8 and state["data"] == {"epoch": 1, "offset": 0, "num_samples": 64,
                                                    "global_batch_size": 8, "seed": 0}
    assert {"torch", "numpy", "python"} <= set(state["rng"][0])
    fresh = tiny.TinyMLP()
    meta = load_weights(fresh, tmp_path, prefer=("ema",))
    assert meta["config"] == "train:\n  steps: 8\n" and meta["step"] == "8" and meta["kind"] == "tiny"
    assert _equal(tiny.state_of(fresh), tiny.state_of(res.ema))
    load_weights(fresh, res.checkpoint_dir / "model.safetensors")
    assert _equal(tiny.state_of(fresh), tiny.state_of(res.model))
    # resuming a finished run is a no-op that reports the checkpoint
    again = train(tiny.make_task(), cfg, tmp_path, seed=0)
    assert again.step == 8 and again.checkpoint_dir == res.checkpoint_dir


def test_grad_accum_and_workers_equal_big_batch(tiny, tmp_path):
    cfg = tiny.tiny_cfg(steps=6, ckpt_every=6, log_every=3)
    big = train(tiny.make_task(), cfg, tmp_path / "a")
    acc = train(tiny.make_task(), tiny.tiny_cfg(steps=6, ckpt_every=6, log_every=3, grad_accum=4), tmp_path / "b")
    for k, v in tiny.state_of(big.model).items():
        torch.testing.assert_close(tiny.state_of(acc.model)[k], v, rtol=1e-5, atol=1e-6)
    task = tiny.make_task()
    task.num_workers = 2  # worker processes deliver the same batches in the same order
    wk = train(task, cfg, tmp_path / "c")
    assert _equal(tiny.state_of(wk.model), tiny.state_of(big.model))


def test_nonfinite_skip_counts_and_leaves_weights_finite(tiny, tmp_path):
    cfg = tiny.tiny_cfg(steps=8, log_every=4, ckpt_every=8, nonfinite="skip", grad_clip=1.0)
    res = train(tiny.make_task(nan_at=(2, 5)), cfg, tmp_path)
    assert res.skipped_steps == 2
    assert all(torch.isfinite(v).all() for v in tiny.state_of(res.model).values())
    assert all(torch.isfinite(v).all() for v in tiny.state_of(res.ema).values())
    state = torch.load(res.checkpoint_dir / "state.pt", weights_only=True)
    assert all(int(s["step"]) == 6 for s in state["optimizer"]["state"].values())  # 8 steps, 2 not applied
    assert state["skipped_steps"] == 2
    rec = [json.loads(line) for line in res.stats_path.read_text().splitlines()]
    assert [(r["skipped"], r["skipped_total"]) for r in rec] == [(1, 1), (1, 2)]
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in rec)  # means over the applied steps


def test_nonfinite_stop_names_the_step(tiny, tmp_path):
    cfg = tiny.tiny_cfg(steps=8, log_every=4, ckpt_every=2, nonfinite="stop")
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(tiny.make_task(nan_at=(3,)), cfg, tmp_path)
    assert latest_checkpoint(tmp_path).name == "0000002"  # nothing written after the bad step


def test_damaged_checkpoint_error_and_auto_fallback(tiny, tmp_path):
    cfg = tiny.tiny_cfg(steps=8, ckpt_every=4, log_every=4)
    ref = train(tiny.make_task(), cfg, tmp_path / "ref")
    run = tmp_path / "run"
    part = train(_sigterm_at(tiny.make_task(), 5), cfg, run)
    assert part.step == 6
    newest = run / "checkpoints" / "0000006"
    damaged = newest / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated
    with pytest.raises(WeightsError, match=r"0000006/model\.safetensors is damaged"):
        load_weights(tiny.TinyMLP(), newest)
    with pytest.raises(CheckpointError, match=r"0000006/model\.safetensors"):
        train(tiny.make_task(), tiny.tiny_cfg(steps=8, ckpt_every=4, resume=str(newest)), tmp_path / "other")
    assert latest_checkpoint(run).name == "0000004"
    done = train(tiny.make_task(), cfg, run)  # auto: skips 0000006 with a warning, resumes from 0000004
    assert done.step == 8
    assert "skipping damaged checkpoint" in (run / "log.txt").read_text()
    assert (run / "checkpoints" / "0000006.damaged").is_dir()  # moved aside: never pruned-for or resumed-from again
    assert latest_checkpoint(run).name == "0000008"
    assert _equal(tiny.state_of(done.model), tiny.state_of(ref.model))


def test_extra_optimized_module_is_trained_and_checkpointed(tiny, tmp_path):
    task = tiny.make_task()
    critic = torch.nn.Linear(4, 1)
    w0 = critic.weight.detach().clone()

    def critic_loss(module, batch, step):
        x, y = batch
        out = module(y).mean()
        return out.pow(2), {"out": out.detach()}

    task.extra_optimized = {"critic": (critic, critic_loss)}
    res = train(task, tiny.tiny_cfg(steps=4, ckpt_every=4, log_every=2), tmp_path)
    assert not torch.equal(critic.weight, w0)
    assert (res.checkpoint_dir / "critic.safetensors").is_file()
    assert "critic/loss" in json.loads(res.stats_path.read_text().splitlines()[-1])
    state = torch.load(res.checkpoint_dir / "state.pt", weights_only=True)
    assert "critic" in state["extra"] and state["extra"]["critic"]["optimizer"]["state"]


def test_bf16_autocast_and_config_errors(tiny, tmp_path):
    res = train(tiny.make_task(), tiny.tiny_cfg(steps=2, precision="bf16", log_every=1, ckpt_every=2), tmp_path / "a")
    assert res.step == 2 and all(v.dtype == torch.float32 for v in tiny.state_of(res.model).values())
    # fp16: GradScaler; a non-finite loss is counted as skipped, the scaler's own overflow steps are not
    res = train(tiny.make_task(nan_at=(1,)), tiny.tiny_cfg(steps=3, precision="fp16", log_every=3, ckpt_every=3),
                tmp_path / "f")
    assert res.skipped_steps == 1 and all(torch.isfinite(v).all() for v in tiny.state_of(res.model).values())
    assert torch.load(res.checkpoint_dir / "state.pt", weights_only=True)["scaler"]["scale"] < 65536.0
    with pytest.raises(ValueError, match=r"global_batch_size=8.*grad_accum=3"):
        train(tiny.make_task(), tiny.tiny_cfg(grad_accum=3), tmp_path / "b")
    with pytest.raises(ValueError, match="train.log_every must be > 0"):
        train(tiny.make_task(), tiny.tiny_cfg(log_every=0), tmp_path / "c")
    task = tiny.make_task()
    task.model = torch.nn.Linear(8, 4)  # no `blocks`
    with pytest.raises(ValueError, match="compile_scope=block"):
        train(task, tiny.tiny_cfg(compile="default", compile_scope="block"), tmp_path / "d")


@pytest.mark.slow
def test_compiled_step_matches_eager(tiny, tmp_path):
    """torch.compile (inductor on CPU needs a C++ compiler; slow) gives the eager result to tolerance."""
    cfg = tiny.tiny_cfg(steps=3, log_every=3, ckpt_every=3)
    eager = train(tiny.make_task(), cfg, tmp_path / "e")
    for mode, scope in (("default", "step"), ("default", "block"), ("reduce-overhead", "step")):
        # reduce-overhead (CUDA graphs) falls back to mode=default on the CPU, with a warning
        comp = train(tiny.make_task(), tiny.tiny_cfg(steps=3, log_every=3, ckpt_every=3, compile=mode,
                                                     compile_scope=scope), tmp_path / f"{mode}-{scope}")
        for k, v in tiny.state_of(eager.model).items():
            torch.testing.assert_close(tiny.state_of(comp.model)[k], v, rtol=1e-4, atol=1e-5)


def test_checkpoint_steps_add_checkpoints_and_callbacks(tiny, tmp_path):
    """TrainTask.checkpoint_steps: checkpoints (and the on_checkpoint call with the EMA weights) at those steps as
    well as every ckpt_every and the last; the EMA passed is the one saved in that checkpoint."""
    seen: dict[int, dict] = {}

    def on_checkpoint(step, model, ema, out_dir):
        seen[step] = tiny.state_of(ema)

    task = tiny.make_task()
    task.on_checkpoint = on_checkpoint
    task.checkpoint_steps = frozenset({1, 3, 5})
    train(task, tiny.tiny_cfg(steps=9, ckpt_every=4), tmp_path, seed=0)
    assert sorted(seen) == [1, 3, 4, 5, 8, 9]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == [
        f"{s:07d}" for s in (1, 3, 4, 5, 8, 9)]
    from pae_fast.io import load_safetensors

    assert _equal(seen[3], load_safetensors(tmp_path / "checkpoints" / "0000003" / "ema.safetensors")[0])

"""Engine side of "runs that can be trusted": NaN streaks stop a run, checksummed checkpoints fall back, pruning keeps
the newest clean checkpoint, one process per output folder."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pae_fast.engine import checkpoint as ck
from pae_fast.engine import train
from pae_fast.engine.lock import LOCK_FILE, RunLock, lock_holder
from pae_fast.engine.loop import NonFiniteLossError
from pae_fast.engine.state import find_resume
from pae_fast.errors import EXIT_BUSY, EXIT_NONFINITE, RunLockedError, exit_code_for
from pae_fast.io import load_safetensors, save_safetensors


def test_nan_streak_stops_the_run(tiny, tmp_path):
    task = tiny.make_task(nan_at=tuple(range(5, 100)))
    cfg = tiny.tiny_cfg(steps=40, log_every=2, ckpt_every=2, max_skipped_steps=3)
    with pytest.raises(NonFiniteLossError, match=r"consecutive optimizer steps .*train.max_skipped_steps=3") as ei:
        train(task, cfg, tmp_path, seed=0)
    assert exit_code_for(ei.value) == EXIT_NONFINITE
    steps = [int(p.name) for p in ck.list_checkpoints(tmp_path)]
    assert steps and max(steps) <= 8, steps  # stopped within a log interval of the third skipped step
    newest = ck.latest_checkpoint(tmp_path)
    tensors, _ = load_safetensors(newest / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_isolated_nan_steps_are_skipped(tiny, tmp_path):
    res = train(tiny.make_task(nan_at=(2, 5)), tiny.tiny_cfg(steps=8, max_skipped_steps=2), tmp_path, seed=0)
    assert res.step == 8 and res.skipped_steps == 2 and not res.interrupted


@pytest.fixture
def two_checkpoints(tiny, tmp_path) -> Path:
    train(tiny.make_task(), tiny.tiny_cfg(steps=4, log_every=2, ckpt_every=2), tmp_path, seed=0)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["0000002", "0000004"]
    return tmp_path


def _resume_step(run: Path) -> int:
    import logging

    bundle = find_resume("auto", run, [], logging.getLogger("test"))
    return int(bundle.state["step"])


def test_manifest_records_sha256(two_checkpoints):
    man = json.loads((ck.list_checkpoints(two_checkpoints)[-1] / ck.MANIFEST).read_text())
    assert set(man["sha256"]) == set(man["files"]) and man["clean"] is True
    assert man["sha256"]["model.safetensors"] == ck.file_sha256(ck.list_checkpoints(two_checkpoints)[-1]
                                                                 / "model.safetensors")


def test_corrupted_checkpoint_of_the_right_size_falls_back(two_checkpoints):
    f = two_checkpoints / "checkpoints" / "0000004" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-64:] = b"\xff" * 64  # NaN bit patterns over the last weights; same size
    f.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="sha256"):
        ck.validate_checkpoint(f.parent)
    assert ck.latest_checkpoint(two_checkpoints).name == "0000002"
    assert _resume_step(two_checkpoints) == 2
    assert (f.parent.parent / "0000004.damaged").is_dir()  # moved aside: never counted again


def test_checkpoint_with_nan_weights_falls_back(two_checkpoints):
    ckpt = two_checkpoints / "checkpoints" / "0000004"
    tensors, meta = load_safetensors(ckpt / "ema.safetensors")
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_safetensors(tensors, ckpt / "ema.safetensors", metadata=meta)
    man = json.loads((ckpt / ck.MANIFEST).read_text())  # a consistent manifest: only the NaN check can catch it
    man["files"]["ema.safetensors"] = (ckpt / "ema.safetensors").stat().st_size
    man["sha256"]["ema.safetensors"] = ck.file_sha256(ckpt / "ema.safetensors")
    (ckpt / ck.MANIFEST).write_text(json.dumps(man))
    assert _resume_step(two_checkpoints) == 2


def test_pruning_keeps_the_newest_clean_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"

    def writers(step: int) -> dict:
        return {"w.bin": lambda p, s=step: p.write_bytes(bytes([s]) * 16)}

    ck.write_checkpoint(root, 1, writers(1), keep_last=1)
    ck.write_checkpoint(root, 2, writers(2), keep_last=1)
    ck.write_checkpoint(root, 3, writers(3), keep_last=1, clean=False)
    ck.write_checkpoint(root, 4, writers(4), keep_last=1, clean=False)
    assert [p.name for p in ck.list_checkpoints(root)] == ["0000002", "0000004"]
    (root / "0000002" / "w.bin").write_bytes(b"\x00" * 16)  # same size, other bytes: no longer verifies
    ck.write_checkpoint(root, 5, writers(5), keep_last=1)
    assert [p.name for p in ck.list_checkpoints(root)] == ["0000005"]


def test_lock_is_reentrant_and_records_the_holder(tmp_path):
    with RunLock(tmp_path / "run") as outer, RunLock(tmp_path / "run"):
        assert lock_holder(tmp_path / "run")["pid"] == __import__("os").getpid()
    assert outer._key is None
    with RunLock(tmp_path / "run"):  # released: can be taken again
        pass


@pytest.fixture
def held_by_other_process(tmp_path):
    folder = tmp_path / "run"
    code = ("import sys, time; from pae_fast.engine.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield folder, proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_second_process_on_a_folder_fails_at_once(tiny, held_by_other_process):
    folder, pid = held_by_other_process
    before = sorted(p.name for p in folder.iterdir())
    t0 = time.monotonic()
    with pytest.raises(RunLockedError, match=rf"in use by pid {pid}") as ei:
        train(tiny.make_task(), tiny.tiny_cfg(steps=2), folder, seed=0)
    assert time.monotonic() - t0 < 5
    assert exit_code_for(ei.value) == EXIT_BUSY
    assert sorted(p.name for p in folder.iterdir()) == before == [LOCK_FILE]  # no log.txt, no config written


def test_failed_resume_leaves_config_yaml(tiny, tmp_path):
    train(tiny.make_task(), tiny.tiny_cfg(steps=2, log_every=2, ckpt_every=2), tmp_path, seed=0, config_yaml="a: 1\n")
    f = tmp_path / "checkpoints" / "0000002" / "state.pt"
    f.write_bytes(b"\x00" * f.stat().st_size)
    with pytest.raises(ck.CheckpointError, match="every checkpoint .* is damaged"):
        train(tiny.make_task(), tiny.tiny_cfg(steps=4), tmp_path, seed=0, config_yaml="b: 2\n")
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"

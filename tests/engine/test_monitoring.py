"""What the engine reports: achieved TFLOP/s and MFU for tasks that count their FLOPs, and progress that does not
spam log files when stdout is not a terminal."""

import json
import logging

import pytest
import torch

from pae_fast.engine import train
from pae_fast.progress import is_terminal, progress


def test_flops_per_sample_reaches_stats_jsonl(tiny, tmp_path):
    task = tiny.make_task()
    task.flops_per_sample = 3.0e9
    res = train(task, tiny.tiny_cfg(steps=8, log_every=4), tmp_path)
    rec = [json.loads(line) for line in res.stats_path.read_text().splitlines()]
    assert [r["step"] for r in rec] == [4, 8]
    for r in rec:
        assert r["tflops"] == pytest.approx(3.0e9 * r["images_per_s"] / 1e12)
        assert r["mfu"] is None  # CPU: no peak FLOP/s to compare against (docs/architecture.md § Monitoring)
    assert "TFLOP/s" in (tmp_path / "log.txt").read_text()


def test_terms_reported_on_some_steps_are_averaged_over_those_steps(tiny, tmp_path):
    """A diagnostic a task computes only on logged steps (engine.runtime.is_log_step; e.g. the tokenizer's gradient
    shares) is logged at its value, not diluted by the steps that did not report it; every-step terms are means."""
    from pae_fast.engine.runtime import is_log_step

    cfg = tiny.tiny_cfg(steps=10, log_every=4)
    seen = []
    inner = tiny.make_loss()

    def loss_fn(model, batch, step):
        loss, terms = inner(model, batch, step)
        terms["step_id"] = torch.tensor(float(step))
        if is_log_step(step, cfg):
            seen.append(step)
            terms["diag"] = torch.tensor(100.0 + step)
        return loss, terms

    task = tiny.make_task()
    task.loss_fn = loss_fn
    res = train(task, cfg, tmp_path)
    rec = [json.loads(line) for line in res.stats_path.read_text().splitlines()]
    assert seen == [3, 7, 9] and [r["step"] for r in rec] == [4, 8, 10]
    assert [r["diag"] for r in rec] == [103.0, 107.0, 109.0]
    assert [r["step_id"] for r in rec] == [1.5, 5.5, 8.5]  # means over the interval's 4, 4 and 2 steps


def test_tasks_without_a_flop_count_report_none(tiny, tmp_path):
    res = train(tiny.make_task(), tiny.tiny_cfg(steps=4, log_every=4), tmp_path)
    rec = json.loads(res.stats_path.read_text().splitlines()[-1])
    assert "tflops" not in rec and "mfu" not in rec


def test_non_terminal_output_has_no_carriage_returns(tiny, tmp_path, capsys):
    assert not is_terminal()  # pytest captures stdout: the log-file situation
    train(tiny.make_task(), tiny.tiny_cfg(steps=8, log_every=4, progress=True), tmp_path)
    out = capsys.readouterr()
    assert "\r" not in out.out and "\r" not in out.err
    assert "step 8/8" in out.out + out.err + (tmp_path / "log.txt").read_text()


def test_progress_logs_every_n_items_off_a_terminal(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="pae_fast.progress"):
        assert list(progress(range(25), "sampling", every=10, unit="batch")) == list(range(25))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["sampling: 10/25 batch", "sampling: 20/25 batch", "sampling: 25/25 batch done"]
    out = capsys.readouterr()
    assert "\r" not in out.out and "\r" not in out.err
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pae_fast.progress"):
        assert list(progress(iter([1, 2]), "x", enabled=False)) == [1, 2]
    assert caplog.records == []

"""The demo's stage bookkeeping: config hashes, skipping finished stages, rerunning changed ones and those after."""

import json

import pytest

from pae_fast.errors import ConfigError
from pae_fast.stages.demo_stages import STAGE_FILE, StagePlan, StageRunner, config_hash


def _pipeline(root, settings_a, settings_b, calls):
    """Two chained stages; each records that it ran and writes a file."""
    runner = StageRunner(root, StagePlan({"a": 1.0, "b": 2.0}))

    def work(name):
        def fn(folder):
            calls.append(name)
            (folder / "out.txt").write_text(name)
            return {"value": len(calls), "path": str(folder / "out.txt")}
        return fn

    a = runner.run("a", settings_a, work("a"))
    b = runner.run("b", settings_b, work("b"), upstream=("a",))
    return runner, a, b


def test_config_hash_is_deterministic_and_chains_upstream():
    assert config_hash({"x": 1, "y": [1, 2]}) == config_hash({"y": [1, 2], "x": 1})
    assert config_hash({"x": 1}) != config_hash({"x": 2})
    assert config_hash({"x": 1}, ("h1",)) != config_hash({"x": 1}, ("h2",))


def test_finished_stages_are_skipped_with_their_recorded_result(tmp_path):
    calls = []
    _, a1, b1 = _pipeline(tmp_path, {"s": 1}, {"t": 1}, calls)
    assert calls == ["a", "b"] and not a1["skipped"] and not b1["skipped"]
    runner, a2, b2 = _pipeline(tmp_path, {"s": 1}, {"t": 1}, calls)
    assert calls == ["a", "b"]  # nothing ran again
    assert a2["skipped"] and b2["skipped"] and a2["value"] == a1["value"] and b2["path"] == b1["path"]
    rec = json.loads((tmp_path / "b" / STAGE_FILE).read_text())
    assert rec["status"] == "done" and rec["hash"] == runner.hashes["b"]


def test_a_changed_stage_reruns_itself_and_every_stage_after_it(tmp_path):
    calls = []
    _pipeline(tmp_path, {"s": 1}, {"t": 1}, calls)
    (tmp_path / "a" / "stale.txt").write_text("from the old settings")
    _pipeline(tmp_path, {"s": 2}, {"t": 1}, calls)  # only a's settings changed; b consumes a
    assert calls == ["a", "b", "a", "b"]
    assert not (tmp_path / "a" / "stale.txt").exists()  # the folder was cleared before the rerun
    _pipeline(tmp_path, {"s": 2}, {"t": 5}, calls)  # only b changed: a is reused
    assert calls == ["a", "b", "a", "b", "b"]


def test_an_interrupted_stage_resumes_in_place_and_a_foreign_folder_is_refused(tmp_path):
    runner = StageRunner(tmp_path)
    digest = config_hash({"s": 1})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "checkpoint.txt").write_text("partial")
    (tmp_path / "a" / STAGE_FILE).write_text(json.dumps({"stage": "a", "hash": digest, "status": "running"}))
    seen = []
    runner.run("a", {"s": 1}, lambda f: seen.append((f / "checkpoint.txt").read_text()) or {})
    assert seen == ["partial"]  # same settings, not finished: kept for the engine to resume
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "precious.txt").write_text("not ours")
    with pytest.raises(ConfigError, match="not written by the demo"):
        runner.run("b", {}, lambda f: {})
    assert (tmp_path / "b" / "precious.txt").read_text() == "not ours"


def test_eta_scales_the_remaining_estimate_by_measured_speed():
    plan = StagePlan({"a": 10.0, "b": 30.0})
    assert plan.eta(0.0) == 40.0
    plan.done["a"] = 20.0  # twice as slow as estimated
    assert plan.eta(20.0) == pytest.approx(60.0)
    plan.done["b"] = 0.0  # skipped
    assert plan.eta(20.0) == 0.0


def test_a_stage_needs_its_upstream_to_have_run(tmp_path):
    with pytest.raises(RuntimeError, match="have not run"):
        StageRunner(tmp_path).run("b", {}, lambda f: {}, upstream=("a",))


def test_user_vfm_weights_are_used_and_probed_instead_of_pretraining(tmp_path):
    import torch

    from pae_fast.config import Config
    from pae_fast.data.demo_images import build_demo_images
    from pae_fast.io import save_safetensors
    from pae_fast.stages.demo import _stage_vfm
    from pae_fast.stages.pretrain_vfm import build_vit_tiny

    torch.manual_seed(0)
    path = tmp_path / "vit.safetensors"
    save_safetensors(build_vit_tiny().state_dict(), path)
    cfg = Config()
    cfg.tokenizer.vfm_weights = str(path)
    demo = build_demo_images(train_per_class=4, heldout_per_class=2, num_classes=3)
    r = _stage_vfm(cfg, demo, tmp_path / "vfm")
    assert r["source"] == "local" and r["path"] == str(path) and 0.0 <= r["probe_accuracy"] <= 1.0
    assert not (tmp_path / "vfm").exists()  # nothing was pre-trained
    cfg.tokenizer.vfm_weights = str(tmp_path / "missing.safetensors")
    with pytest.raises(Exception, match="missing.safetensors"):
        _stage_vfm(cfg, demo, tmp_path / "vfm")

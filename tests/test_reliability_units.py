"""Units of "runs that can be trusted": the range table, exit codes, umask, the cache writer and index checks, the
run identity."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest
import torch

from pae_fast.config import Config, ConfigError, load_config
from pae_fast.config_checks import RULES, check_device_available, check_ranges, numeric_keys
from pae_fast.data.latent_cache import INDEX_FILE, LatentCache, write_latent_cache
from pae_fast.engine.checkpoint import CheckpointError
from pae_fast.errors import (
    EXIT_BUSY,
    EXIT_DATA,
    EXIT_INTERNAL,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    DataError,
    PreemptedError,
    RunLockedError,
    exit_code_for,
    raise_if_preempted,
    record_preemption,
)
from pae_fast.io import save_safetensors
from pae_fast.run_identity import IDENTITY_FILE, check_run_identity, record_run_identity, run_identity


def test_every_numeric_field_has_a_range_rule():
    keys = set(numeric_keys(Config()))
    ruled = {r.key for r in RULES}
    assert keys - ruled == set(), "numeric config fields without a rule in config_checks.RULES"
    assert ruled - keys == set(), "rules for keys that are not numeric fields"
    check_ranges(Config())  # the defaults are valid


@pytest.mark.parametrize("key,value,allowed", [
    ("train.global_batch_size", 0, ">= 1"), ("train.lr", 0.0, "> 0"), ("train.ema_decay", 1.0, "[0, 1)"),
    ("train.keep_last", -1, ">= 0"), ("train.betas", [0.9, 1.5], "each in [0, 1)"),
    ("sample.cfg_interval_start", 1.5, "[0, 1]"), ("sample.cfg_scale", -0.5, ">= 0"),
    ("sample.per_class", 0, ">= 1"), ("model.depth", 0, ">= 1"), ("eval.sec_rho", 2.0, "[0, 1]"),
    ("tokenizer.mcr_angles", [42.5, 270.0], "(0, 180]"), ("flow.logit_std", 0.0, "> 0"), ("seed", -1, ">= 0"),
])
def test_out_of_range_values_name_key_and_range(key, value, allowed):
    with pytest.raises(ConfigError) as ei:
        load_config(None, {key: value})
    assert key in str(ei.value) and allowed in str(ei.value)


def test_boundary_values_pass():
    load_config(None, {"train.ema_decay": 0.0, "sample.cfg_interval_start": 1.0, "sample.cfg_scale": 0.0,
                       "train.keep_last": 0, "sample.sde_noise_scale": 0.0, "sample.grid_max": 1})


def test_device_presence_names_the_key():
    check_device_available("cpu", "sample.device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sample.device='cuda:1'"):
            check_device_available("cuda:1", "sample.device")


def test_exit_codes():
    assert exit_code_for(ConfigError("x")) == EXIT_USAGE
    assert exit_code_for(DataError("x")) == EXIT_DATA
    assert exit_code_for(CheckpointError("x")) == EXIT_DATA
    assert exit_code_for(FileNotFoundError("x")) == EXIT_DATA
    assert exit_code_for(RunLockedError("x")) == EXIT_BUSY
    assert exit_code_for(PreemptedError("x")) == EXIT_PREEMPTED
    from pae_fast.engine.loop import NonFiniteLossError
    from pae_fast.weights import WeightsError

    assert exit_code_for(NonFiniteLossError("x")) == EXIT_NONFINITE
    assert exit_code_for(WeightsError("x")) == EXIT_DATA
    assert exit_code_for(TypeError("x")) == EXIT_INTERNAL
    record_preemption(PreemptedError("stopped"))
    with pytest.raises(PreemptedError, match="stopped"):
        raise_if_preempted()
    raise_if_preempted()  # taken once


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        save_safetensors({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
        from pae_fast.io import atomic_write_text

        atomic_write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    for name in ("w.safetensors", "t.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


def _cache(tmp_path, **kw):
    return write_latent_cache(tmp_path / "c", torch.randn(6, 4, 8, 8), torch.arange(6) % 2, num_classes=2,
                              shard_size=4, **kw)


def test_cache_writer_refuses_nan_and_bad_labels(tmp_path):
    z = torch.randn(6, 4, 8, 8)
    z[4, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match=r"latents of item 4 hold NaN/Inf"):
        write_latent_cache(tmp_path / "a", z, torch.zeros(6, dtype=torch.long))
    flip = torch.randn(6, 4, 8, 8)
    flip[1] = float("nan")
    with pytest.raises(DataError, match=r"latents_flip of item 1"):
        write_latent_cache(tmp_path / "b", torch.randn(6, 4, 8, 8), torch.zeros(6, dtype=torch.long), flip)
    with pytest.raises(DataError, match=r"label 2 of item 2 is outside \[0, 2\)"):
        write_latent_cache(tmp_path / "c", torch.randn(6, 4, 8, 8), torch.arange(6), num_classes=2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c" / INDEX_FILE).exists()


def test_cache_reader_checks_the_second_shard_with_global_item_numbers(tmp_path):
    c = _cache(tmp_path)
    from pae_fast.io import load_safetensors

    t, _ = load_safetensors(c / "shard-00001.safetensors")
    t["latents"][1, 0, 0, 0] = float("nan")
    save_safetensors(t, c / "shard-00001.safetensors")
    ds = LatentCache(c, hflip=False)
    ds[0]  # the first shard is fine
    with pytest.raises(DataError, match=r"shard-00001.safetensors: latents of item 5 hold NaN"):
        ds[5]


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "sub/../../x.safetensors", ""])
def test_index_shard_paths_are_confined(tmp_path, name):
    c = _cache(tmp_path)
    index = json.loads((c / INDEX_FILE).read_text())
    index["shards"][0]["file"] = name
    (c / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(DataError) as ei:
        LatentCache(c)
    assert repr(name) in str(ei.value)


def test_run_identity_check(tmp_path):
    cfg = load_config(None, {"model.in_channels": 4})
    ident = run_identity(cfg)
    check_run_identity(tmp_path, ident)  # nothing recorded: passes
    record_run_identity(tmp_path, ident)
    assert (tmp_path / IDENTITY_FILE).is_file()
    check_run_identity(tmp_path, run_identity(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1.0))))
    other = run_identity(load_config(None, {"model.in_channels": 8, "model.grad_checkpointing": True}))
    with pytest.raises(ConfigError, match=r"model.in_channels: the run has 4, this command 8") as ei:
        check_run_identity(tmp_path, other)
    assert "grad_checkpointing" not in str(ei.value)
    check_run_identity(tmp_path, other, resume="none")  # starting afresh is allowed


def test_run_identity_follows_cache_contents_not_path(tmp_path):
    c = _cache(tmp_path)
    moved = c.rename(tmp_path / "moved")
    a = run_identity(load_config(None, {"data.root": str(tmp_path / "c")}))
    assert "data.cache.index.json" not in a  # nothing there any more: the path is the identity
    b = run_identity(load_config(None, {"data.root": str(moved)}))
    c2 = write_latent_cache(tmp_path / "c2", torch.randn(6, 4, 8, 8), torch.arange(6) % 2, num_classes=2,
                            shard_size=4)
    d = run_identity(load_config(None, {"data.root": str(c2)}))
    assert "data.root" not in b and b["data.cache.index.json"] == d["data.cache.index.json"]  # same size, same index
    assert b["data.cache.stats.safetensors"] != d["data.cache.stats.safetensors"]


def test_open_run_checks_before_writing_and_records(tmp_path):
    from pae_fast.engine.lock import LOCK_FILE
    from pae_fast.run_identity import open_run

    four = run_identity(load_config(None, {"model.in_channels": 4}))
    with open_run(tmp_path / "run", four) as out:
        assert (out / IDENTITY_FILE).is_file() and (out / LOCK_FILE).is_file()
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    eight = run_identity(load_config(None, {"model.in_channels": 8}))
    with pytest.raises(ConfigError, match="model.in_channels"), open_run(tmp_path / "run", eight):
        pass
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    with open_run(tmp_path / "run", eight, resume="none"):  # afresh: the new identity replaces the old
        pass
    check_run_identity(tmp_path / "run", eight)

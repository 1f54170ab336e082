"""pae_fast.weights: the one loader of trained weights (files, checkpoint and run folders, authors' layouts)."""

import pickle

import pytest
import torch
from torch import nn

from pae_fast.engine.checkpoint import save_weights, write_checkpoint
from pae_fast.io import save_safetensors
from pae_fast.weights import (
    WeightsError,
    key_diff,
    load_into,
    load_weights,
    read_metadata,
    read_state_dict,
    resolve_weights_file,
)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_safetensors_file_with_metadata(tmp_path):
    src, dst = _net(0), _net(1)
    save_safetensors(src.state_dict(), tmp_path / "w.safetensors", metadata={"step": "7"})
    assert not _same(src, dst)
    meta = load_weights(dst, tmp_path / "w.safetensors")
    assert _same(src, dst) and meta["step"] == "7" and meta["weights_file"] == str(tmp_path / "w.safetensors")
    assert read_metadata(tmp_path / "w.safetensors") == (tmp_path / "w.safetensors", {"step": "7"})
    (tmp_path / "bad.safetensors").write_bytes(b"not a header")
    with pytest.raises(WeightsError, match=r"bad\.safetensors is damaged"):
        read_metadata(tmp_path / "bad.safetensors")


def test_authors_torch_checkpoint_layout_and_wrapper_prefixes(tmp_path):
    ema, model = _net(0), _net(1)
    wrapped = {f"module._orig_mod.{k}": v for k, v in ema.state_dict().items()}
    torch.save({"model": model.state_dict(), "ema": wrapped, "opt": {"step": 3}}, tmp_path / "ckpt.pt")
    dst = _net(2)
    load_weights(dst, tmp_path / "ckpt.pt")  # prefers "ema", strips module. and _orig_mod.
    assert _same(dst, ema)
    load_weights(dst, tmp_path / "ckpt.pt", prefer=("model",))
    assert _same(dst, model)
    state, meta = read_state_dict(tmp_path / "ckpt.pt")
    assert sorted(state) == sorted(ema.state_dict()) and meta == {}


def test_weights_only_refuses_a_pickled_object(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": Payload()}, protocol=2))
    with pytest.raises(WeightsError, match=r"evil\.pt cannot be read as a tensors-only torch file"):
        read_state_dict(tmp_path / "evil.pt")


def test_key_mismatch_gives_a_readable_diff(tmp_path):
    state = _net(0).state_dict()
    state["extra.weight"] = state.pop("2.weight")
    state["0.bias"] = torch.zeros(5)
    save_safetensors(state, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError) as e:
        load_weights(_net(1), tmp_path / "w.safetensors", key="model.checkpoint")
    msg = str(e.value)
    assert "model.checkpoint=" in msg and "w.safetensors" in msg and "does not fit Sequential" in msg
    assert "missing 1: 2.weight" in msg and "unexpected 1: extra.weight" in msg
    assert "wrong shape 1: 0.bias (5,) (expected (4,))" in msg
    assert key_diff(_net(0).state_dict(), _net(1).state_dict()) == ""
    dst = _net(1)
    load_into(dst, {k: v for k, v in _net(0).state_dict().items() if k != "2.bias"}, strict=False)  # partial ok
    with pytest.raises(WeightsError, match="missing 1: 2.bias"):
        load_into(dst, {k: v for k, v in _net(0).state_dict().items() if k != "2.bias"})


def test_run_and_checkpoint_folder_resolution(tmp_path):
    ema, model = _net(0), _net(1)
    run = tmp_path / "run"
    files = {"ema.safetensors": save_weights(ema.state_dict(), {"weights": "ema"}),
             "model.safetensors": save_weights(model.state_dict(), {"weights": "model"})}
    write_checkpoint(run / "checkpoints", 5, files)
    newest = write_checkpoint(run / "checkpoints", 10, files)
    assert resolve_weights_file(run) == newest / "ema.safetensors"
    assert resolve_weights_file(run, prefer_ema=False) == newest / "model.safetensors"
    assert resolve_weights_file(newest) == newest / "ema.safetensors"
    dst = _net(2)
    assert load_weights(dst, run, prefer=("model", "ema"))["weights"] == "model" and _same(dst, model)
    with pytest.raises(WeightsError, match=r"sample.checkpoint='.*nowhere' does not exist"):
        resolve_weights_file(tmp_path / "nowhere", key="sample.checkpoint")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no complete checkpoint"):
        resolve_weights_file(tmp_path / "empty")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(WeightsError, match="suffix '.npz'"):
        read_state_dict(tmp_path / "w.npz")

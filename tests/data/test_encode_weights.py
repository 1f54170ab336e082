"""Latents from the tokenizer's trained (non-EMA) weights by default, as the PAE authors' ``extract_latents.py``
("don't use ema ckpt"); ``tokenizer.encode_weights: ema`` on request; the choice recorded as ``tokenizer_weights``
in the cache / checkpoint metadata and checked on resume and reuse (docs/method.md § Building a cache)."""

from __future__ import annotations

import json
import types

import pytest
import torch

from pae_fast.config import load_config
from pae_fast.data.images import ImageDataset, find_samples
from pae_fast.data.latent_cache import LatentCache
from pae_fast.engine.checkpoint import save_weights, write_checkpoint
from pae_fast.errors import ConfigError
from pae_fast.io import load_safetensors, save_safetensors
from pae_fast.registry import create_tokenizer
from pae_fast.stages.cache_latents import CacheError, cache_latents
from pae_fast.stages.frozen_tokenizer import load_frozen_tokenizer
from pae_fast.weights import WeightsError

from .test_cache_latents import StandInTokenizer, _cfg, _stand_in_factory


def _two_states(seed_raw: int = 0, seed_ema: int = 1) -> tuple[dict, dict]:
    """The state dicts of two different PAE-tiny tokenizers: the trained weights and their 'EMA'."""
    out = []
    for seed in (seed_raw, seed_ema):
        torch.manual_seed(seed)
        out.append(create_tokenizer("PAE-tiny").state_dict())
    return out[0], out[1]


def _same(module: torch.nn.Module, state: dict) -> bool:
    got = module.state_dict()
    return all(torch.equal(got[k], v) for k, v in state.items() if k in got)


def _run_folder(tmp_path, raw: dict, ema: dict):
    run = tmp_path / "run"
    files = {"model.safetensors": save_weights(raw, {"weights": "model"}),
             "ema.safetensors": save_weights(ema, {"weights": "ema"})}
    return run, write_checkpoint(run / "checkpoints", 10, files)


def test_a_run_folder_encodes_with_the_raw_weights_unless_ema_is_asked(tmp_path):
    raw, ema = _two_states()
    run, ckpt = _run_folder(tmp_path, raw, ema)
    tok, digest = load_frozen_tokenizer("PAE-tiny", run)  # default: raw
    assert _same(tok, raw) and not _same(tok, ema)
    tok_ema, digest_ema = load_frozen_tokenizer("PAE-tiny", run, which="ema")
    assert _same(tok_ema, ema) and digest_ema != digest  # different files, different hashes
    # an explicit file that says it holds the other weights is refused, naming both
    with pytest.raises(ConfigError, match=r"holds the ema weights \(ema\) but tokenizer.encode_weights=raw"):
        load_frozen_tokenizer("PAE-tiny", ckpt / "ema.safetensors")
    with pytest.raises(ConfigError, match="tokenizer.encode_weights='best'"):
        load_frozen_tokenizer("PAE-tiny", run, which="best")


def test_a_torch_checkpoint_gives_its_model_state_dict_by_default(tmp_path):
    """The authors' torch checkpoints hold ``{"model": ..., "ema": ...}``: raw takes "model", ema takes "ema"."""
    raw, ema = _two_states()
    both = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in raw.items()}, "ema": ema, "opt": {"step": 3}}, both)
    tok, _ = load_frozen_tokenizer("PAE-tiny", both)
    assert _same(tok, raw) and not _same(tok, ema)
    tok, _ = load_frozen_tokenizer("PAE-tiny", both, which="ema")
    assert _same(tok, ema)
    only_ema = tmp_path / "ema_only.pt"
    torch.save({"ema": ema}, only_ema)
    with pytest.raises(WeightsError, match=r"tried keys \['model'\]"):  # never the EMA silently
        load_frozen_tokenizer("PAE-tiny", only_ema)


def test_cache_records_and_checks_tokenizer_weights(tmp_path, image_tree):
    tok = StandInTokenizer()
    kw = dict(tokenizer_name="stand-in", weights_hash="abc", shard_size=5)
    cache_latents(tok, _cfg(image_tree), tmp_path / "raw", **kw)
    cache = LatentCache(tmp_path / "raw", normalize=True, hflip=False)
    assert cache.metadata["tokenizer_weights"] == "raw"  # the default
    assert json.loads((tmp_path / "raw" / "cache.json").read_text())["tokenizer_weights"] == "raw"
    assert load_safetensors(tmp_path / "raw" / "shard-00000.safetensors")[1]["tokenizer_weights"] == "raw"
    cache_latents(tok, _cfg(image_tree), tmp_path / "ema", tokenizer_weights="ema", **kw)
    assert LatentCache(tmp_path / "ema", normalize=True, hflip=False).metadata["tokenizer_weights"] == "ema"
    with pytest.raises(CacheError, match=r"tokenizer_weights: folder has 'raw', this run 'ema'"):
        cache_latents(tok, _cfg(image_tree), tmp_path / "raw", tokenizer_weights="ema", **kw)
    # a shard written with the other weights is foreign too
    cj = tmp_path / "ema" / "cache.json"
    cj.write_text(cj.read_text().replace('"tokenizer_weights": "ema"', '"tokenizer_weights": "raw"'))
    with pytest.raises(CacheError, match="shard .*belongs to another cache"):
        cache_latents(tok, _cfg(image_tree), tmp_path / "ema", **kw)


def test_cache_latents_cli_on_a_run_folder(tmp_path, image_tree, monkeypatch, capsys):
    from pae_fast.cli import main
    from pae_fast.registry import TOKENIZERS

    TOKENIZERS.names()
    monkeypatch.setitem(TOKENIZERS._entries, "test-stand-in", _stand_in_factory)
    raw = StandInTokenizer().state_dict()
    ema = {k: v + 0.25 for k, v in raw.items()}
    run, _ = _run_folder(tmp_path, raw, ema)
    argv = ["cache-latents", "--tokenizer", "test-stand-in", "--weights", str(run), "--shard-size", "5",
            "--data.root", str(image_tree), "--data.num_classes", "3", "--data.image_size", "32", "--data.loader",
            "pil", "--data.num_workers", "0", "--data.batch_size", "4", "--train.device", "cpu"]
    ref = {}
    for which, state in (("raw", raw), ("ema", ema)):
        out = tmp_path / which
        assert main([*argv, "--out", str(out), "--tokenizer.encode_weights", which]) == 0
        cache = LatentCache(out, normalize=False, hflip=False)
        assert cache.metadata["tokenizer_weights"] == which
        tok = StandInTokenizer()
        tok.load_state_dict(state)
        z, _ = cache[0]
        x = ImageDataset(find_samples(str(image_tree), None, 3), 32)[0][0]
        with torch.no_grad():
            ref[which] = tok.encode(x[None])[0]
        torch.testing.assert_close(z, ref[which], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref["raw"], ref["ema"])
    # resuming the raw cache with the EMA weights is refused with one line
    assert main([*argv, "--out", str(tmp_path / "raw"), "--tokenizer.encode_weights", "ema"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer_weights: folder has 'raw', this run 'ema'" in err[0]


def test_online_encoding_records_and_checks_the_choice(tmp_path):
    from pae_fast.stages.online_latents import OnlineLatentData
    from pae_fast.stages.train_generator import _check_data_fits_model

    cfg = load_config(None, {"data.latents": "online", "tokenizer.name": "PAE-tiny"})
    assert cfg.tokenizer.encode_weights == "raw"
    ckpt = tmp_path / "model.safetensors"
    save_safetensors({"w": torch.zeros(1)}, ckpt, metadata={"tokenizer_weights": "ema"})
    resumed = load_config(None, {"data.latents": "online", "tokenizer.name": "PAE-tiny", "train.resume": str(ckpt)})
    with pytest.raises(ConfigError, match="tokenizer.encode_weights=raw but the run being resumed .* ema weights"):
        OnlineLatentData.from_config(resumed)
    images = types.SimpleNamespace(path="IMAGES")  # the dataset's name is all metadata() reads of it
    online = OnlineLatentData(StandInTokenizer(), "stand-in", "abc", images, torch.device("cpu"),
                              tokenizer_weights="ema")
    assert online.metadata()["tokenizer_weights"] == "ema"
    # a cache encoded with other weights than the config names is refused by train-dit, naming both
    with pytest.raises(ConfigError, match="tokenizer.encode_weights is 'raw' but the cache was encoded with .*'ema'"):
        _check_data_fits_model((32, 16, 16), 10, cfg.model, "CACHE", {"tokenizer_weights": "ema"}, cfg.tokenizer)
    _check_data_fits_model((32, 16, 16), 10, cfg.model, "CACHE", {"tokenizer_weights": "raw"}, cfg.tokenizer)

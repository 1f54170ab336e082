"""cache-latents (pae_fast/stages/cache_latents.py) with a stand-in tokenizer on real JPEGs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pae_fast.config import DataConfig
from pae_fast.data.images import ImageDataset, load_class_mapping, scan_image_folder
from pae_fast.data.latent_cache import LatentCache
from pae_fast.data.latent_stats import LatentStats
from pae_fast.errors import EXIT_DATA
from pae_fast.io import load_safetensors
from pae_fast.stages.cache_latents import CacheError, cache_latents, finalize_cache, write_shards


class StandInTokenizer(nn.Module):
    """The tokenizer interface: ``encode(images in [0, 1]) -> (B, 4, 8, 8)``, not flip-equivariant (a fixed mix of
    neighbouring columns), so ``latents_flip`` really is the encoding of the mirrored image."""

    image_size = 32
    latent_shape = (4, 8, 8)
    stats_mode = "channel"

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 4, kernel_size=(1, 2), padding=(0, 0), bias=True)
        with torch.no_grad():
            self.proj.weight.copy_(torch.linspace(-1, 1, 24).view(4, 3, 1, 2))
            self.proj.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, 4)  # (B, 3, 8, 8)
        return self.proj(F.pad(x, (0, 1, 0, 0), mode="replicate"))  # (B, 4, 8, 8)


def _stand_in_factory(pretrained: bool = False, weights=None, vfm_weights=None) -> StandInTokenizer:
    """The registry's constructor contract (``create_tokenizer(name, pretrained=, weights=, vfm_weights=)``)."""
    from pae_fast.weights import load_weights

    tok = StandInTokenizer()
    if weights is not None:
        load_weights(tok, weights)
    return tok


def _cfg(root) -> DataConfig:
    return DataConfig(root=str(root), num_classes=3, image_size=32, batch_size=5, loader="pil", num_workers=0)


def _run(tok, root, out, **kw):
    return cache_latents(tok, _cfg(root), out, tokenizer_name="stand-in", weights_hash="abc", shard_size=5, **kw)


def test_cache_round_trip(tmp_path, image_tree):
    tok = StandInTokenizer()
    stats = _run(tok, image_tree, tmp_path / "cache")
    cache = LatentCache(tmp_path / "cache", normalize=False, hflip=True)
    assert len(cache) == 24 and cache.channels == 4 and cache.size == (8, 8) and cache.num_classes == 3
    assert cache.metadata["tokenizer"] == "stand-in" and cache.metadata["weights_hash"] == "abc"
    assert cache.metadata["resolution"] == 32 and cache.metadata["stats_mode"] == "channel"
    samples = scan_image_folder(image_tree)
    assert load_class_mapping(tmp_path / "cache") == samples.classes
    images = torch.stack([ImageDataset(samples, 32, hflip=False)[i][0] for i in range(12)])
    with torch.no_grad():
        want, want_flip = tok.encode(images), tok.encode(images.flip(-1))
    z, y = cache.load_all()
    assert torch.equal(z, want) and torch.equal(y, torch.tensor(samples.labels))
    assert torch.equal(cache.load_all(flip=True)[0], want_flip)
    assert not torch.allclose(want_flip, want.flip(-1), atol=1e-3)  # the stand-in is not flip-equivariant
    ref = LatentStats.load(tmp_path / "cache" / "stats.safetensors")
    assert torch.allclose(ref.mean, want.double().mean((0, 2, 3)).float(), atol=1e-6) and ref.count == 12
    assert torch.equal(stats.mean, ref.mean)


def test_resume_and_world_size_give_identical_shards(tmp_path, image_tree):
    tok = StandInTokenizer()
    _run(tok, image_tree, tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").glob("shard-*.safetensors"))
    assert files == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    # Interrupted run: shard 1 and the index never written; re-running rewrites only what is missing.
    (tmp_path / "a" / "shard-00001.safetensors").unlink()
    (tmp_path / "a" / "index.json").unlink()
    before = (tmp_path / "a" / "shard-00000.safetensors").stat().st_mtime_ns
    _run(tok, image_tree, tmp_path / "a")
    assert (tmp_path / "a" / "shard-00000.safetensors").stat().st_mtime_ns == before
    # Two ranks (run one after the other here), then rank 0 finalises.
    for rank in range(2):
        written = write_shards(tok, _cfg(image_tree), tmp_path / "b", tokenizer_name="stand-in", weights_hash="abc",
                               shard_size=5, rank=rank, world_size=2)
        assert [p.name for p in written] == [files[k] for k in range(rank, 3, 2)]
    finalize_cache(tmp_path / "b")
    for name in [*files, "stats.safetensors"]:
        a, b = load_safetensors(tmp_path / "a" / name)[0], load_safetensors(tmp_path / "b" / name)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    index_a, index_b = (json.loads((tmp_path / d / "index.json").read_text()) for d in "ab")
    assert index_a == index_b


def test_refusals(tmp_path, image_tree):
    tok = StandInTokenizer()
    _run(tok, image_tree, tmp_path / "c")
    with pytest.raises(CacheError, match=r"another run \(tokenizer: folder has 'stand-in', this run 'other'"):
        cache_latents(tok, _cfg(image_tree), tmp_path / "c", tokenizer_name="other", weights_hash="abc",
                      shard_size=5)
    shard = tmp_path / "c" / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CacheError, match=r"shard .*shard-00002.safetensors cannot be read"):
        _run(tok, image_tree, tmp_path / "c")
    with pytest.raises(CacheError, match="data.image_size=64 but tokenizer stand-in encodes 32 px"):
        cache_latents(tok, dataclasses.replace(_cfg(image_tree), image_size=64), tmp_path / "d",
                      tokenizer_name="stand-in", weights_hash="abc")
    with pytest.raises(CacheError, match="has no cache.json"):
        finalize_cache(tmp_path / "empty")


def test_cli_end_to_end_with_skip(tmp_path, image_tree, monkeypatch, capsys):
    from pae_fast.cli import main
    from pae_fast.io import save_safetensors
    from pae_fast.registry import TOKENIZERS

    TOKENIZERS.names()  # load the registered modules first
    monkeypatch.setitem(TOKENIZERS._entries, "test-stand-in", _stand_in_factory)
    weights = tmp_path / "tok.safetensors"
    save_safetensors(StandInTokenizer().state_dict(), weights)
    bad = sorted(image_tree.rglob("*.jpg"))[4]
    bad.write_bytes(bad.read_bytes()[:300])
    argv = ["cache-latents", "--tokenizer", "test-stand-in", "--weights", str(weights), "--out", str(tmp_path / "c"),
            "--shard-size", "5", "--data.root", str(image_tree), "--data.num_classes", "3", "--data.image_size",
            "32", "--data.loader", "pil", "--data.num_workers", "0", "--data.batch_size", "4",
            "--train.device", "cpu"]
    assert main(argv) == EXIT_DATA  # one error line naming the file
    assert f"{bad}: not a decodable image" in capsys.readouterr().err
    assert main([*argv, "--data.on_bad_file", "skip"]) == 0
    cache = LatentCache(tmp_path / "c", normalize=True, hflip=False)
    assert len(cache) == 11 and cache.metadata["bad_files"] == 1 and len(cache.metadata["weights_hash"]) == 64


_RANK_SCRIPT = '''
import json, os, sys
import torch
import torch.nn.functional as F
from torch import nn
from pae_fast.config import DataConfig
from pae_fast.engine import distributed as D
from pae_fast.stages.cache_latents import cache_latents

{tokenizer_source}

root, out = sys.argv[1], sys.argv[2]
assert D.init_from_env(torch.device("cpu"))
cfg = DataConfig(root=root, num_classes=3, image_size=32, batch_size=5, loader="pil", num_workers=0)
cache_latents(StandInTokenizer(), cfg, out, tokenizer_name="stand-in", weights_hash="abc", shard_size=5,
              rank=D.get_rank(), world_size=D.get_world_size())
D.cleanup()
print("RANK_DONE", D.get_rank())
'''


def test_two_ranks_under_gloo(tmp_path, image_tree):
    import inspect
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT.format(tokenizer_source=inspect.getsource(StandInTokenizer)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(image_tree), str(tmp_path / "dist")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"RANK_DONE {rank}" in text, text[-3000:]
    _run(StandInTokenizer(), image_tree, tmp_path / "single")
    for name in ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors",
                 "stats.safetensors"]:
        a, b = load_safetensors(tmp_path / "single" / name)[0], load_safetensors(tmp_path / "dist" / name)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    index = json.loads((tmp_path / "dist" / "index.json").read_text())
    assert index == json.loads((tmp_path / "single" / "index.json").read_text())


def test_statistics_subset_is_spread_over_the_classes(tmp_path, image_tree):
    tok = StandInTokenizer()
    _run(tok, image_tree, tmp_path / "c")
    finalize_cache(tmp_path / "c", stats_items=4)  # 12 items in class order: every 3rd, from all 3 classes
    stats = LatentStats.load(tmp_path / "c" / "stats.safetensors")
    z, y = LatentCache(tmp_path / "c", normalize=False).load_all()
    assert stats.count == 4 and set(y[::3].tolist()) == {0, 1, 2}
    torch.testing.assert_close(stats.mean, z[::3].double().mean((0, 2, 3)).float(), atol=1e-6, rtol=0)

"""Latents from the real tokenizers (PAE-tiny: per-channel statistics; RAE-tiny: per-(C, H, W)) on real JPEGs, with
random weights allowed explicitly: ``cache-latents`` (metadata, resume, refusals, ``train-dit`` on the result) and
``train-dit`` with ``data.latents: online`` (statistics in the checkpoint, bad-file count in ``stats.jsonl``,
``sample`` from it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pae_fast import __version__
from pae_fast.cli import main
from pae_fast.data.images import ImageDataset, load_class_mapping, scan_image_folder
from pae_fast.data.latent_cache import LatentCache
from pae_fast.data.latent_stats import LatentStats
from pae_fast.engine.checkpoint import file_sha256
from pae_fast.errors import EXIT_DATA, EXIT_USAGE
from pae_fast.io import load_safetensors, save_safetensors
from pae_fast.stages.frozen_tokenizer import load_frozen_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
FAST = ["--train.progress", "false", "--train.log_every", "1", "--train.ckpt_every", "100", "--train.tf32", "false"]
LATENT = {"PAE-tiny": (8, 8, 8), "RAE-tiny": (128, 8, 8)}



def cache_cli(tokenizer: str, root: Path, out: Path, *extra: str) -> int:
    return main(["cache-latents", "--tokenizer", tokenizer, "--out", str(out), "--shard-size", "5", "--data.root",
                 str(root), "--data.num_classes", "3", "--data.image_size", "64", "--data.loader", "pil",
                 "--data.num_workers", "0", "--data.batch_size", "6", "--train.device", "cpu", *extra])


def generator_args(tokenizer: str) -> list[str]:
    c, h, _ = LATENT[tokenizer]
    return ["--config", TINY, "--tokenizer.name", tokenizer, "--model.in_channels", str(c), "--model.input_size",
            str(h), "--model.num_classes", "3", "--data.num_classes", "3", "--train.global_batch_size", "6",
            "--data.batch_size", "6", *FAST]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cache_latents_with_pae_tiny(tmp_path, image_tree, capsys, snapshot):
    out = tmp_path / "cache"
    assert cache_cli("PAE-tiny", image_tree, out) == EXIT_USAGE  # random weights are never silent
    assert "--weights" in one_error_line(capsys) and not out.exists()

    assert cache_cli("PAE-tiny", image_tree, out, "--random-init") == 0
    cache = LatentCache(out, normalize=False, hflip=True)
    meta = cache.metadata
    assert len(cache) == 24 and (cache.channels, *cache.size) == LATENT["PAE-tiny"] and cache.num_classes == 3
    assert meta["tokenizer"] == "PAE-tiny" and meta["weights_hash"].startswith("random-init:")
    assert meta["resolution"] == 64 and meta["stats_mode"] == "channel" and meta["pae_fast_version"] == __version__
    samples = scan_image_folder(image_tree)
    assert load_class_mapping(out) == samples.classes
    stats = LatentStats.load(out / "stats.safetensors")
    assert stats.mode == "channel" and stats.mean.shape == (8,) and stats.count == 12

    # the same seeded random tokenizer, built again, encodes the same images into the cached latents
    tok, digest = load_frozen_tokenizer("PAE-tiny", None, random_init=True, seed=0)
    assert digest == meta["weights_hash"]
    images = torch.stack([ImageDataset(samples, 64, hflip=False)[i][0] for i in range(12)])
    z, y = cache.load_all()
    with torch.no_grad():
        torch.testing.assert_close(z, tok.encode(images), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache.load_all(flip=True)[0], tok.encode(images.flip(-1)), rtol=1e-4, atol=1e-4)
    assert torch.equal(y, torch.tensor(samples.labels))

    # resume: a lost shard and index are rewritten, finished shards are kept as they are
    index = (out / "index.json").read_text()
    kept = (out / "shard-00000.safetensors").stat().st_mtime_ns
    (out / "shard-00001.safetensors").unlink()
    (out / "index.json").unlink()
    assert cache_cli("PAE-tiny", image_tree, out, "--random-init") == 0
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == kept and (out / "index.json").read_text() == index

    # a folder written by another tokenizer is refused and left as it was
    before = snapshot(out)
    capsys.readouterr()
    assert cache_cli("RAE-tiny", image_tree, out, "--random-init") == EXIT_DATA
    line = one_error_line(capsys)
    assert "another run" in line and "'PAE-tiny'" in line and "'RAE-tiny'" in line
    assert snapshot(out) == before

    # the same weights from a file: hashed by the file's SHA-256, same latents
    weights = tmp_path / "pae_tiny.safetensors"
    save_safetensors(tok.state_dict(), weights)
    assert cache_cli("PAE-tiny", image_tree, tmp_path / "from_file", "--weights", str(weights)) == 0
    other = LatentCache(tmp_path / "from_file", normalize=False)
    assert other.metadata["weights_hash"] == file_sha256(weights)
    assert torch.equal(other.load_all()[0], z)

    # train-dit refuses the cache under another tokenizer name (nothing written), then trains a few steps on it
    run = tmp_path / "run"
    args = ["train-dit", *generator_args("PAE-tiny"), "--data.root", str(out), "--out_dir", str(run)]
    capsys.readouterr()
    assert main([*args, "--tokenizer.name", "RAE-tiny", "--train.steps", "2"]) == EXIT_USAGE
    line = one_error_line(capsys)
    assert "tokenizer.name is 'RAE-tiny'" in line and "'PAE-tiny'" in line and not run.exists()
    assert main([*args, "--model.in_channels", "4", "--train.steps", "2"]) == EXIT_USAGE
    assert "model.in_channels is 4 but the cache has 8 channels" in one_error_line(capsys) and not run.exists()
    assert main([*args, "--train.steps", "3"]) == 0
    records = [json.loads(s) for s in (run / "stats.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    _, ck_meta = load_safetensors(run / "checkpoints" / "0000003" / "ema.safetensors")
    torch.testing.assert_close(LatentStats.from_metadata(ck_meta).mean, stats.mean)


def test_cache_latents_with_rae_tiny_has_chw_stats(tmp_path, image_tree):
    out = tmp_path / "cache"
    assert cache_cli("RAE-tiny", image_tree, out, "--random-init", "--stats-items", "0") == 0
    cache = LatentCache(out, normalize=True, hflip=False)
    assert cache.metadata["tokenizer"] == "RAE-tiny" and cache.metadata["stats_mode"] == "chw"
    assert cache.stats.mode == "chw" and tuple(cache.stats.mean.shape) == LATENT["RAE-tiny"]
    z = torch.stack([cache[i][0] for i in range(len(cache))])  # standardised per (C, H, W)
    torch.testing.assert_close(z.double().mean(0), torch.zeros(LATENT["RAE-tiny"], dtype=torch.float64),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("tokenizer", ["PAE-tiny", "RAE-tiny"])
def test_online_encoding_trains_and_samples(tokenizer, tmp_path, image_tree, capsys):
    bad = sorted(image_tree.rglob("*.jpg"))[5]
    bad.write_bytes(bad.read_bytes()[:200])
    run = tmp_path / "run"
    args = ["train-dit", *generator_args(tokenizer), "--data.latents", "online", "--data.root", str(image_tree),
            "--data.image_size", "64", "--data.on_bad_file", "skip", "--out_dir", str(run), "--train.steps", "3"]
    assert main(args) == EXIT_USAGE  # no tokenizer.checkpoint and random weights not allowed
    assert "tokenizer.checkpoint" in one_error_line(capsys) and not run.exists()
    assert main([*args, "--tokenizer.random_init", "true"]) == 0
    records = [json.loads(s) for s in (run / "stats.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["data/bad_files"] == 1  # the truncated JPEG, skipped and counted
    _, meta = load_safetensors(run / "checkpoints" / "0000003" / "ema.safetensors")
    stats = LatentStats.from_metadata(meta)
    assert stats.mode == ("channel" if tokenizer == "PAE-tiny" else "chw") and stats.count == 11
    assert meta["latent_source"] == "online" and meta["tokenizer"] == tokenizer
    assert meta["tokenizer_weights_hash"].startswith("random-init:")
    # the statistics are those of the tokenizer's latents of the (good) images
    tok, _ = load_frozen_tokenizer(tokenizer, None, random_init=True, seed=0)
    samples = scan_image_folder(image_tree)
    ds = ImageDataset(samples, 64, hflip=False)
    images = torch.stack([ds[i][0] for i in range(len(samples)) if Path(samples.paths[i]) != bad])
    with torch.no_grad():
        z = tok.encode(images).double()
    want = z.mean((0, 2, 3)) if tokenizer == "PAE-tiny" else z.mean(0)
    torch.testing.assert_close(stats.mean.double(), want, rtol=1e-3, atol=1e-4)
    # sampling from the run de-normalises with those statistics, unchanged
    assert main(["sample", "--config", TINY, "--out_dir", str(run), "--sample.checkpoint", str(run),
                 "--sample.num_samples", "2", "--sample.batch_size", "2", "--sample.steps", "2",
                 "--sample.device", "cpu"]) == 0
    newest = sorted((run / "checkpoints").iterdir())[-1].name  # samples go beside the checkpoint sampled
    latents = load_safetensors(run / "samples" / newest / "latents.safetensors")[0]["latents"]
    assert tuple(latents.shape) == (2, *LATENT[tokenizer]) and bool(torch.isfinite(latents).all())
    # a resumed run standardises with the statistics of the checkpoint it resumes, not recomputed ones
    assert main([*args[:-1], "5", "--tokenizer.random_init", "true"]) == 0
    resumed = LatentStats.from_metadata(load_safetensors(run / "checkpoints" / "0000005" / "ema.safetensors")[1])
    assert torch.equal(resumed.mean, stats.mean) and torch.equal(resumed.std, stats.std)
    # given statistics (data.latent_stats) are used as they are, after a check of their mode and shape
    given = tmp_path / "given_stats.safetensors"
    LatentStats(stats.mode, stats.mean + 1, stats.std * 2).save(given)
    run2 = tmp_path / "run2"
    base = [*args[:-1], "1", "--tokenizer.random_init", "true", "--out_dir", str(run2)]
    assert main([*base, "--data.latent_stats", str(given)]) == 0
    used = LatentStats.from_metadata(load_safetensors(run2 / "checkpoints" / "0000001" / "ema.safetensors")[1])
    torch.testing.assert_close(used.mean, stats.mean + 1)
    wrong = tmp_path / "wrong_stats.safetensors"
    LatentStats("channel", torch.zeros(3), torch.ones(3)).save(wrong)
    capsys.readouterr()
    assert main([*base, "--out_dir", str(tmp_path / "run3"), "--data.latent_stats", str(wrong)]) == EXIT_USAGE
    assert "data.latent_stats" in one_error_line(capsys) and not (tmp_path / "run3").exists()

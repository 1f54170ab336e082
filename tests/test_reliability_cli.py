"""Runs that can be trusted, through the command line: every bad input exits non-zero with one line naming the key
or file and leaves an existing run folder unchanged byte for byte; SIGTERM exits with the preempted code; the same
seed gives the same weights."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pae_fast.cli import main
from pae_fast.data.latent_cache import INDEX_FILE, write_latent_cache
from pae_fast.errors import EXIT_BUSY, EXIT_DATA, EXIT_PREEMPTED, EXIT_USAGE
from pae_fast.io import load_safetensors, save_safetensors

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
FAST = ["--train.progress", "false", "--train.log_every", "2", "--train.ckpt_every", "2"]
# a damaged cache is a data error (exit 3) whether it fails to open or later, at a read.
CACHE_OPEN_CODE = EXIT_DATA


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path):
    """Another process holding ``folder``'s run lock while the block runs; yields that process."""
    code = ("import sys, time; from pae_fast.engine.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()



@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 4-step tiny run (4 latent channels)."""
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train-dit", "--config", TINY, "--out_dir", str(out), "--train.steps", "4", *FAST]) == 0
    return out


def _cache(folder: Path, n: int = 8) -> Path:
    g = torch.Generator().manual_seed(0)
    return write_latent_cache(folder, torch.randn(n, 4, 8, 8, generator=g), torch.arange(n) % 2, num_classes=2)


def _edit_shard(cache: Path, **changes) -> None:
    f = cache / "shard-00000.safetensors"
    tensors, _ = load_safetensors(f)
    for key, fn in changes.items():
        tensors[key] = fn(tensors[key])
    save_safetensors(tensors, f)


def nan_cache(tmp: Path) -> Path:
    c = _cache(tmp / "cache")

    def poison(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        z[3, 1, 2, 2] = float("nan")
        return z

    _edit_shard(c, latents=poison)
    return c


def big_label_cache(tmp: Path) -> Path:
    c = _cache(tmp / "cache")
    _edit_shard(c, labels=lambda y: torch.where(torch.arange(len(y)) == 5, 7, y))
    return c


def truncated_cache(tmp: Path) -> Path:
    c = _cache(tmp / "cache")
    f = c / "shard-00000.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return c


def truncated_legacy_cache(tmp: Path) -> Path:
    """A truncated shard in a cache whose index predates recorded shard sizes: caught when the shard is read."""
    c = truncated_cache(tmp)
    index = json.loads((c / INDEX_FILE).read_text())
    for s in index["shards"]:
        s.pop("bytes")
    (c / INDEX_FILE).write_text(json.dumps(index))
    return c


def escaping_cache(tmp: Path) -> Path:
    c = _cache(tmp / "cache")
    (tmp / "secret.safetensors").write_bytes((c / "shard-00000.safetensors").read_bytes())
    index = json.loads((c / INDEX_FILE).read_text())
    index["shards"][0]["file"] = "../secret.safetensors"
    (c / INDEX_FILE).write_text(json.dumps(index))
    return c


# (id, arguments after the command, expected exit code, words the one error line must hold)
RUN_CASES = [
    ("batch0", ["train-dit", "--train.global_batch_size", "0"], EXIT_USAGE, ["train.global_batch_size", ">= 1"]),
    ("lr", ["train-dit", "--train.lr", "-1"], EXIT_USAGE, ["train.lr", "> 0"]),
    ("ema", ["train-dit", "--train.ema_decay", "2"], EXIT_USAGE, ["train.ema_decay", "[0, 1)"]),
    ("skipped", ["train-dit", "--train.max_skipped_steps", "0"], EXIT_USAGE, ["train.max_skipped_steps"]),
    ("workers", ["train-dit", "--data.num_workers", "-1"], EXIT_USAGE, ["data.num_workers", ">= 0"]),
    ("dropout", ["train-dit", "--model.class_dropout", "1.5"], EXIT_USAGE, ["model.class_dropout", "[0, 1)"]),
    ("nan_value", ["train-dit", "--train.lr", ".nan"], EXIT_USAGE, ["train.lr", "finite"]),
    ("device_syntax", ["train-dit", "--train.device", "gpu0"], EXIT_USAGE, ["train.device", "cuda:<index>"]),
    ("unknown_key", ["train-dit", "--train.stepz", "3"], EXIT_USAGE, ["train.stepz", "Did you mean 'steps'"]),
    ("bad_type", ["train-dit", "--train.steps", "many"], EXIT_USAGE, ["train.steps", "int"]),
    ("other_channels", ["train-dit", "--model.in_channels", "8", "--data.latent_channels", "8"], EXIT_USAGE,
     ["model.in_channels", "the run has 4, this command 8"]),
    ("cfg_interval", ["sample", "--sample.cfg_interval_start", "5"], EXIT_USAGE, ["sample.cfg_interval_start"]),
    ("sde_noise", ["sample", "--sample.sde_noise_scale", "-1"], EXIT_USAGE, ["sample.sde_noise_scale", ">= 0"]),
    ("grid_max", ["sample", "--sample.grid_max", "0"], EXIT_USAGE, ["sample.grid_max", ">= 1"]),
    ("cfg_scale", ["sample", "--sample.cfg_scale", "-3"], EXIT_USAGE, ["sample.cfg_scale", ">= 0"]),
    ("sample_steps", ["sample", "--sample.steps", "0"], EXIT_USAGE, ["sample.steps"]),
    ("missing_ckpt", ["sample", "--sample.checkpoint", "/nonexistent/run"], EXIT_DATA,
     ["sample.checkpoint", "/nonexistent/run"]),
    ("stats_items", ["train-dit", "--data.stats_items", "0"], EXIT_USAGE, ["data.stats_items", ">= 1"]),
    ("online_no_weights", ["train-dit", "--data.latents", "online"], EXIT_USAGE,
     ["tokenizer.checkpoint", "tokenizer.random_init"]),
    ("online_unknown_tokenizer", ["train-dit", "--data.latents", "online", "--tokenizer.name", "PAE-tinyy",
                                  "--tokenizer.random_init", "true"], EXIT_USAGE,
     ["tokenizer.name='PAE-tinyy'", "Did you mean 'PAE-tiny'"]),
    ("online_missing_weights", ["train-dit", "--data.latents", "online", "--tokenizer.name", "PAE-tiny",
                                "--tokenizer.checkpoint", "/nonexistent/tok.safetensors"], EXIT_DATA,
     ["tokenizer.checkpoint", "/nonexistent/tok.safetensors"]),
    ("online_dali", ["train-dit", "--data.latents", "online", "--data.loader", "dali"], EXIT_USAGE,
     ["data.loader=dali", "data.latents=online"]),
]
if not torch.cuda.is_available():
    RUN_CASES.append(("no_cuda", ["sample", "--sample.device", "cuda"], EXIT_USAGE, ["sample.device", "no CUDA"]))


@pytest.mark.parametrize("case", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_input_on_an_existing_run_changes_nothing(case, run, capsys, snapshot):
    _, args, code, words = case
    before = snapshot(run)
    argv = [args[0], "--config", TINY, "--out_dir", str(run), *FAST, *args[1:]]
    if args[0] == "sample" and "--sample.checkpoint" not in args:
        argv += ["--sample.checkpoint", str(run)]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert snapshot(run) == before


# (id, cache builder, expected exit code, words of the error line besides the shard / index file)
CACHE_CASES = [
    ("nan_latent", nan_cache, EXIT_DATA, ["NaN", "item 3", "shard-00000.safetensors"]),
    ("label_too_big", big_label_cache, EXIT_DATA, ["label 7", "item 5", "[0, 2)", "shard-00000.safetensors"]),
    ("truncated_shard", truncated_cache, CACHE_OPEN_CODE, ["shard-00000.safetensors", "truncated"]),
    ("truncated_legacy", truncated_legacy_cache, EXIT_DATA, ["shard-00000.safetensors", "damaged"]),
    ("escaping_index", escaping_cache, CACHE_OPEN_CODE, ["../secret.safetensors", "outside the cache folder"]),
]


@pytest.mark.parametrize("case", CACHE_CASES, ids=[c[0] for c in CACHE_CASES])
def test_bad_cache_is_refused_before_the_run_starts(case, tmp_path, capsys):
    _, build, code, words = case
    cache = build(tmp_path)
    out = tmp_path / "out"
    assert main(["train-dit", "--config", TINY, "--out_dir", str(out), "--data.root", str(cache), *FAST]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not out.exists()  # refused before anything was written


def _cache_latents_argv(out: Path, root: Path, *extra: str) -> list[str]:
    return ["cache-latents", "--out", str(out), "--data.root", str(root), "--data.num_classes", "3",
            "--data.image_size", "64", "--data.loader", "pil", "--data.num_workers", "0", "--data.batch_size", "4",
            "--train.device", "cpu", "--shard-size", "4", *extra]


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory, image_folder) -> Path:
    """A finished cache-latents folder (PAE-tiny, random weights allowed explicitly)."""
    out = tmp_path_factory.mktemp("latents") / "cache"
    assert main(_cache_latents_argv(out, image_folder, "--tokenizer", "PAE-tiny", "--random-init")) == 0
    return out


# (id, arguments after the output/data arguments, expected exit code, words the one error line must hold)
CACHE_LATENTS_CASES = [
    ("bad_root", ["--tokenizer", "PAE-tiny", "--random-init", "--data.root", "/nonexistent/images"], EXIT_DATA,
     ["/nonexistent/images"]),
    ("unknown_tokenizer", ["--tokenizer", "PAE-tinyy", "--random-init"], EXIT_USAGE,
     ["--tokenizer='PAE-tinyy'", "Did you mean 'PAE-tiny'"]),
    ("missing_weights", ["--tokenizer", "PAE-tiny", "--weights", "/nonexistent/tok.safetensors"], EXIT_DATA,
     ["--weights", "/nonexistent/tok.safetensors", "does not exist"]),
    ("no_weights", ["--tokenizer", "PAE-tiny"], EXIT_USAGE, ["--weights", "--random-init"]),
    ("other_tokenizer", ["--tokenizer", "RAE-tiny", "--random-init"], EXIT_DATA,
     ["another run", "tokenizer: folder has 'PAE-tiny', this run 'RAE-tiny'"]),
    ("other_resolution", ["--tokenizer", "PAE-tiny", "--random-init", "--data.image_size", "32"], EXIT_DATA,
     ["data.image_size=32", "64 px"]),
    ("shard_size", ["--tokenizer", "PAE-tiny", "--random-init", "--shard-size", "0"], EXIT_USAGE,
     ["--shard-size=0", ">= 1"]),
    ("range", ["--tokenizer", "PAE-tiny", "--random-init", "--data.num_workers", "-2"], EXIT_USAGE,
     ["data.num_workers", ">= 0"]),
]


@pytest.mark.parametrize("case", CACHE_LATENTS_CASES, ids=[c[0] for c in CACHE_LATENTS_CASES])
def test_cache_latents_bad_input_changes_nothing(case, latent_cache, image_folder, capsys, snapshot):
    _, args, code, words = case
    before = snapshot(latent_cache)
    capsys.readouterr()
    assert main(_cache_latents_argv(latent_cache, image_folder, *args)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert snapshot(latent_cache) == before


def test_cache_latents_folder_is_locked_while_written(latent_cache, image_folder, capsys, snapshot):
    with lock_held_elsewhere(latent_cache) as holder:
        before = snapshot(latent_cache)
        capsys.readouterr()
        argv = _cache_latents_argv(latent_cache, image_folder, "--tokenizer", "PAE-tiny", "--random-init")
        assert main(argv) == EXIT_BUSY
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by pid {holder.pid}" in err[0], err
        assert snapshot(latent_cache) == before


def test_debug_flag_shows_the_traceback(run):
    with pytest.raises(Exception, match="train.lr"):
        main(["train-dit", "--debug", "--config", TINY, "--out_dir", str(run), "--train.lr", "-1"])


def test_same_seed_same_weights(tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["train-dit", "--config", TINY, "--out_dir", str(out), "--train.steps", "3", *FAST]) == 0
        outs.append(out)
        torch.manual_seed(1234 if name == "a" else 99)  # the global RNG state between runs must not matter
    for f in ("model.safetensors", "ema.safetensors"):
        a, _ = load_safetensors(outs[0] / "checkpoints" / "0000003" / f)
        b, _ = load_safetensors(outs[1] / "checkpoints" / "0000003" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_other_cache_contents_refused_on_resume(tmp_path, capsys, snapshot):
    cache = _cache(tmp_path / "cache")
    out = tmp_path / "run"
    args = ["train-dit", "--config", TINY, "--out_dir", str(out), "--data.root", str(cache), *FAST]
    assert main([*args, "--train.steps", "2"]) == 0
    other = write_latent_cache(tmp_path / "other", 2 * torch.randn(8, 4, 8, 8), torch.arange(8) % 2, num_classes=2)
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train-dit", "--config", TINY, "--out_dir", str(out), "--data.root", str(other), *FAST,
                 "--train.steps", "4"]) == EXIT_USAGE
    assert "latent cache's contents differ" in capsys.readouterr().err
    assert snapshot(out) == before
    assert main([*args, "--train.steps", "4"]) == 0  # the same cache (moved or not) resumes


def test_sigterm_exits_with_the_preempted_code(tmp_path, run_until_sigterm):
    out = tmp_path / "run"
    code, stdout, stderr = run_until_sigterm([
        "train-dit", "--config", TINY, "--out_dir", str(out), "--train.steps", "100000", "--train.progress", "false",
        "--train.log_every", "1", "--train.ckpt_every", "100000"])
    assert code == EXIT_PREEMPTED, stderr
    assert "generator run:" not in stdout
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "stopped at step" in last and "resume" in last, last
    assert len(list((out / "checkpoints").iterdir())) == 1


def test_second_process_on_a_run_folder_exits_busy(run, capsys, snapshot):
    with lock_held_elsewhere(run) as holder:
        before = snapshot(run)
        assert main(["train-dit", "--config", TINY, "--out_dir", str(run), *FAST, "--train.steps", "6"]) == EXIT_BUSY
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by pid {holder.pid}" in err[0] and str(run) in err[0], err
        assert snapshot(run) == before

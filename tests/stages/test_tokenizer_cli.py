"""The tokenizer commands through the CLI: refine-priors and train-tokenizer run on the tiny preset; every bad input
exits non-zero with one line naming the key or file and leaves an existing run folder unchanged byte for byte; every
tokenizer preset loads (dry run) and each ablation preset differs from its base exactly where it says."""

from __future__ import annotations

from pathlib import Path

import pytest

from pae_fast.cli import main
from pae_fast.errors import EXIT_DATA, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TINY = str(CONFIGS / "tokenizer_tiny_cpu.yaml")
FAST = ["--train.progress", "false", "--train.log_every", "2", "--train.ckpt_every", "2", "--train.steps", "2",
        "--train.global_batch_size", "8", "--data.synthetic_size", "16", "--data.num_classes", "4",
        "--tokenizer.heldout_items", "4", "--tokenizer.grid_items", "2"]



@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished 2-step refine-priors run and a 2-step train-tokenizer run on its priors, both through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    pri, tok = root / "priors", root / "tok"
    assert main(["refine-priors", "--config", TINY, "--out_dir", str(pri), *FAST]) == 0
    assert (pri / "priors.safetensors").is_file()
    assert main(["train-tokenizer", "--config", TINY, "--out_dir", str(tok), *FAST, "--tokenizer.priors", "refined",
                 "--tokenizer.priors_file", str(pri / "priors.safetensors")]) == 0
    return {"priors": pri, "tok": tok}


def test_the_commands_write_their_runs(runs):
    tok = runs["tok"]
    assert (tok / "checkpoints" / "0000002" / "ema.safetensors").is_file()
    assert (tok / "eval.jsonl").read_text().count("\n") == 2  # step 0 and step 2
    assert (tok / "grids" / "step_0000002.png").is_file()
    from pae_fast.registry import create_tokenizer

    assert create_tokenizer("PAE-tiny", weights=tok).latent_shape == (8, 8, 8)


# (id, command, arguments, expected exit code, words the one error line must hold)
CASES = [
    ("heldout", "train-tokenizer", ["--tokenizer.heldout_items", "-1"], EXIT_USAGE,
     ["tokenizer.heldout_items", ">= 0"]),
    ("lambda", "train-tokenizer", ["--tokenizer.lambda_ssr", "-0.1"], EXIT_USAGE, ["tokenizer.lambda_ssr", ">= 0"]),
    ("angle", "train-tokenizer", ["--tokenizer.mcr_angles", "[42.5, 200]"], EXIT_USAGE, ["tokenizer.mcr_angles"]),
    ("rae_ssr", "train-tokenizer", ["--tokenizer.name", "RAE-tiny"], EXIT_USAGE, ["tokenizer.ssr", "RAE"]),
    ("no_priors_file", "train-tokenizer", ["--tokenizer.priors_file", "null"], EXIT_USAGE,
     ["tokenizer.priors_file", "refine-priors"]),
    ("missing_priors", "train-tokenizer", ["--tokenizer.priors_file", "/nonexistent/p.safetensors"], EXIT_DATA,
     ["tokenizer.priors_file", "/nonexistent/p.safetensors"]),
    ("missing_lpips", "train-tokenizer", ["--tokenizer.lpips_weights", "/nonexistent/vgg.pth"], EXIT_DATA,
     ["tokenizer.lpips_weights", "/nonexistent/vgg.pth"]),
    ("no_disc_weights", "train-tokenizer", ["--tokenizer.lambda_gan", "0.5"], EXIT_DATA, ["tokenizer.disc_weights"]),
    ("image_size", "train-tokenizer", ["--data.image_size", "32"], EXIT_USAGE, ["data.image_size", "64"]),
    ("source", "train-tokenizer", ["--data.source", "synthetic"], EXIT_USAGE, ["data.source", "skimage"]),
    ("no_root", "train-tokenizer", ["--data.source", "folder"], EXIT_USAGE, ["data.root"]),
    ("channels", "train-tokenizer", ["--tokenizer.latent_channels", "4"], EXIT_USAGE, ["tokenizer.latent_channels"]),
    ("identity", "train-tokenizer", ["--tokenizer.scr", "false"], EXIT_USAGE, ["tokenizer.scr", "refusing to resume"]),
    ("no_cuda", "train-tokenizer", ["--train.device", "cuda"], EXIT_USAGE, ["train.device"]),
    ("lowpass", "refine-priors", ["--refine.lowpass_strength", "2"], EXIT_USAGE, ["refine.lowpass_strength"]),
    ("heads", "refine-priors", ["--refine.projector_heads", "3"], EXIT_USAGE, ["refine.projector_heads", "128"]),
    ("upsampler", "refine-priors", ["--refine.upsampler", "nearest"], EXIT_USAGE, ["refine.upsampler"]),
    ("latent_dim", "refine-priors", ["--refine.latent_dim", "16"], EXIT_USAGE, ["refine.latent_dim"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_on_an_existing_run_changes_nothing(case, runs, capsys, snapshot):
    _, command, args, code, words = case
    run = runs["tok"] if command == "train-tokenizer" else runs["priors"]
    extra = (["--tokenizer.priors", "refined", "--tokenizer.priors_file", str(runs["priors"] / "priors.safetensors")]
             if command == "train-tokenizer" else [])
    before = snapshot(run)
    capsys.readouterr()
    assert main([command, "--config", TINY, "--out_dir", str(run), *FAST, *extra, *args]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert snapshot(run) == before


PRESETS = sorted(p.name for p in CONFIGS.glob("*tokenizer*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_tokenizer_preset_loads(name, capsys):
    assert main(["train-tokenizer", "--config", str(CONFIGS / name), "--dry-run"]) == 0
    assert "tokenizer:" in capsys.readouterr().out


def test_same_seed_same_weights(runs, tmp_path):
    """A second CLI run with the same seed and settings writes bitwise-identical weights."""
    import torch

    from pae_fast.io import load_safetensors

    again = tmp_path / "again"
    assert main(["train-tokenizer", "--config", TINY, "--out_dir", str(again), *FAST, "--tokenizer.priors", "refined",
                 "--tokenizer.priors_file", str(runs["priors"] / "priors.safetensors")]) == 0
    for name in ("model", "ema"):
        a = load_safetensors(runs["tok"] / "checkpoints" / "0000002" / f"{name}.safetensors")[0]
        b = load_safetensors(again / "checkpoints" / "0000002" / f"{name}.safetensors")[0]
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow  # a subprocess run (~20 s on a loaded 2-core machine)
def test_sigterm_checkpoints_with_the_disc_and_exits_preempted(tmp_path, run_until_sigterm):
    """SIGTERM mid-run: exit code 4, one checkpoint holding model, EMA and discriminator; a rerun resumes it."""
    from pae_fast.errors import EXIT_PREEMPTED

    out = tmp_path / "run"
    common = ["train-tokenizer", "--config", TINY, "--out_dir", str(out), "--train.progress", "false",
              "--train.ckpt_every", "100000", "--train.log_every", "1", "--train.global_batch_size", "4",
              "--data.synthetic_size", "8", "--data.num_classes", "4", "--tokenizer.heldout_items", "4",
              "--tokenizer.lambda_gan", "0.5", "--tokenizer.disc_weights", "random", "--tokenizer.mcr", "false"]
    code, stdout, stderr = run_until_sigterm([*common, "--train.steps", "100000"])
    assert code == EXIT_PREEMPTED, stderr
    assert "tokenizer run:" not in stdout
    (ckpt,) = list((out / "checkpoints").iterdir())
    assert {"model.safetensors", "ema.safetensors", "disc.safetensors"} <= {p.name for p in ckpt.iterdir()}
    step = int(ckpt.name)
    assert main([*common, "--train.steps", str(step + 1)]) == 0  # resumes (same identity), one step more
    assert (out / "checkpoints" / f"{step + 1:07d}").is_dir()

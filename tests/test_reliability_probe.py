"""Issue 25, through the command line: nothing silently lost or wrong. Outputs are never overwritten unless asked,
OS errors on outputs and every weights problem are one line with exit code 3, a generator's samples are decoded
only by the tokenizer whose latents it learned, SIGTERM during a long command exits 4 and the same command resumes
(to the same bytes). The data side (16-bit images, bad files, deterministic bytes) is test_reliability_data.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from pae_fast.cli import main
from pae_fast.errors import EXIT_DATA, EXIT_PREEMPTED
from pae_fast.io import save_safetensors

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
FAST = ["--train.progress", "false", "--train.log_every", "2", "--train.ckpt_every", "2"]
# the tiny generator on PAE-tiny's latents (8 channels, 8x8) of three classes
ON_PAE_TINY = ["--model.in_channels", "8", "--data.latent_channels", "8", "--model.num_classes", "3",
               "--data.num_classes", "3", "--tokenizer.name", "PAE-tiny"]




def unwritable(tmp_path: Path) -> Path:
    """A folder where nothing can be created (chmod for a normal user; /sys refuses even root)."""
    if os.geteuid() != 0:
        d = tmp_path / "readonly"
        d.mkdir()
        d.chmod(0o555)
        return d
    d = Path("/sys/pae_fast_probe")
    try:
        d.mkdir()
    except OSError:
        return d
    d.rmdir()
    pytest.skip("no unwritable folder on this machine")


# ------------------------------------------------------------------------------------------------ fixtures
def _tokenizer_file(path: Path, seed: int) -> Path:
    from pae_fast.registry import create_tokenizer

    torch.manual_seed(seed)
    save_safetensors(create_tokenizer("PAE-tiny").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """Two PAE-tiny weights files of other random weights, and one holding a NaN."""
    d = tmp_path_factory.mktemp("tok")
    a, b = _tokenizer_file(d / "a.safetensors", 1), _tokenizer_file(d / "b.safetensors", 2)
    from pae_fast.io import load_safetensors

    state, _ = load_safetensors(a)
    k = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    state[k] = state[k].clone()
    state[k].view(-1)[3] = float("nan")
    nan = d / "nan.safetensors"
    save_safetensors(state, nan)
    return {"a": a, "b": b, "nan": nan, "nan_key": k}


def _cache_argv(out: Path, root: Path, *extra: str) -> list[str]:
    return ["cache-latents", "--tokenizer", "PAE-tiny", "--out", str(out), "--data.root", str(root),
            "--data.num_classes", "3", "--data.image_size", "64", "--data.loader", "pil", "--data.num_workers", "0",
            "--train.device", "cpu", "--shard-size", "2", *extra]


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory, image_folder, tokenizers) -> Path:
    """A 2-step generator run on a cache written by tokenizer ``a`` with the README's command as written (no
    --config, --data.batch_size or --data.num_classes; the tiny tokenizer's image size added)."""
    d = tmp_path_factory.mktemp("paired")
    readme = ["cache-latents", "--tokenizer", "PAE-tiny", "--weights", str(tokenizers["a"]), "--data.root",
              str(image_folder), "--out", str(d / "cache")]
    assert main([*readme, "--data.image_size", "64"]) == 0
    run = d / "run"
    assert main(["train-dit", "--config", TINY, "--out_dir", str(run), "--data.root", str(d / "cache"),
                 "--train.steps", "2", "--data.batch_size", "4", "--train.global_batch_size", "4", *ON_PAE_TINY,
                 *FAST]) == 0
    return run


def _sample_argv(run: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--config", TINY, "--sample.checkpoint", str(run), "--out", str(out), "--sample.steps", "2",
            "--sample.num_samples", "2", "--sample.batch_size", "2", "--data.image_size", "64", *ON_PAE_TINY, *extra]


# ------------------------------------------------------------------------------------------------ 1, 7: outputs
def _existing_file(tmp: Path) -> Path:
    f = tmp / "precious.safetensors"
    save_safetensors({"w": torch.arange(4.0)}, f)
    return f


# (id, argv builder (tmp, image_folder, tokenizers) -> argv, words of the error line); each: exit 3, nothing changed
OUTPUT_CASES = [
    ("vfm_overwrites_file", lambda t, p, k: ["pretrain-vfm", "--out", str(_existing_file(t)), "--steps", "1",
                                             "--images-per-class", "4"], ["precious.safetensors", "--overwrite"]),
    ("vfm_out_is_folder", lambda t, p, k: ["pretrain-vfm", "--out", str(t), "--steps", "1"], ["is a folder"]),
    ("vfm_unwritable", lambda t, p, k: ["pretrain-vfm", "--out", str(unwritable(t) / "v.safetensors")],
     ["cannot write"]),
    ("recon_out_is_file", lambda t, p, k: ["reconstruct", "--tokenizer", "PAE-tiny", "--random-init",
                                           str(p / "c0" / "0.jpg"), "--out", str(_existing_file(t))],
     ["precious.safetensors", "is a file"]),
    ("recon_unwritable", lambda t, p, k: ["reconstruct", "--tokenizer", "PAE-tiny", "--random-init",
                                          str(p / "c0" / "0.jpg"), "--out", str(unwritable(t) / "r")],
     ["cannot write"]),
    ("cache_out_is_file", lambda t, p, k: _cache_argv(_existing_file(t), p, "--random-init"),
     ["precious.safetensors", "is a file"]),
    ("cache_unwritable", lambda t, p, k: _cache_argv(unwritable(t) / "c", p, "--random-init"), ["cannot write"]),
    ("cache_into_other_folder", lambda t, p, k: _cache_argv(_existing_file(t).parent, p, "--random-init"),
     ["holds other files", "precious.safetensors"]),
    ("train_dit_out_is_file", lambda t, p, k: ["train-dit", "--config", TINY, "--out_dir", str(_existing_file(t)),
                                               *FAST, "--train.steps", "2"], ["precious.safetensors"]),
    ("evaluate_out_exists", lambda t, p, k: ["evaluate", str(t / "s.npz"), str(t / "r.npz"), "--out",
                                             str(_existing_file(t)), "--eval.inception_weights", str(t / "i.pt")],
     ["precious.safetensors", "--overwrite"]),
    # 5, 9: every weights problem is exit code 3, in every command
    ("recon_nan_weights", lambda t, p, k: ["reconstruct", "--tokenizer", "PAE-tiny", "--weights", str(k["nan"]),
                                           str(p / "c0" / "0.jpg"), "--out", str(t / "r")],
     ["NaN/Inf", "nan.safetensors"]),
    ("cache_nan_weights", lambda t, p, k: _cache_argv(t / "c", p, "--weights", str(k["nan"])),
     ["NaN/Inf", "nan.safetensors"]),
    ("recon_truncated", lambda t, p, k: ["reconstruct", "--tokenizer", "PAE-tiny", "--weights",
                                         str(_truncated(t, k["a"])), str(p / "c0" / "0.jpg"), "--out", str(t / "r")],
     ["cut.safetensors"]),
    ("cache_truncated", lambda t, p, k: _cache_argv(t / "c", p, "--weights", str(_truncated(t, k["a"]))),
     ["cut.safetensors"]),
    ("recon_pickled", lambda t, p, k: ["reconstruct", "--tokenizer", "PAE-tiny", "--weights", str(_pickled(t)),
                                       str(p / "c0" / "0.jpg"), "--out", str(t / "r")], ["weights_only"]),
    ("cache_pickled", lambda t, p, k: _cache_argv(t / "c", p, "--weights", str(_pickled(t))), ["weights_only"]),
]


def _truncated(tmp: Path, f: Path) -> Path:
    out = tmp / "cut.safetensors"
    out.write_bytes(f.read_bytes()[:-1000])
    return out


class _Pickled:
    pass


def _pickled(tmp: Path) -> Path:
    out = tmp / "pickled.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "obj": _Pickled()}, out)
    return out


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_outputs_and_weights_problems_are_one_line_exit_3(case, tmp_path, image_folder, tokenizers, capsys, snapshot,
                                                          one_error_line):
    _, build, words = case
    argv = build(tmp_path, image_folder, tokenizers)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == EXIT_DATA
    one_error_line(capsys, *words)
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


def test_weights_with_nan_name_the_tensor(tokenizers):
    from pae_fast.weights import WeightsError, read_state_dict

    with pytest.raises(WeightsError, match=f"1 of .* values of '{tokenizers['nan_key']}'"):
        read_state_dict(tokenizers["nan"])
    read_state_dict(tokenizers["a"])


# ------------------------------------------------------------------------------------------------ 4: pairing
def test_sample_refuses_another_tokenizer(paired_run, tokenizers, tmp_path, capsys, one_error_line):
    from pae_fast.stages.tokenizer_pairing import RECORD_KEY
    from pae_fast.weights import read_metadata

    _, meta = read_metadata(paired_run)
    import json

    rec = json.loads(meta[RECORD_KEY])
    assert rec["name"] == "PAE-tiny" and rec["weights_hash"] == hashlib.sha256(tokenizers["a"].read_bytes()).hexdigest()
    assert rec["weights"] in ("ema", "raw", "unknown") and len(rec["latent_stats_sha256"]) == 64
    out = tmp_path / "s"
    capsys.readouterr()
    assert main(_sample_argv(paired_run, out, "--sample.tokenizer_checkpoint", str(tokenizers["b"]))) == EXIT_DATA
    one_error_line(capsys, "b.safetensors", "--allow-tokenizer-mismatch")
    assert not (out / "samples.npz").exists()
    assert main(_sample_argv(paired_run, out, "--sample.tokenizer_checkpoint", str(tokenizers["b"]),
                             "--allow-tokenizer-mismatch")) == 0
    out2 = tmp_path / "s2"
    assert main(_sample_argv(paired_run, out2, "--sample.tokenizer_checkpoint", str(tokenizers["a"]))) == 0
    assert (out2 / "samples.npz").is_file()


# ------------------------------------------------------------------------------------------------ 6: README command
def test_readme_cache_latents_command_without_config(paired_run):
    cache = paired_run.parent / "cache"  # written by the README's command (no --config, no --data.batch_size)
    assert (cache / "index.json").is_file() and len(list(cache.glob("shard-*.safetensors"))) == 1
    import json

    index = json.loads((cache / "index.json").read_text())
    assert index["num_items"] == 6 and index["num_classes"] == 3


# ------------------------------------------------------------------------------------------------ 8: reconstruct
def test_reconstruct_same_names_from_two_folders(tmp_path, image_folder, capsys, snapshot, one_error_line):
    import shutil

    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        shutil.copy(image_folder / {"x": "c0", "y": "c1"}[d] / "0.jpg", tmp_path / d / "0.jpg")
    argv = ["reconstruct", "--tokenizer", "PAE-tiny", "--random-init", str(tmp_path / "x" / "0.jpg"),
            str(tmp_path / "y" / "0.jpg"), "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    outs = sorted(p.name for p in (tmp_path / "r").glob("*_recon.png"))
    assert outs == ["x__0_jpg_recon.png", "y__0_jpg_recon.png"]
    a, b = ((tmp_path / "r" / n).read_bytes() for n in outs)
    assert a != b
    before = snapshot(tmp_path / "r")
    capsys.readouterr()
    assert main(argv) == EXIT_DATA  # a second run does not overwrite
    one_error_line(capsys, "--overwrite")
    assert snapshot(tmp_path / "r") == before
    assert main([*argv, "--overwrite"]) == 0


# ------------------------------------------------------------------------------------------------ 9: signals
def test_sigterm_during_cache_latents_exits_4_and_resumes(tmp_path, image_folder, tokenizers, snapshot,
                                                          run_until_sigterm):
    out = tmp_path / "cache"
    argv = _cache_argv(out, image_folder, "--weights", str(tokenizers["a"]), "--shard-size", "1",
                       "--data.batch_size", "1")
    code, _, err = run_until_sigterm(argv, marker="cache-latents: 1/", stream="stderr")
    assert code == EXIT_PREEMPTED, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: cache-latents stopped by SIGTERM") and "resume" in last, last
    assert not (out / "index.json").exists() and list(out.glob("shard-*.safetensors"))
    assert main(argv) == 0  # the same command resumes ...
    ref = tmp_path / "ref"
    assert main(_cache_argv(ref, image_folder, "--weights", str(tokenizers["a"]), "--shard-size", "1",
                            "--data.batch_size", "1")) == 0
    unlocked = [{k: v for k, v in snapshot(c).items() if k != ".lock"} for c in (out, ref)]  # .lock: pid, time
    assert unlocked[0] == unlocked[1]  # ... to the bytes of an uninterrupted run


def test_sigterm_during_sample_exits_4(paired_run, tmp_path, run_until_sigterm):
    out = tmp_path / "s"
    argv = _sample_argv(paired_run, out, "--sample.num_samples", "200", "--sample.batch_size", "1",
                        "--sample.steps", "20")
    code, _, err = run_until_sigterm(argv, marker="sampling: ", stream="stderr")
    assert code == EXIT_PREEMPTED, err
    assert err.strip().splitlines()[-1].startswith("error: sample stopped by SIGTERM")
    assert not (out / "latents.safetensors").exists()


def _many_images(folder: Path, image_folder: Path, n: int) -> list[str]:
    """``n`` image files ``folder/<k>.jpg``: copies of the six fixture photographs (distinct names, sorted order)."""
    import shutil

    sources = sorted(image_folder.rglob("*.jpg"))
    folder.mkdir()
    for k in range(n):
        shutil.copy(sources[k % len(sources)], folder / f"{k:03d}.jpg")
    return [str(folder / f"{k:03d}.jpg") for k in range(n)]


class _StopAfter:
    """A ``check_stop`` that raises PreemptedError on its ``n``-th call (and counts its calls)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self) -> None:
        from pae_fast.errors import PreemptedError

        self.calls += 1
        if self.calls == self.n:
            raise PreemptedError("stopped")


def test_reconstruct_check_stop_keeps_the_finished_batches(tmp_path, image_folder, tokenizers):
    from pae_fast.errors import PreemptedError
    from pae_fast.eval.reconstruct import reconstruct_files
    from pae_fast.registry import create_tokenizer

    files = _many_images(tmp_path / "img", image_folder, 5)
    tok = create_tokenizer("PAE-tiny", pretrained=True, weights=str(tokenizers["a"]))
    stop = _StopAfter(3)  # checked before each batch: the third check comes after two batches of two images
    with pytest.raises(PreemptedError):
        reconstruct_files(tok, files, tmp_path / "part", batch_size=2, check_stop=stop)
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == [f"{k:03d}_recon.png" for k in range(4)]
    full = reconstruct_files(tok, files, tmp_path / "full", batch_size=2, check_stop=_StopAfter(0))  # 0: never
    assert len(full["images"]) == 5
    for k in range(4):  # the kept pairs are the finished ones, byte for byte
        name = f"{k:03d}_recon.png"
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_diffusability_check_stop_between_metrics_writes_nothing(tmp_path):
    from pae_fast.errors import PreemptedError
    from pae_fast.eval.report import run_diffusability

    g = torch.Generator().manual_seed(0)
    inputs = {name: (torch.randn(48, 4, 8, 8, generator=g), torch.arange(48) % 3) for name in ("A", "B")}
    counter = _StopAfter(0)
    run_diffusability(inputs, tmp_path / "full", check_stop=counter)
    per_input = counter.calls // 2  # one check before each input, one before each of its metrics
    assert counter.calls == 2 * per_input and per_input >= 6, counter.calls
    stop = _StopAfter(per_input + 3)  # mid-way through the second input's metrics
    with pytest.raises(PreemptedError):
        run_diffusability(inputs, tmp_path / "part", check_stop=stop)
    assert not (tmp_path / "part").exists() or not any((tmp_path / "part").iterdir())


def test_sigterm_during_reconstruct_exits_4_keeping_whole_pairs(tmp_path, image_folder, tokenizers, capsys,
                                                                 one_error_line, run_until_sigterm):
    import json

    from PIL import Image

    files = _many_images(tmp_path / "img", image_folder, 120)
    out = tmp_path / "r"
    argv = ["reconstruct", "--tokenizer", "PAE-tiny", "--weights", str(tokenizers["a"]), *files, "--out", str(out),
            "--batch-size", "1"]
    code, stdout, err = run_until_sigterm(argv, marker="PSNR", stream="stderr")  # the log line of the first image
    assert code == EXIT_PREEMPTED, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: reconstruct stopped by SIGTERM") and "--overwrite" in last, last
    assert "mean\tPSNR" not in stdout
    kept = sorted(p.name for p in out.iterdir())
    assert 1 <= len(kept) < 120 and kept == [f"{k:03d}_recon.png" for k in range(len(kept))], kept  # no temp files
    for name in kept:  # every pair is a whole PNG
        with Image.open(out / name) as im:
            im.load()
            assert im.size == (128, 64)
    assert main(argv) == EXIT_DATA  # outputs are never overwritten unless asked: the line says how to finish
    one_error_line(capsys, "--overwrite")
    assert main([*argv, "--overwrite"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["file"] for r in metrics["images"]] == files and (out / "grid.png").is_file()


def test_sigterm_during_diffusability_exits_4_and_keeps_the_old_report(tmp_path, snapshot, run_until_sigterm):
    import json

    g = torch.Generator().manual_seed(0)
    inputs = []
    for k in range(24):
        path = tmp_path / f"z{k:02d}.safetensors"
        save_safetensors({"latents": torch.randn(60, 8, 8, 8, generator=g), "labels": torch.arange(60) % 3}, path)
        inputs.append(str(path))
    out = tmp_path / "report"
    assert main(["diffusability", inputs[0], "--out", str(out)]) == 0  # an earlier report in the folder
    before = snapshot(out)
    argv = ["diffusability", *inputs, "--out", str(out), "--overwrite"]
    code, stdout, err = run_until_sigterm(argv, marker="diffusability: 1/24", stream="stderr")
    assert code == EXIT_PREEMPTED, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: diffusability stopped by SIGTERM") and "run the same command" in last, last
    assert "wrote" not in stdout
    assert snapshot(out) == before  # the old report is untouched, nothing half-written beside it
    assert main(argv) == 0  # the same command finishes the job
    assert len(json.loads((out / "diffusability.json").read_text())["inputs"]) == 24


# ------------------------------------------------------------------------------------------------ 10
def test_sample_writes_beside_its_checkpoint_and_never_over_it(paired_run, tmp_path, capsys, snapshot, one_error_line):
    argv = ["sample", "--config", TINY, "--sample.checkpoint", str(paired_run), "--out_dir", str(tmp_path / "preset"),
            "--sample.steps", "2", "--sample.num_samples", "2", *ON_PAE_TINY]
    assert main(argv) == 0
    out = paired_run / "samples" / "0000002"
    assert (out / "latents.safetensors").is_file() and not (tmp_path / "preset").exists()
    before = snapshot(out)
    capsys.readouterr()
    assert main(argv) == EXIT_DATA
    one_error_line(capsys, str(out), "--overwrite")
    assert snapshot(out) == before
    f = _existing_file(tmp_path)
    assert main([*argv, "--out", str(f)]) == EXIT_DATA  # an output folder that is a file: one line, kept
    one_error_line(capsys, str(f), "is a file")
    assert main([*argv, "--out", str(unwritable(tmp_path) / "s")]) == EXIT_DATA
    one_error_line(capsys, "cannot write")
    assert main([*argv, "--overwrite"]) == 0
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    # the same samples again, byte for byte (the lock file records the time it was taken)


def test_cache_latents_logs_progress(tmp_path, image_folder, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="pae_fast.progress"):
        assert main(_cache_argv(tmp_path / "c", image_folder, "--random-init")) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "pae_fast.progress"]
    assert "cache-latents: 1/3 shard" in lines and "cache-latents: 3/3 shard done" in lines, lines

"""The diffusability report (JSON, markdown, PNG plots) and the `diffusability` / `evaluate` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pae_fast.cli import main as cli_main
from pae_fast.data.latent_cache import write_latent_cache
from pae_fast.eval.images import save_npz_images
from pae_fast.eval.report import load_latents, run_diffusability

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _latents(n_per_class: int, smooth: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    z = torch.randn(3, 8, 1, 1, generator=g)[labels] + torch.randn(len(labels), 8, 8, 8, generator=g)
    if smooth:
        z = torch.nn.functional.avg_pool2d(z, 3, stride=1, padding=1, count_include_pad=False)
    return z, labels


def _check_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, path


def test_report_renders_plots_side_by_side(tmp_path):
    inputs = {"smooth": _latents(10, True, 0), "white": _latents(10, False, 1)}
    out = run_diffusability(inputs, tmp_path / "report")
    files = out["files"]
    for kind in ("viv_profile", "dct_spectrum", "cosine_distance"):
        _check_png(files[kind])
    doc = json.loads(files["json"].read_text())
    assert set(doc["inputs"]) == {"smooth", "white"}
    assert doc["inputs"]["smooth"]["sec"] < doc["inputs"]["white"]["sec"]
    md = files["markdown"].read_text()
    assert "| viv |" in md and "| smooth | white |" in md and "![VIV time profile](viv_profile.png)" in md


def test_diffusability_cli_on_caches_and_raw_latents(tmp_path, capsys):
    z1, y1 = _latents(8, True, 0)
    z2, y2 = _latents(8, False, 1)
    cache = write_latent_cache(tmp_path / "cache_a", z1, y1, shard_size=10)
    raw = tmp_path / "latents.safetensors"
    save_file({"latents": z2, "labels": y2}, str(raw))
    latents, labels = load_latents(raw)
    assert torch.equal(latents, z2) and torch.equal(labels, y2)

    out = tmp_path / "report"
    rc = cli_main(["diffusability", str(cache), str(raw), "--names", "A", "B", "--out", str(out), "--eval.lnc_k", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "viv" in printed and "report.md" in printed
    doc = json.loads((out / "diffusability.json").read_text())
    assert doc["settings"]["lnc_k"] == 3 and set(doc["inputs"]) == {"A", "B"}
    assert (out / "config.yaml").is_file()
    for png in ("viv_profile.png", "dct_spectrum.png", "cosine_distance.png"):
        _check_png(out / png)

    # SSC from a segments file
    seg = torch.zeros(len(y1), 8, 8, dtype=torch.long)
    seg[:, :, 4:] = 1
    save_file({"segments": seg}, str(tmp_path / "seg.safetensors"))
    argv = ["diffusability", str(cache), "--out", str(out), "--segments", str(tmp_path / "seg.safetensors")]
    assert cli_main(argv) == 3 and "--overwrite" in capsys.readouterr().err  # the report exists
    rc = cli_main([*argv, "--overwrite"])
    assert rc == 0 and "ssc" in json.loads((out / "diffusability.json").read_text())["inputs"]["cache_a"]

    # clear errors
    bad = tmp_path / "bad.safetensors"
    save_file({"latents": z2}, str(bad))
    assert cli_main(["diffusability", str(bad), "--out", str(out), "--overwrite"]) == 3  # a data file
    assert "labels" in capsys.readouterr().err
    assert cli_main(["diffusability", str(cache), str(raw), "--names", "A", "--out", str(out)]) == 2
    assert cli_main(["diffusability", str(tmp_path / "nothing"), "--out", str(out), "--overwrite"]) == 3
    assert cli_main(["diffusability", str(cache), "--dry-run", "--eval.viv_iters", "3"]) == 0
    assert "viv_iters: 3" in capsys.readouterr().out


def test_evaluate_cli_with_local_random_inception_weights(tmp_path, capsys):
    from pae_fast.eval.inception import FIDInceptionV3

    torch.manual_seed(0)
    weights = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in FIDInceptionV3(input_size=75).state_dict().items()}, str(weights))
    rng = np.random.default_rng(0)
    imgs = np.clip(rng.integers(0, 256, (16, 1, 1, 3)) + rng.integers(-40, 40, (16, 32, 32, 3)), 0, 255)
    samples = save_npz_images(tmp_path / "samples.npz", imgs[:8].astype(np.uint8))
    reference = save_npz_images(tmp_path / "ref.npz", imgs[8:].astype(np.uint8))
    out = tmp_path / "eval.json"
    args = ["evaluate", str(samples), str(reference), "--out", str(out), "--no-progress"]
    overrides = ["--eval.inception_weights", str(weights), "--eval.inception_size", "75", "--eval.device", "cpu"]
    stats = tmp_path / "ref_stats.npz"
    extra = ["--eval.is_splits", "2", "--eval.protocol", "torch-fidelity", "--save-reference-stats", str(stats)]
    assert cli_main(args + overrides + extra) == 0
    result = json.loads(out.read_text())
    for key in ("fid", "sfid", "is", "precision", "recall"):
        assert np.isfinite(result[key]), key
    assert result["fid"] > 0 and result["num_samples"] == 8 and result["protocol"] == "torch-fidelity"
    printed = capsys.readouterr().out
    assert "fid" in printed and "protocol   torch-fidelity" in printed and "statistics only, for pae_fast" in printed
    assert "arr_0" not in np.load(stats).files
    assert cli_main(args + overrides + ["--save-reference-stats", str(stats), "--with-images"]) == 3  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(args + overrides + ["--save-reference-stats", str(stats), "--with-images", "--overwrite"]) == 0
    assert json.loads(out.read_text())["protocol"] == "adm" and "an ADM reference batch" in capsys.readouterr().out
    assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s"} <= set(np.load(stats).files)
    # without weights: a clear error, no traceback
    assert cli_main(["evaluate", str(samples), str(reference), "--out", str(out), "--overwrite"]) == 2
    assert "eval.inception_weights" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["evaluate", "x.npz"], ["diffusability"]])
def test_cli_usage_errors(argv, capsys):
    if argv == ["diffusability"]:
        with pytest.raises(SystemExit):
            cli_main(argv)
    else:
        assert cli_main(argv) == 2
        assert "reference" in capsys.readouterr().err

"""``reconstruct`` and ``info --tokenizer`` on the tiny tokenizers, on real photos (scikit-image's sample data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pae_fast.cli import main
from pae_fast.io import save_safetensors
from pae_fast.registry import create_tokenizer


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("astronaut", "coffee", "chelsea"):
        arr = getattr(skimage.data, name)()
        path = root / f"{name}.png"
        Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_reconstruct_random_init_tiny(photos, tmp_path, capsys):
    out = tmp_path / "recon"
    rc = main(["reconstruct", "--tokenizer", "PAE-tiny", "--random-init", *photos, "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["file"] for r in metrics["images"]] == photos and metrics["latent_shape"] == [8, 8, 8]
    assert all(np.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1 for r in metrics["images"])
    with Image.open(out / "chelsea_recon.png") as im:
        assert im.size == (128, 64)  # input | reconstruction, 64x64 each
    with Image.open(out / "grid.png") as im:
        assert im.size == (128, 3 * 64)
    # the left half is the (cropped, resized) input itself
    left = np.asarray(Image.open(out / "coffee_recon.png"))[:, :64].astype(np.float64)
    assert left.std() > 10
    assert "mean\tPSNR" in capsys.readouterr().out


def test_reconstruct_with_weights_file(photos, tmp_path, capsys):
    """With a weights file the CLI reports per-image metrics of exactly that tokenizer."""
    torch.manual_seed(0)
    tok = create_tokenizer("RAE-tiny")
    path = tmp_path / "rae_tiny.safetensors"
    save_safetensors({k: v.contiguous() for k, v in tok.state_dict().items()}, path)
    out = tmp_path / "recon"
    assert main(["reconstruct", "--tokenizer", "RAE-tiny", "--weights", str(path), *photos, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len({round(r["psnr"], 3) for r in m["images"]}) == 3  # one value per image
    # same weights -> same numbers as running the library directly
    from pae_fast.eval.recon import psnr
    from pae_fast.eval.reconstruct import load_square_image
    from pae_fast.models.tokenizer import to_image_range

    x = load_square_image(photos[0], 64)[None]
    with torch.no_grad():
        y = to_image_range(tok.decode(tok.encode(x)))
    assert abs(float(psnr(y, x)[0]) - m["images"][0]["psnr"]) < 1e-3


def test_reconstruct_refuses_silent_random_and_bad_input(photos, tmp_path, capsys):
    assert main(["reconstruct", "--tokenizer", "PAE-tiny", photos[0], "--out", str(tmp_path / "a")]) == 2
    assert "--random-init" in capsys.readouterr().err
    missing = str(tmp_path / "nope.png")
    assert main(["reconstruct", "--tokenizer", "PAE-tiny", "--random-init", missing, "--out", str(tmp_path)]) == 3
    assert "nope.png does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    save_safetensors({"vfm.model.x": torch.zeros(1)}, bad)
    args = ["reconstruct", "--tokenizer", "PAE-tiny", "--weights", str(bad), photos[0], "--out", str(tmp_path)]
    assert main(args) == 3  # a weights problem: exit code 3 in every command
    assert "does not fit PAE-tiny" in capsys.readouterr().err


def test_info_tokenizer(capsys):
    assert main(["info", "--tokenizer", "PAE-tiny"]) == 0
    out = capsys.readouterr().out
    assert "latent              8x8x8" in out and "frozen parameters   826,240" in out
    assert "encode GMAC/image" in out and "decode GMAC/image" in out
    assert main(["info", "--tokenizer", "PAE-nope"]) == 2

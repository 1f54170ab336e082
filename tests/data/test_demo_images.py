"""The demo's labelled real images: determinism, balance, value range, pixel-disjoint splits, ImageFolder files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pae_fast.data import demo_images as D


@pytest.fixture(scope="module")
def small():
    return D.build_demo_images(train_per_class=12, heldout_per_class=6, seed=3)


def test_shapes_range_balance_and_classes(small):
    K = len(D.DEMO_SOURCES)
    assert small.classes == tuple(sorted(small.classes)) and len(set(small.classes)) == K == 8
    for split, n in ((small.train, 12), (small.heldout, 6)):
        assert split.images.shape == (K * n, 3, 64, 64) and split.images.dtype == torch.float32
        assert split.labels.dtype == torch.int64
        assert torch.equal(torch.bincount(split.labels, minlength=K), torch.full((K,), n))
        assert split.images.min() >= 0 and split.images.max() <= 1
        assert torch.equal(split.images * 255, (split.images * 255).round())  # 8-bit levels, like the PNG files
        assert split.images.std(dim=(1, 2, 3)).min() > 0.01  # no blank crop (e.g. the retina's black border)
    # the grey photograph stays grey, the colour ones are not
    grey = small.train.images[small.train.labels == small.classes.index("cameraman")]
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    cat = small.train.images[small.train.labels == small.classes.index("cat")]
    assert (cat[:, 0] - cat[:, 2]).abs().mean() > 0.02


def test_deterministic_given_seed(small):
    again = D.build_demo_images(train_per_class=12, heldout_per_class=6, seed=3)
    assert torch.equal(again.train.images, small.train.images)
    assert torch.equal(again.heldout.images, small.heldout.images)
    assert again.train.fingerprint() == small.train.fingerprint()
    other = D.build_demo_images(train_per_class=12, heldout_per_class=6, seed=4)
    assert not torch.equal(other.train.images, small.train.images)


def test_cell_layout_splits_every_source(small):
    for name, cells in small.params["cells"].items():
        train, held = {tuple(c) for c in cells["train"]}, {tuple(c) for c in cells["heldout"]}
        assert train and held and not train & held, name
        assert len(held) == max(1, round(0.25 * (len(train) + len(held)))), name


def test_crops_stay_inside_their_cells():
    """On a source whose 4x4 cells each have their own colour, every crop is one flat colour of an allowed cell."""
    cell, n_side = 16, 4
    colours = torch.arange(n_side * n_side, dtype=torch.float32) / 16
    src = colours.view(n_side, n_side).repeat_interleave(cell, 0).repeat_interleave(cell, 1)[None].expand(3, -1, -1)
    cells = D._cells(n_side * cell, n_side * cell, cell)
    allowed = [0, 5, 10]
    out = D._crops(src, [cells[i] for i in allowed], 64, cell, 8, 8, torch.Generator().manual_seed(0))  # uint8
    assert (out.amax(dim=(1, 2, 3)) == out.amin(dim=(1, 2, 3))).all()  # never straddles two cells
    got = set(torch.unique(out[:, 0, 0, 0]).tolist())
    assert got == {round(float(colours[i]) * 255) for i in allowed}


def test_heldout_crops_are_not_training_crops(small):
    a = small.train.images.flatten(1)
    b = small.heldout.images.flatten(1)
    assert torch.cdist(b, a).min() > 1.0  # pixel-disjoint sources: no held-out crop is (nearly) a training crop


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="num_classes=9"):
        D.build_demo_images(num_classes=9)
    with pytest.raises(ValueError, match="min_crop"):
        D.build_demo_images(min_crop=200, cell_size=128)
    with pytest.raises(ValueError, match="heldout_fraction"):
        D.build_demo_images(heldout_fraction=1.0)


def test_random_hflip_and_dataset(small):
    x = small.train.images[:64]
    g = torch.Generator().manual_seed(0)
    y = D.random_hflip(x, g)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    same = (y == x).flatten(1).all(1)
    assert (flipped | same).all() and 16 < int(flipped.sum()) < 48
    assert torch.equal(D.random_hflip(x, torch.Generator().manual_seed(0)), y)
    ds = D.DemoImageDataset(small.train, hflip=True)
    assert len(ds) == len(small.train)
    seen = set()
    for _ in range(20):
        img, label = ds[5]
        assert isinstance(label, int) and label == int(small.train.labels[5])
        seen.add("same" if torch.equal(img, small.train.images[5]) else "flip")
        assert torch.equal(img, small.train.images[5]) or torch.equal(img, small.train.images[5].flip(-1))
    assert seen == {"same", "flip"}
    img, _ = D.DemoImageDataset(small.train)[5]
    assert torch.equal(img, small.train.images[5])


def test_image_folder_round_trip(tmp_path, small):
    roots = D.write_demo_image_folders(small, tmp_path / "demo")
    root = roots["train"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == list(small.classes)
    manifest = json.loads((root / D.MANIFEST).read_text())
    assert manifest["num_images"] == len(small.train) and manifest["fingerprint"] == small.train.fingerprint()
    # reading the files back gives exactly the tensors, with the labels of a sorted-folder ImageFolder reader
    files = sorted(root.glob("*/*.png"))
    assert len(files) == len(small.train)
    for f in files:
        i = int(f.stem.rsplit("_", 1)[1])
        pixels = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
        assert torch.equal(pixels, small.train.images[i])
        assert sorted(small.classes).index(f.parent.name) == int(small.train.labels[i])
    assert len(list(roots["heldout"].glob("*/*.png"))) == len(small.heldout)


def test_image_folder_rewrite_rules(tmp_path, small):
    root = tmp_path / "train"
    D.write_image_folder(small.train, root)
    stamp = (root / D.MANIFEST).stat().st_mtime_ns
    D.write_image_folder(small.train, root)  # same data: kept as it is
    assert (root / D.MANIFEST).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other demo images"):
        D.write_image_folder(small.heldout, root)
    D.write_image_folder(small.heldout, root, overwrite=True)
    assert len(list(root.glob("*/*.png"))) == len(small.heldout)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a demo image folder"):
        D.write_image_folder(small.train, foreign, overwrite=True)
    assert (foreign / "keep.txt").exists()


def test_jpeg_folder_is_close(tmp_path, small):
    root = D.write_image_folder(small.heldout, tmp_path / "jpg", fmt="jpeg")
    f = sorted(root.glob("*/*.jpg"))[0]
    i = int(f.stem.rsplit("_", 1)[1])
    pixels = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert (pixels - small.heldout.images[i]).abs().mean() < 0.02
    with pytest.raises(ValueError, match="fmt='gif'"):
        D.write_image_folder(small.heldout, tmp_path / "gif", fmt="gif")

"""The image sample list, class mapping, ADM crop, bad-file checks and the PIL dataset (pae_fast/data/images.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pae_fast.data.images import (
    CLASS_MAPPING_FILE,
    BadFileLog,
    BadImageError,
    ImageDataError,
    ImageDataset,
    center_crop_adm,
    check_image_header,
    find_samples,
    flip_bit,
    load_class_mapping,
    load_image,
    read_file_list,
    save_class_mapping,
    scan_image_folder,
)


def test_scan_maps_sorted_class_folders(image_tree):
    (image_tree / "class_1" / "notes.txt").write_text("not an image")
    (image_tree / "class_0" / ".hidden.jpg").write_bytes(b"x")
    (image_tree / "class_10").mkdir()  # sorts between class_1 and class_2
    Image.new("RGB", (80, 90)).save(image_tree / "class_10" / "a.png")
    s = scan_image_folder(image_tree, num_classes=4)
    assert s.classes == ("class_0", "class_1", "class_10", "class_2")
    assert len(s) == 13 and s.labels.count(2) == 1 and s.labels.count(3) == 4
    assert all(p.endswith((".jpg", ".png")) for p in s.paths)
    assert s.class_to_idx["class_2"] == 3
    assert s.paths[s.labels.index(2)].endswith("class_10/a.png")


def test_missing_and_empty_folders_say_what_was_found(tmp_path):
    with pytest.raises(ImageDataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageDataError, match=r"no class sub-folders \(found nothing\)"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.jpg")
    with pytest.raises(ImageDataError, match=r"found 1 loose files \(a.jpg\)"):
        scan_image_folder(tmp_path / "flat")
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(ImageDataError, match=r"class folder .*hollow/cat \(class 0\) holds no image files"):
        scan_image_folder(tmp_path / "hollow")
    with pytest.raises(ImageDataError, match="no image data configured"):
        find_samples(None, None, 10)


def test_class_count_must_match(image_tree):
    with pytest.raises(ImageDataError, match=r"found 3 classes \(class_0, class_1, class_2\) but data.num_classes=5"):
        scan_image_folder(image_tree, num_classes=5)
    with pytest.raises(ImageDataError, match=r"more than data.num_classes=2"):
        scan_image_folder(image_tree, num_classes=2)


def test_class_mapping_round_trip(tmp_path, image_tree):
    s = scan_image_folder(image_tree)
    path = save_class_mapping(s.classes, tmp_path / "run", source=s.source)
    assert path.name == CLASS_MAPPING_FILE
    doc = json.loads(path.read_text())
    assert doc["class_to_idx"] == {"class_0": 0, "class_1": 1, "class_2": 2} and doc["num_classes"] == 3
    assert load_class_mapping(tmp_path / "run") == s.classes
    with pytest.raises(ImageDataError, match="does not exist"):
        load_class_mapping(tmp_path)
    path.write_text('{"classes": ["a", "b"], "class_to_idx": {"a": 1, "b": 0}}')
    with pytest.raises(ImageDataError, match="must be a list of names matching"):
        load_class_mapping(tmp_path / "run")
    path.write_text("{not json")
    with pytest.raises(ImageDataError, match="is not valid"):
        load_class_mapping(tmp_path / "run")


def test_file_list_with_indices_and_names(tmp_path, image_tree):
    files = sorted(image_tree.rglob("*.jpg"))
    lst = tmp_path / "train.txt"
    lst.write_text("# comment\n\n" + "".join(f"{f.relative_to(image_tree)} {i % 2}\n" for i, f in enumerate(files)))
    s = read_file_list(lst, root=image_tree, num_classes=2)
    assert s.classes == ("0", "1") and s.labels[:3] == (0, 1, 0) and s.paths[0] == str(files[0])
    assert find_samples(str(image_tree), str(lst), 2) == s
    names = tmp_path / "names.txt"
    names.write_text(f"{files[0]} zebra\n{files[1]} ant\n")  # absolute paths, name labels: sorted mapping
    s = read_file_list(names)
    assert s.classes == ("ant", "zebra") and s.labels == (1, 0)
    with pytest.raises(ImageDataError, match=r"found 2 classes .* data.num_classes=3"):
        read_file_list(names, num_classes=3)
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{files[0]} 0\nlonely\n")
    with pytest.raises(ImageDataError, match=r"bad.txt:2: expected 'path label'"):
        read_file_list(bad)
    bad.write_text(f"{files[0]} 7\n")
    with pytest.raises(ImageDataError, match=r"label 7 .* outside \[0, 4\)"):
        read_file_list(bad, num_classes=4)
    bad.write_text(f"{tmp_path / 'gone.jpg'} 0\n")
    with pytest.raises(ImageDataError, match="1 listed files do not exist, e.g. .*gone.jpg"):
        read_file_list(bad)
    bad.write_text("# nothing\n")
    with pytest.raises(ImageDataError, match="lists no images"):
        read_file_list(bad)


def test_adm_crop_geometry():
    rng = np.random.default_rng(0)
    # Short side already S: no resize at all, only the centre crop (offset floor((100 - 64) / 2) = 18).
    a = rng.integers(0, 256, (64, 100, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(center_crop_adm(Image.fromarray(a), 64)), a[:, 18:82])
    a = rng.integers(0, 256, (101, 64, 3), dtype=np.uint8)  # odd margin 37: offset 18
    np.testing.assert_array_equal(np.asarray(center_crop_adm(Image.fromarray(a), 64)), a[18:82])
    # Short side exactly 2S: one box halving (2x2 means), then the bicubic resize to the same size is a copy.
    a = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    pooled = a.reshape(64, 2, 64, 2, 3).astype(np.float64).mean(axis=(1, 3))
    out = np.asarray(center_crop_adm(Image.fromarray(a), 64)).astype(np.float64)
    assert np.abs(out - pooled).max() <= 1.0
    # Three halvings (short side 300, 150, 75 >= 2 * 32) floor the sides to 37x64, then bicubic to 32x55.
    img = Image.fromarray(rng.integers(0, 256, (300, 517, 3), dtype=np.uint8))
    assert center_crop_adm(img, 32).size == (32, 32)
    flat = Image.new("RGB", (517, 300), (10, 200, 30))
    assert np.unique(np.asarray(center_crop_adm(flat, 32)).reshape(-1, 3), axis=0).tolist() == [[10, 200, 30]]


def test_bad_files_are_named(tmp_path, image_tree):
    good = next(image_tree.rglob("*.jpg"))
    data = good.read_bytes()
    trunc, text, zeros = tmp_path / "trunc.jpg", tmp_path / "text.jpg", tmp_path / "zeros.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    text.write_text("hello, not a jpeg")
    zeros.write_bytes(data[:600] + bytes(len(data) - 602) + b"\xff\xd9")  # header and end marker intact
    assert check_image_header(good) is None
    assert "truncated" in check_image_header(trunc)
    assert "UnidentifiedImageError" in check_image_header(text)
    assert check_image_header(zeros) is None  # the cheap check cannot see inside the entropy-coded data
    for f in (trunc, text, zeros):
        with pytest.raises(BadImageError, match=f"{f}: not a decodable image") as e:
            load_image(f)
        assert e.value.path == str(f)
    with pytest.raises(BadImageError, match="does-not-exist.jpg"):
        load_image(tmp_path / "does-not-exist.jpg")
    assert load_image(good).mode == "RGB"


def test_dataset_items_and_skip(tmp_path, image_tree):
    s = scan_image_folder(image_tree)
    ds = ImageDataset(s, 32, hflip=False)
    x, label, index = ds[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert (label, index) == (s.labels[5], 5)
    u8 = ImageDataset(s, 32, hflip=False, as_uint8=True)[5][0]
    assert u8.dtype == torch.uint8 and torch.equal(u8.float() / 255, x)
    bad = s.paths[3]
    with open(bad, "r+b") as f:
        f.truncate(200)
    with pytest.raises(BadImageError, match=bad):
        ImageDataset(s, 32)[3]
    item = ImageDataset(s, 32, on_bad_file="skip")[3]
    assert item[0] is None and item[1] == bad and "OSError" in item[2]
    counter = BadFileLog()
    counter.add(bad, "truncated")
    counter.add(bad, "truncated")
    assert counter.count == 1
    with pytest.raises(ValueError, match="on_bad_file"):
        ImageDataset(s, 32, on_bad_file="ignore")


def test_flips_are_fair_and_deterministic(image_tree):
    bits = [flip_bit(0, e, i) for e in range(10) for i in range(400)]
    p = float(np.mean(bits))
    assert abs(p - 0.5) < 4 * (0.25 / len(bits)) ** 0.5  # 4 sigma of a fair coin
    assert bits == [flip_bit(0, e, i) for e in range(10) for i in range(400)]
    assert bits != [flip_bit(1, e, i) for e in range(10) for i in range(400)]
    s = scan_image_folder(image_tree)
    plain, flipping = ImageDataset(s, 32, hflip=False), ImageDataset(s, 32, hflip=True, seed=3)
    for i in range(len(s)):
        for epoch in (0, 1):
            want = plain[i][0].flip(-1) if flip_bit(3, epoch, i) else plain[i][0]
            assert torch.equal(flipping[(i, epoch)][0], want)

"""The PIL and DALI image loaders on real JPEGs: same crop, fair flips, sharding, bad files, loader choice."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pae_fast.config import DataConfig
from pae_fast.data import loaders as loaders_mod
from pae_fast.data.dali_loader import DALIImageLoader, dali_available
from pae_fast.data.images import (
    BadImageError,
    ImageDataError,
    ImageDataset,
    ImageSamples,
    center_crop_adm,
    load_image,
    scan_image_folder,
)
from pae_fast.data.loaders import build_image_loader, resolve_loader_kind
from pae_fast.data.pil_loader import PILImageLoader

needs_dali = pytest.mark.skipif(not dali_available()[0], reason=f"DALI unavailable: {dali_available()[1]}")

# Mean absolute difference DALI vs PIL in 0..255 units (measured: 0.10-0.43 without box halving; 1.0-3.3 with
# 1-3 halvings at 64 px, where DALI's single antialiased bicubic replaces ADM's box halvings;
# docs/method.md § DALI against PIL).
TOL_NO_HALVING = 1.0
TOL_HALVING = 4.0


def _pil_reference(path: str, size: int) -> torch.Tensor:
    """``(3, S, S)`` float in [0, 255] straight from the ADM crop."""
    return torch.from_numpy(np.array(center_crop_adm(load_image(path), size))).permute(2, 0, 1).float()


def _all(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return (torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]),
            torch.cat([b.indices for b in batches]))


def _pil(samples, **kw) -> PILImageLoader:
    kw = {"image_size": 32, "batch_size": 4, **kw}
    return PILImageLoader(samples, **kw)


def _dali(samples, **kw) -> DALIImageLoader:
    kw = {"image_size": 32, "batch_size": 4, "threads": 1, **kw}
    return DALIImageLoader(samples, **kw)


def test_pil_loader_epoch_batches(image_tree):
    s = scan_image_folder(image_tree)
    loader = _pil(s, batch_size=5, drop_last=True)
    images, labels, indices = _all(loader)
    assert len(loader) == 2 and images.shape == (10, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(labels, torch.tensor(s.labels)[indices])
    loader = _pil(s, batch_size=5, drop_last=False, shuffle=False, hflip=False, num_workers=1, prefetch=1)
    images, labels, indices = _all(loader)
    assert len(loader) == 3 and indices.tolist() == list(range(12))
    assert torch.equal(images[7] * 255, _pil_reference(s.paths[7], 32))
    again = _all(loader)  # persistent worker, second epoch: same order without shuffle
    assert torch.equal(again[2], indices) and loader.epoch == 2


@needs_dali
def test_dali_matches_pil_crop(tmp_path, image_tree, make_tree):
    s = scan_image_folder(image_tree)
    size = 64  # the photos' crops have sides 70-119: no box halving at 64 px
    loader = _dali(s, image_size=size, hflip=False, shuffle=False, drop_last=False, batch_size=5)
    images, labels, indices = _all(loader)
    assert len(loader) == 3 and sorted(indices.tolist()) == list(range(12))
    assert images.shape == (12, 3, size, size) and images.dtype == torch.float32
    assert torch.equal(labels, torch.tensor(s.labels)[indices])
    for img, i in zip(images, indices.tolist()):
        mad = (img * 255 - _pil_reference(s.paths[i], size)).abs().mean().item()
        assert mad < TOL_NO_HALVING, f"{s.paths[i]}: DALI vs PIL mean abs difference {mad:.2f}"
    make_tree(tmp_path / "big", classes=2, per_class=2, min_side=140, max_side=290)  # 1-3 halvings at 64 px
    big = scan_image_folder(tmp_path / "big")
    images, _, indices = _all(_dali(big, image_size=size, hflip=False, shuffle=False, drop_last=False))
    for img, i in zip(images, indices.tolist()):
        mad = (img * 255 - _pil_reference(big.paths[i], size)).abs().mean().item()
        assert mad < TOL_HALVING, f"{big.paths[i]}: DALI vs PIL mean abs difference {mad:.2f}"


def _flip_fraction(images: torch.Tensor, plain: torch.Tensor) -> float:
    """Fraction of images equal to the mirror of their unflipped version (and never to neither)."""
    flipped = (images - plain.flip(-1)).abs().flatten(1).amax(1) < 1e-6
    same = (images - plain).abs().flatten(1).amax(1) < 1e-6
    assert bool((flipped | same).all())
    return flipped.float().mean().item()


@needs_dali
def test_flip_statistics(tmp_path, make_photo):
    # 40 asymmetric 16 px images; 5 epochs -> 200 draws per loader; 4 sigma of a fair coin is 0.14.
    img = make_photo("astronaut")
    paths = []
    for i in range(40):
        p = tmp_path / f"{i:02d}.png"  # lossless: both decoders give identical pixels
        Image.fromarray(img[i * 5:i * 5 + 16, 100 + i:116 + i]).save(p)
        paths.append(str(p))
    s = ImageSamples(tuple(paths), (0,) * 40, ("a",))
    plain = torch.stack([ImageDataset(s, 16, hflip=False)[i][0] for i in range(40)])
    for make in (_pil, _dali):
        loader = make(s, image_size=16, batch_size=8, hflip=True, shuffle=True)
        fractions = []
        for _ in range(5):
            images, _, indices = _all(loader)
            fractions.append(_flip_fraction(images.cpu(), plain[indices]))
        assert abs(np.mean(fractions) - 0.5) < 0.14, (make.__name__, fractions)
        assert len(set(fractions)) > 1  # flips change between epochs


@pytest.mark.parametrize("kind", ["pil", pytest.param("dali", marks=needs_dali)])
def test_ranks_see_disjoint_shards(image_tree, kind):
    s = scan_image_folder(image_tree)
    make = _pil if kind == "pil" else _dali
    seen = []
    for rank in range(2):
        loader = make(s, batch_size=2, rank=rank, world_size=2, shuffle=True, drop_last=True)
        seen.append(set(_all(loader)[2].tolist()))
        assert len(seen[-1]) == 6 and len(loader) == 3
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))


@pytest.mark.parametrize("kind", ["pil", pytest.param("dali", marks=needs_dali)])
def test_corrupt_jpeg(image_tree, kind):
    s = scan_image_folder(image_tree)
    bad = s.paths[4]
    data = Path(bad).read_bytes()
    Path(bad).write_bytes(data[: len(data) // 2])  # truncated download
    make = _pil if kind == "pil" else _dali
    with pytest.raises(BadImageError, match=f"{bad}: not a decodable image"):
        _all(make(s, shuffle=False))
    if kind == "pil":  # raised inside a worker process, re-raised in the parent with the file named
        with pytest.raises(BadImageError, match=f"{bad}: not a decodable image"):
            _all(make(s, shuffle=False, num_workers=1))
    loader = make(s, shuffle=False, drop_last=False, on_bad_file="skip")
    _, _, indices = _all(loader)
    assert loader.bad_files.count == 1 and loader.bad_files.paths == [bad]
    assert sorted(indices.tolist()) == [i for i in range(12) if i != 4]


@needs_dali
def test_dali_runtime_decode_failure_is_named_and_skipped(image_tree):
    """A JPEG whose header and end marker are intact passes the header check; DALI fails on it later."""
    s = scan_image_folder(image_tree)
    bad = s.paths[6]
    data = Path(bad).read_bytes()
    Path(bad).write_bytes(data[:600] + bytes(len(data) - 602) + b"\xff\xd9")
    with pytest.raises(BadImageError, match=bad):
        _all(_dali(s, shuffle=False))
    loader = _dali(s, shuffle=False, drop_last=False, on_bad_file="skip")
    _, _, indices = _all(loader)
    assert loader.bad_files.paths == [bad]
    assert sorted(set(indices.tolist())) == [i for i in range(12) if i != 6]


def test_build_image_loader_choice(image_tree, monkeypatch):
    cfg = DataConfig(root=str(image_tree), num_classes=3, image_size=32, batch_size=4, loader="pil", num_workers=0,
                     hflip=False, drop_last=False)
    loader = build_image_loader(cfg, seed=1)
    assert loader.kind == "pil" and len(loader) == 3
    assert not loader.dataset.hflip and loader.bad_files.count == 0
    with pytest.raises(ImageDataError, match=r"found 3 classes .* data.num_classes=1000"):
        build_image_loader(dataclasses.replace(cfg, num_classes=1000))
    monkeypatch.setattr(loaders_mod, "dali_available", lambda: (False, "ImportError: no module nvidia.dali"))
    assert resolve_loader_kind("auto") == "pil"
    with pytest.raises(ImageDataError, match="data.loader=dali but DALI is not usable: ImportError: no module"):
        build_image_loader(dataclasses.replace(cfg, loader="dali"))
    with pytest.raises(ImageDataError, match="must be one of auto, dali, pil"):
        resolve_loader_kind("opencv")


@needs_dali
def test_build_image_loader_auto_takes_dali(tmp_path, image_tree):
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p} {lab}\n" for p, lab in zip(*(lambda s: (s.paths, s.labels))(
        scan_image_folder(image_tree)))))
    cfg = DataConfig(root=None, file_list=str(lst), num_classes=3, image_size=32, batch_size=4, loader="auto",
                     dali_threads=1, prefetch=1)
    loader = build_image_loader(cfg, shuffle=False, hflip=False)
    assert loader.kind == "dali" and loader.decoder_device == "cpu" and len(loader) == 3
    images, labels, indices = _all(loader)
    assert images.shape == (12, 3, 32, 32) and torch.equal(labels, torch.tensor(loader.samples.labels)[indices])


@needs_dali
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mixed (nvJPEG) decoder needs CUDA")
def test_dali_mixed_decoder_on_gpu(image_tree):
    s = scan_image_folder(image_tree)
    loader = _dali(s, image_size=64, hflip=False, shuffle=False, drop_last=False, device="cuda")
    assert loader.decoder_device == "mixed"
    images, labels, indices = _all(loader)
    assert images.is_cuda and labels.is_cuda and images.shape == (12, 3, 64, 64)
    for img, i in zip(images.cpu(), indices.tolist()):
        mad = (img * 255 - _pil_reference(s.paths[i], 64)).abs().mean().item()
        assert mad < 2 * TOL_NO_HALVING, f"{s.paths[i]}: nvJPEG + GPU resize vs PIL mean abs difference {mad:.2f}"


@pytest.mark.parametrize("kind", ["pil", pytest.param("dali", marks=needs_dali)])
def test_abandoned_epoch_does_not_shorten_the_next(image_tree, kind):
    s = scan_image_folder(image_tree)
    loader = (_pil if kind == "pil" else _dali)(s, batch_size=4, shuffle=False, hflip=False)
    next(iter(loader))  # one batch, then the epoch is abandoned
    _, _, indices = _all(loader)
    assert sorted(indices.tolist()) == list(range(12)) and loader.epoch == 2


@pytest.mark.parametrize("kind", ["pil", pytest.param("dali", marks=needs_dali)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_len_matches_uneven_shards(image_tree, kind, shuffle, drop_last):
    s = scan_image_folder(image_tree).subset(range(11))  # shards of 5 and 6 items
    counts = []
    for rank in range(2):
        loader = (_pil if kind == "pil" else _dali)(s, batch_size=4, rank=rank, world_size=2, shuffle=shuffle,
                                                    drop_last=drop_last, hflip=False)
        for _ in range(2):
            expected = len(loader)
            sizes = [b.images.shape[0] for b in loader]
            assert len(sizes) == expected and all(sizes), sizes
            counts.append(len(sizes))
    if drop_last:  # DDP needs the same number of steps on every rank
        assert len(set(counts)) == 1

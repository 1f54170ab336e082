"""Real JPEGs for the image-data tests: random crops of photographs that ship with scikit-image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo(name: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 photograph from ``skimage.data``."""
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])


def write_tree(root: Path, classes: int = 3, per_class: int = 4, min_side: int = 70, max_side: int = 120,
               seed: int = 0, quality: int = 95) -> list[Path]:
    """``root/class_<k>/<i>.jpg``: class ``k`` holds random crops of photograph ``k`` (sides in
    ``[min_side, max_side)``). Returns the files in sorted order."""
    rng = np.random.default_rng(seed)
    files = []
    for k in range(classes):
        img = photo(PHOTOS[k % len(PHOTOS)])
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(min_side, max_side, size=2)
            y, x = rng.integers(0, img.shape[0] - h), rng.integers(0, img.shape[1] - w)
            path = folder / f"{i:03d}.jpg"
            Image.fromarray(img[y:y + h, x:x + w]).save(path, quality=quality)
            files.append(path)
    return files


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """Three classes of four small JPEGs (70-119 px sides: no box halving at 64 px)."""
    root = tmp_path / "images"
    write_tree(root)
    return root


@pytest.fixture
def make_tree():
    """The :func:`write_tree` function, for tests that need other sizes or counts."""
    return write_tree


@pytest.fixture
def make_photo():
    """The :func:`photo` function."""
    return photo

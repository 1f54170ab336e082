"""The demo's labelled real images: random crops of eight photographs shipped inside scikit-image (no download).

Choice (see ``docs/method.md §Demo images``): class ``k`` is one source photograph, an item is a random 64x64 crop
of it. The photographs come with the ``scikit-image`` wheel itself (``skimage/data/*.png|jpg``), so an installed
package has them offline; scikit-learn's digits were the alternative, but they are 8x8 grey strokes (upscaled, a VFM
would see blurred blobs with no colour or texture) and scikit-learn is not a dependency. Eight mutually different
scenes (seven in colour, one grey) give a class-conditional problem with real-image statistics (edges, textures,
colour) that a tiny ViT can learn in a minute on a CPU, and whose classes a good feature space separates.

Geometry (everything in pixels of the source resized so that its short side is ``base_size``):

- the resized source is tiled into square cells of side ``cell_size``; a seeded draw assigns a quarter of each
  source's cells (at least one) to the held-out split, the rest to training;
- a crop has a random side in ``[min_crop, cell_size]`` and lies entirely inside one cell of its split, so training
  and held-out crops never share a pixel of the source;
- the crop is resized (bilinear, antialiased) to ``image_size`` and quantised to 8 bits, so the tensors returned
  here and the PNG files written by :func:`write_image_folder` hold exactly the same values.

Horizontal flips are a training-time augmentation (:func:`random_hflip`, :class:`DemoImageDataset`), not stored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEMO_SOURCES",
    "DemoSplit",
    "DemoImages",
    "DemoImageDataset",
    "build_demo_images",
    "random_hflip",
    "write_image_folder",
    "write_demo_image_folders",
]

MANIFEST = "demo_images.json"


@dataclass(frozen=True)
class _Source:
    name: str  # class name (folder name in the ImageFolder tree)
    loader: str  # skimage.data function
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # (top, left, bottom, right) fractions kept


# Eight photographs shipped in the scikit-image wheel (skimage.data.cat is chelsea again, so it is not used), in
# alphabetical order of their class names: an ImageFolder reader that sorts folder names gives the same labels.
# The retina is a fundus disc on black: keep the square inscribed in the disc so no crop is plain black.
DEMO_SOURCES: tuple[_Source, ...] = (
    _Source("astronaut", "astronaut"),
    _Source("cameraman", "camera"),  # the one grey photograph, as RGB: a class told apart by its lack of colour
    _Source("cat", "chelsea"),
    _Source("coffee", "coffee"),
    _Source("motorcycle", "stereo_motorcycle"),
    _Source("retina", "retina", (0.2, 0.2, 0.8, 0.8)),
    _Source("rocket", "rocket"),
    _Source("tissue", "immunohistochemistry"),
)


@dataclass
class DemoSplit:
    """One split of the demo images.

    Attributes:
        images: ``(N, 3, S, S)`` float32 in ``[0, 1]``, multiples of 1/255; class-major order.
        labels: ``(N,)`` int64 class indices into ``classes``.
        classes: class names, index = label.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def fingerprint(self) -> str:
        """A sha256 of the 8-bit pixels, labels and class names (identifies the data in manifests and hashes)."""
        h = hashlib.sha256()
        h.update(_to_uint8(self.images).numpy().tobytes())
        h.update(self.labels.numpy().astype(np.int64).tobytes())
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()


@dataclass
class DemoImages:
    """The training and held-out splits (pixel-disjoint crops of the same sources) and how they were made."""

    train: DemoSplit
    heldout: DemoSplit
    params: dict

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@functools.lru_cache(maxsize=32)
def _load_source(loader: str, box: tuple[float, float, float, float], base_size: int) -> torch.Tensor:
    """Source photograph ``(3, H, W)`` float32 in [0, 1], cut to ``box`` and resized to short side ``base_size``."""
    try:
        import skimage.data
    except ImportError as e:  # a dependency of pae_fast; a broken install should say so plainly
        raise ImportError("the demo images need scikit-image (`pip install scikit-image`)") from e
    img = getattr(skimage.data, loader)()
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3]
    if img.dtype != np.uint8:
        raise ValueError(f"skimage.data.{loader}() gave dtype {img.dtype}; expected uint8")
    H, W = img.shape[:2]
    top, left, bottom, right = box
    img = img[round(top * H) : round(bottom * H), round(left * W) : round(right * W)]
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)  # (3, h, w)
    h, w = x.shape[1:]
    scale = base_size / min(h, w)
    size = (max(base_size, round(h * scale)), max(base_size, round(w * scale)))
    return F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp_(0, 1)


def _cells(h: int, w: int, cell: int) -> list[tuple[int, int]]:
    """Top-left corners of the non-overlapping ``cell x cell`` tiles of an ``h x w`` image (centred grid)."""
    ny, nx = h // cell, w // cell
    oy, ox = (h - ny * cell) // 2, (w - nx * cell) // 2
    return [(oy + i * cell, ox + j * cell) for i in range(ny) for j in range(nx)]


def _crops(src: torch.Tensor, cells: list[tuple[int, int]], n: int, cell: int, min_crop: int, image_size: int,
           g: torch.Generator) -> torch.Tensor:
    """``n`` random crops ``(n, 3, image_size, image_size)`` uint8 of ``src``, each inside one of ``cells``."""
    which = torch.randint(len(cells), (n,), generator=g)
    sides = torch.randint(min_crop, cell + 1, (n,), generator=g)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    out = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    for i in range(n):
        s = int(sides[i])
        cy, cx = cells[int(which[i])]
        y = cy + int(u[i, 0] * (cell - s + 1))
        x = cx + int(u[i, 1] * (cell - s + 1))
        patch = src[None, :, y : y + s, x : x + s]
        if s != image_size:
            patch = F.interpolate(patch, size=(image_size, image_size), mode="bilinear", antialias=True,
                                  align_corners=False)
        out[i] = _to_uint8(patch[0])
    return out


def build_demo_images(
    train_per_class: int = 256,
    heldout_per_class: int = 64,
    seed: int = 0,
    image_size: int = 64,
    base_size: int = 384,
    cell_size: int = 128,
    min_crop: int = 64,
    heldout_fraction: float = 0.25,
    num_classes: int | None = None,
) -> DemoImages:
    """Build the demo's labelled crops, deterministically from ``seed``.

    Args:
        train_per_class, heldout_per_class: crops per class in each split (class-balanced, class-major order).
        seed: the one seed of the held-out cell assignment and of every crop.
        image_size: side ``S`` of the returned images.
        base_size: short side of each source after resizing.
        cell_size: side of the tiles that split a source between train and held-out; the largest crop side.
        min_crop: the smallest crop side (before resizing to ``image_size``).
        heldout_fraction: share of each source's tiles given to the held-out split (at least one tile each side).
        num_classes: use only the first ``num_classes`` of :data:`DEMO_SOURCES` (all eight by default).

    Returns:
        :class:`DemoImages` with ``train.images (K*train_per_class, 3, S, S)`` and
        ``heldout.images (K*heldout_per_class, 3, S, S)``, float32 in ``[0, 1]`` (8-bit levels).
    """
    K = len(DEMO_SOURCES) if num_classes is None else num_classes
    if not 1 <= K <= len(DEMO_SOURCES):
        raise ValueError(f"num_classes={num_classes}: expected 1..{len(DEMO_SOURCES)}")
    if train_per_class < 1 or heldout_per_class < 1:
        raise ValueError(f"train_per_class={train_per_class}, heldout_per_class={heldout_per_class}: expected >= 1")
    if not 0 < min_crop <= cell_size <= base_size:
        raise ValueError(f"need 0 < min_crop ({min_crop}) <= cell_size ({cell_size}) <= base_size ({base_size})")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction}: expected a value in (0, 1)")
    if image_size < 8:
        raise ValueError(f"image_size={image_size}: expected >= 8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: intra-op threads only add hand-off cost (10x on a busy CPU)
    try:
        return _build(K, train_per_class, heldout_per_class, seed, image_size, base_size, cell_size, min_crop,
                      heldout_fraction)
    finally:
        torch.set_num_threads(threads)


def _build(K: int, train_per_class: int, heldout_per_class: int, seed: int, image_size: int, base_size: int,
           cell_size: int, min_crop: int, heldout_fraction: float) -> DemoImages:
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "heldout": []}
    counts = {"train": train_per_class, "heldout": heldout_per_class}
    layout = {}
    for src_spec in DEMO_SOURCES[:K]:
        src = _load_source(src_spec.loader, src_spec.box, base_size)
        cells = _cells(src.shape[1], src.shape[2], cell_size)
        if len(cells) < 2:
            raise ValueError(f"source {src_spec.name!r} resized to {tuple(src.shape[1:])} has {len(cells)} cell(s) "
                             f"of {cell_size}px; need >= 2 to split train/held-out (lower cell_size)")
        n_held = min(len(cells) - 1, max(1, round(heldout_fraction * len(cells))))
        order = torch.randperm(len(cells), generator=g).tolist()
        split_cells = {"heldout": [cells[i] for i in sorted(order[:n_held])],
                       "train": [cells[i] for i in sorted(order[n_held:])]}
        layout[src_spec.name] = {k: [list(c) for c in v] for k, v in split_cells.items()}
        for split in ("train", "heldout"):
            parts[split].append(_crops(src, split_cells[split], counts[split], cell_size, min_crop, image_size, g))
    classes = tuple(s.name for s in DEMO_SOURCES[:K])

    def make(split: str) -> DemoSplit:
        images = torch.cat(parts[split]).float().div_(255)
        labels = torch.arange(K).repeat_interleave(counts[split])
        return DemoSplit(images, labels, classes)

    params = dict(train_per_class=train_per_class, heldout_per_class=heldout_per_class, seed=seed,
                  image_size=image_size, base_size=base_size, cell_size=cell_size, min_crop=min_crop,
                  heldout_fraction=heldout_fraction, num_classes=K, cells=layout)
    return DemoImages(make("train"), make("heldout"), params)


def random_hflip(images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image of ``images (N, C, H, W)`` left-right with probability ``p`` (a new tensor)."""
    flip = torch.rand(images.shape[0], generator=generator) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class DemoImageDataset(torch.utils.data.Dataset):
    """A map-style dataset of ``(image (3, S, S) float32 in [0, 1], label int)`` over a :class:`DemoSplit`.

    Args:
        split: the images and labels.
        hflip: flip each item left-right with probability 1/2, drawn from ``torch``'s global RNG (which the
            training engine seeds and checkpoints; DataLoader workers get their own seeds).
    """

    def __init__(self, split: DemoSplit, hflip: bool = False) -> None:
        self.split, self.hflip = split, hflip

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.split.images[i]
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, int(self.split.labels[i])


def _manifest(split: DemoSplit, fmt: str, params: dict | None) -> dict:
    return {"format": fmt, "classes": list(split.classes), "num_images": len(split),
            "fingerprint": split.fingerprint(), "params": params or {}}


def write_image_folder(split: DemoSplit, root: str | os.PathLike, fmt: str = "png", params: dict | None = None,
                       overwrite: bool = False) -> Path:
    """Write ``split`` as an ImageFolder tree ``root/<class>/<class>_<i>.<fmt>``, atomically as a whole.

    The tree is written in a temporary sibling folder with a manifest (``demo_images.json``: classes, count, format,
    a fingerprint of the pixels) and renamed into place. If ``root`` already holds the same data it is kept as is.

    Args:
        split: the images to write.
        root: destination folder.
        fmt: ``"png"`` (lossless: reading it back gives exactly ``split.images``) or ``"jpeg"`` (quality 95).
        params: how the split was made (stored in the manifest).
        overwrite: replace a ``root`` that holds other demo images (a folder without our manifest is never removed).

    Returns:
        ``root``.
    """
    from PIL import Image

    if fmt not in ("png", "jpeg"):
        raise ValueError(f"fmt={fmt!r}: expected 'png' or 'jpeg'")
    root = Path(root)
    manifest = _manifest(split, fmt, params)
    if root.exists():
        try:
            old = json.loads((root / MANIFEST).read_text())
        except (OSError, ValueError):
            raise FileExistsError(f"{root} exists and is not a demo image folder (no readable {MANIFEST}); "
                                  "choose another path or remove it") from None
        if {k: old.get(k) for k in manifest} == manifest:
            return root
        if not overwrite:
            raise FileExistsError(f"{root} holds other demo images ({old.get('num_images')} images, fingerprint "
                                  f"{str(old.get('fingerprint'))[:12]}); pass overwrite=True to replace them")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        pixels = _to_uint8(split.images).permute(0, 2, 3, 1).numpy()  # (N, S, S, 3)
        ext = "png" if fmt == "png" else "jpg"
        for name in split.classes:
            (tmp / name).mkdir()
        width = max(4, len(str(len(split))))
        for i, (arr, y) in enumerate(zip(pixels, split.labels.tolist(), strict=True)):
            name = split.classes[y]
            im = Image.fromarray(arr, mode="RGB")
            path = tmp / name / f"{name}_{i:0{width}d}.{ext}"
            if fmt == "png":
                im.save(path, format="PNG", compress_level=1)
            else:
                im.save(path, format="JPEG", quality=95)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if root.exists():  # overwrite=True and a manifest of ours was read above
            old_dir = root.with_name(f".{root.name}.old")
            shutil.rmtree(old_dir, ignore_errors=True)
            os.replace(root, old_dir)
            os.replace(tmp, root)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def write_demo_image_folders(images: DemoImages, root: str | os.PathLike, fmt: str = "png",
                             overwrite: bool = False) -> dict[str, Path]:
    """Write both splits: ``root/train/<class>/...`` and ``root/heldout/<class>/...`` (see :func:`write_image_folder`).

    Returns:
        ``{"train": root/"train", "heldout": root/"heldout"}``.
    """
    root = Path(root)
    return {split: write_image_folder(getattr(images, split), root / split, fmt, images.params, overwrite)
            for split in ("train", "heldout")}


"""Images on disk: the sample list (ImageFolder tree or file list), the class mapping, the ADM centre crop, bad files.

Two ways to name a data set, both giving an :class:`ImageSamples` (absolute paths, integer labels, class names):

* an ImageFolder tree ``root/<class>/<image>``: class folders sorted by name are classes ``0 .. K-1``;
* a file list: one ``path label`` per line (``#`` comments and blank lines ignored; a path relative to the list's
  folder, or to ``data.root`` when set). Labels are class indices (integers) or class names (mapped in sorted order).

The class mapping is written beside every cache and run as ``class_mapping.json`` (:func:`save_class_mapping`).

The crop is the ADM one (docs/method.md §Data): halve the image with a box filter while its short side is at least
twice the target size, resize bicubically so the short side equals the target size, then cut the centre square.
A file that is not a decodable image is a :class:`BadImageError` naming the file; with ``data.on_bad_file: skip`` the
loaders drop it instead, count it (:class:`BadFileLog`) and log it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from pae_fast.errors import DataError
from pae_fast.io import atomic_write_text

__all__ = [
    "IMAGE_EXTENSIONS",
    "CLASS_MAPPING_FILE",
    "ImageDataError",
    "BadImageError",
    "ImageSamples",
    "to_rgb",
    "scan_image_folder",
    "read_file_list",
    "find_samples",
    "save_class_mapping",
    "load_class_mapping",
    "center_crop_adm",
    "load_image",
    "check_image_header",
    "BadFileLog",
    "ImageBatch",
    "ImageDataset",
    "flip_bit",
]

log = logging.getLogger("pae_fast.train.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
CLASS_MAPPING_FILE = "class_mapping.json"
OnBadFile = Literal["error", "skip"]


class ImageDataError(DataError):
    """The image data set is not usable as configured (missing/empty folder, wrong class count, bad file list)."""


class BadImageError(ImageDataError):
    """One file is not a decodable image; ``path`` names it and ``reason`` says what failed."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        if reason is None:  # rebuilt from its message alone (a DataLoader worker re-raising it in the parent)
            super().__init__(str(path))
            self.path, self.reason = "", str(path)
            return
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: not a decodable image ({reason}); fix or remove it, or set data.on_bad_file=skip")


# ----------------------------------------------------------------------------------------------------------------
# The sample list and the class mapping
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSamples:
    """The items of an image data set.

    Attributes:
        paths: absolute file paths, one per item.
        labels: class index of each item, in ``[0, len(classes))``.
        classes: class names; ``classes[i]`` is the name of label ``i``.
        source: the folder or file list the items came from (for messages).
    """

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def subset(self, keep: Sequence[int]) -> ImageSamples:
        """The items at positions ``keep`` (same classes)."""
        return ImageSamples(tuple(self.paths[i] for i in keep), tuple(self.labels[i] for i in keep), self.classes,
                            self.source)


def _check_num_classes(classes: Sequence[str], num_classes: int | None, where: str) -> None:
    if num_classes is None or len(classes) == num_classes:
        return
    shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
    if len(classes) < num_classes:
        raise ImageDataError(
            f"{where}: found {len(classes)} classes ({shown}) but data.num_classes={num_classes}; point data.root at "
            f"the full data set or set data.num_classes={len(classes)}"
        )
    raise ImageDataError(
        f"{where}: found {len(classes)} classes ({shown}), more than data.num_classes={num_classes}; labels would "
        f"exceed the generator's class table; set data.num_classes={len(classes)}"
    )


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(root: str | os.PathLike, num_classes: int | None = None) -> ImageSamples:
    """List an ImageFolder tree ``root/<class>/**/<image>``; class folders sorted by name are labels 0..K-1.

    Files without an image extension (:data:`IMAGE_EXTENSIONS`) are not items; they are counted and logged.
    Hidden files and folders (``.name``) are ignored.

    Raises:
        ImageDataError: ``root`` is missing or not a folder, has no class folders, a class folder holds no image,
            or the number of classes is not ``num_classes`` (when given); the message says what was found.
    """
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise ImageDataError(f"image folder {root} does not exist (data.root)")
    if not root.is_dir():
        raise ImageDataError(f"data.root={root} is not a folder; give an ImageFolder tree root/<class>/<image>")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    classes = [p.name for p in entries if p.is_dir()]
    if not classes:
        loose = [p.name for p in entries if p.is_file()]
        found = f"{len(loose)} loose files ({', '.join(loose[:5])})" if loose else "nothing"
        raise ImageDataError(
            f"image folder {root} has no class sub-folders (found {found}); expected root/<class>/<image>"
        )
    _check_num_classes(classes, num_classes, f"image folder {root}")
    paths: list[str] = []
    labels: list[int] = []
    ignored: list[str] = []
    for label, name in enumerate(classes):
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                (files if _is_image_name(f) else ignored).append(os.path.join(dirpath, f))
        if not files:
            raise ImageDataError(
                f"class folder {root / name} (class {label}) holds no image files (extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += files
        labels += [label] * len(files)
    if ignored:
        log.warning("%s: ignored %d files without an image extension, e.g. %s", root, len(ignored),
                    ", ".join(ignored[:3]))
    return ImageSamples(tuple(paths), tuple(labels), tuple(classes), str(root))


def read_file_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None,
                   num_classes: int | None = None) -> ImageSamples:
    """Read a ``path label`` file list (one item per line; the label is a class index or a class name).

    Integer labels are used as they are (the class names are then ``"0" .. "K-1"`` with ``K = num_classes`` or
    ``max + 1``); name labels are mapped to indices in sorted order. Paths may contain spaces (the label is the last
    field). Relative paths are taken from ``root`` when given, else from the list file's folder.

    Raises:
        ImageDataError: a missing or empty list, a malformed line (named by line number), an integer label outside
            ``[0, num_classes)``, a listed file that does not exist, or a class count different from ``num_classes``.
    """
    list_file = Path(list_file).expanduser().resolve()
    if not list_file.is_file():
        raise ImageDataError(f"file list {list_file} does not exist (data.file_list)")
    base = Path(root).expanduser().resolve() if root else list_file.parent
    raw: list[tuple[str, str]] = []
    for n, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise ImageDataError(f"{list_file}:{n}: expected 'path label', got {line!r}")
        raw.append((parts[0], parts[1]))
    if not raw:
        raise ImageDataError(f"file list {list_file} lists no images (expected 'path label' lines)")
    if all(lab.lstrip("-").isdigit() for _, lab in raw):
        ints = [int(lab) for _, lab in raw]
        k = num_classes if num_classes is not None else max(ints) + 1
        bad = [(p, v) for p, v in zip((p for p, _ in raw), ints) if not 0 <= v < k]
        if bad:
            raise ImageDataError(f"{list_file}: label {bad[0][1]} of {bad[0][0]} is outside [0, {k}) "
                                 f"(data.num_classes={num_classes}); {len(bad)} such lines")
        classes = [str(i) for i in range(k)]
        found = len(set(ints))
        if num_classes is not None and found < num_classes:
            raise ImageDataError(f"file list {list_file}: found {found} distinct labels but "
                                 f"data.num_classes={num_classes}")
        labels = ints
    else:
        classes = sorted({lab for _, lab in raw})
        _check_num_classes(classes, num_classes, f"file list {list_file}")
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[lab] for _, lab in raw]
    paths = [str(p if (p := Path(rel).expanduser()).is_absolute() else base / p) for rel, _ in raw]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ImageDataError(f"file list {list_file}: {len(missing)} listed files do not exist, e.g. {missing[0]}")
    return ImageSamples(tuple(paths), tuple(labels), tuple(classes), str(list_file))


def find_samples(root: str | None, file_list: str | None, num_classes: int | None) -> ImageSamples:
    """The items named by ``data.file_list`` (paths relative to ``data.root``) or else the tree at ``data.root``."""
    if file_list:
        return read_file_list(file_list, root, num_classes)
    if not root:
        raise ImageDataError("no image data configured: set data.root to an ImageFolder tree or data.file_list to a "
                             "'path label' list")
    return scan_image_folder(root, num_classes)


def save_class_mapping(classes: Sequence[str], folder: str | os.PathLike, source: str = "") -> Path:
    """Write ``folder/class_mapping.json`` (``{"classes": [...], "class_to_idx": {...}, "source": ...}``) atomically."""
    out = Path(folder) / CLASS_MAPPING_FILE
    doc = {"num_classes": len(classes), "classes": list(classes),
           "class_to_idx": {c: i for i, c in enumerate(classes)}, "source": source}
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    return out


def load_class_mapping(folder: str | os.PathLike) -> tuple[str, ...]:
    """The class names saved by :func:`save_class_mapping` (index = label).

    Raises:
        ImageDataError: the file is missing, not JSON, or inconsistent.
    """
    path = Path(folder) / CLASS_MAPPING_FILE
    if not path.is_file():
        raise ImageDataError(f"class mapping {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        classes = doc["classes"]
        ok = isinstance(classes, list) and all(isinstance(c, str) for c in classes)
        ok = ok and doc.get("class_to_idx", {c: i for i, c in enumerate(classes)}) == {
            c: i for i, c in enumerate(classes)}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ImageDataError(f"class mapping {path} is not valid ({type(e).__name__}: {e})") from e
    if not ok:
        raise ImageDataError(f"class mapping {path}: 'classes' must be a list of names matching 'class_to_idx'")
    return tuple(classes)


# ----------------------------------------------------------------------------------------------------------------
# Decoding and the crop
# ----------------------------------------------------------------------------------------------------------------


def center_crop_adm(image: Image.Image, size: int) -> Image.Image:
    """ADM centre crop (docs/method.md §Data): box-halve while the short side >= 2 * size, bicubic resize to a short
    side of ``size``, then the centre ``size x size`` square (offsets rounded down)."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    new_w, new_h = round(image.width * scale), round(image.height * scale)
    image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image, path: str | os.PathLike = "") -> Image.Image:
    """An opened image as 8-bit RGB, scaled correctly whatever its bit depth (docs/method.md § Reliability).

    The one home of this conversion (the loaders, ``reconstruct`` and ``evaluate``'s image folders use it).
    ``Image.convert("RGB")`` clips 16-bit grey pixels (modes ``I;16*``, and ``I`` for a 16-bit PNG) at 255, which
    turns a photograph all white; they are scaled here as ``round(v / 257)`` (65535 -> 255), the rounding DALI's
    decoder uses. 16-bit RGB / RGBA PNGs are already reduced to 8 bits by Pillow (their high byte, within one level
    of ``round(v / 257)``). Pixels without a known range (32-bit integers of other formats, floats) are refused.

    Raises:
        BadImageError: a pixel format that cannot be scaled to 8 bits without guessing (names the file and mode).
    """
    mode = im.mode
    if mode in _SIXTEEN_BIT_GREY or (mode == "I" and im.format == "PNG"):
        v = np.asarray(im).astype(np.float64)  # (H, W) in [0, 65535]
        grey = np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("I", "F") or mode.startswith(("I;", "F;")):
        what = "floating-point" if mode.startswith("F") else "32-bit integer"
        raise BadImageError(path, f"{what} pixels (PIL mode {mode!r}, format {im.format}) have no known 8-bit "
                                  "scale; convert the file to an 8- or 16-bit PNG / JPEG")
    return im.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully into an RGB image (:func:`to_rgb`: 16-bit images scaled, not clipped).

    Raises:
        BadImageError: the file is missing, unreadable, not an image, its data is truncated / corrupt, or its pixels
            have no known 8-bit scale.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im, path)
    except BadImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(path, f"{type(e).__name__}: {e}") from e


def check_image_header(path: str | os.PathLike) -> str | None:
    """Cheap validity check without decoding pixels: None when ``path`` looks decodable, else the reason.

    Reads the header (format and size) with PIL and, for JPEG, checks that the file ends with the end-of-image
    marker ``FF D9`` (a truncated download fails this). Corruption inside the entropy-coded data is not seen.
    """
    try:
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
        if w <= 0 or h <= 0:
            return f"empty image {w}x{h}"
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64))
                tail = f.read().rstrip(b"\x00\r\n ")
            if not tail.endswith(b"\xff\xd9"):
                return "JPEG without end-of-image marker (truncated)"
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"


@dataclass
class BadFileLog:
    """Bad files met so far (``data.on_bad_file: skip``); ``count`` goes into ``stats.jsonl`` as ``data/bad_files``."""

    paths: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.paths)

    def add(self, path: str, reason: str) -> None:
        if path in self.paths:
            return
        self.paths.append(path)
        log.warning("skipping bad image %s (%s); %d bad files so far", path, reason, len(self.paths))


class ImageBatch(NamedTuple):
    """One batch of either loader.

    Attributes:
        images: ``(B, 3, S, S)`` float32 in ``[0, 1]`` on the training device.
        labels: ``(B,)`` int64 class labels on the training device.
        indices: ``(B,)`` int64 positions in the loader's :class:`ImageSamples` (CPU), e.g. to write caches in order.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# The dataset (PIL)
# ----------------------------------------------------------------------------------------------------------------


def flip_bit(seed: int, epoch: int, index: int) -> bool:
    """Whether item ``index`` is flipped in ``epoch``: a hash of ``(seed, epoch, index)``, so the flips do not depend
    on the number of workers or ranks, nor consume any process's RNG."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)
    return bool(state[0] & 1)


class ImageDataset(Dataset):
    """Map-style dataset of ADM-cropped, optionally flipped images.

    Args:
        samples: the items.
        image_size: training resolution ``S``.
        hflip: flip each item horizontally with probability 1/2, decided by :func:`flip_bit` ``(seed, epoch, index)``.
        on_bad_file: ``"error"``: a bad file raises :class:`BadImageError`; ``"skip"``: the item says so (the
            loader's collate drops it and counts it).
        as_uint8: return ``uint8`` pixels in ``[0, 255]`` instead of float in ``[0, 1]`` (the loader converts on the
            device, moving 4x fewer bytes).
        seed: the flip seed.

    An item key is an index or ``(index, epoch)`` (epoch 0 for a plain index). Items are
    ``(image (3, S, S) float32 in [0, 1], label, index)``, or ``(None, path, reason)`` for a bad file under
    ``on_bad_file="skip"``.
    """

    def __init__(self, samples: ImageSamples, image_size: int, hflip: bool = True, on_bad_file: OnBadFile = "error",
                 as_uint8: bool = False, seed: int = 0):
        if image_size <= 0:
            raise ValueError(f"data.image_size must be > 0, got {image_size}")
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"data.on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
        self.samples, self.image_size, self.hflip = samples, image_size, hflip
        self.on_bad_file, self.as_uint8, self.seed = on_bad_file, as_uint8, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int] | tuple[None, str, str]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path = self.samples.paths[index]
        try:
            image = center_crop_adm(load_image(path), self.image_size)
        except BadImageError as e:
            if self.on_bad_file == "error":
                raise
            return None, e.path, e.reason
        if self.hflip and flip_bit(self.seed, epoch, index):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S) uint8
        if not self.as_uint8:
            x = x.float().div_(255.0)
        return x, self.samples.labels[index], index

"""Image sets for evaluation: ADM-format npz batches, reference statistics and image folders.

ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``) exchanges images as an npz whose ``arr_0`` is uint8
``(N, H, W, 3)``; a reference batch may also hold FID statistics ``mu (2048,)``, ``sigma (2048, 2048)`` and the sFID
ones ``mu_s``, ``sigma_s``. We read and write that format, plus image folders (png/jpg/webp/bmp, recursive).
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pae_fast.io import atomic_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "load_npz_images",
    "save_npz_images",
    "load_npz_arrays",
    "npz_keys",
    "save_reference_stats",
    "to_uint8_hwc",
    "list_image_files",
    "load_image_folder",
    "ImageSource",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "mu_dino", "sigma_dino")


def _check_images(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{where}: expected uint8 images (N, H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{where}: expected dtype uint8 (ADM format), got {arr.dtype}")
    return arr


def load_npz_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an npz file (``arr_0`` images and/or reference statistics)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"npz file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ValueError(f"{p} is not a readable npz file: {e}") from e


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Array names in an npz file, without reading any array."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"npz file {p} does not exist")
    try:
        with zipfile.ZipFile(p) as zf:
            return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile as e:
        raise ValueError(f"{p} is not a readable npz file: {e}") from e


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _npz_member_header(path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran-order flag and dtype of one npz member from its .npy header."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran, dtype = _read_npy_header(f)
    return tuple(shape), bool(fortran), dtype


def _c_contiguous(arr: np.ndarray, where: str) -> np.ndarray:
    """``arr`` itself when C-contiguous, else one C-ordered copy (logged: it costs a full pass and its memory)."""
    if arr.flags.c_contiguous:
        return arr
    order = "Fortran-ordered" if arr.flags.f_contiguous else "non-contiguous"
    log.info("%s is %s: copying it once to C order (%.1f MB)", where, order, arr.nbytes / 2**20)
    return np.ascontiguousarray(arr)


def load_npz_images(path: str | os.PathLike, key: str = "arr_0") -> np.ndarray:
    """ADM-format images: uint8 ``(N, H, W, 3)`` from ``key`` of an npz."""
    arrays = load_npz_arrays(path)
    if key not in arrays:
        raise KeyError(f"{path} has no array {key!r} (arrays: {', '.join(arrays) or 'none'}); ADM batches use 'arr_0'")
    return _check_images(arrays[key], f"{path}[{key}]")


def save_npz_images(path: str | os.PathLike, images: np.ndarray | torch.Tensor, **extra: np.ndarray) -> Path:
    """Write an ADM-format npz atomically.

    Args:
        path: target ``.npz``.
        images: uint8 ``(N, H, W, 3)`` (or a float tensor ``(N, 3, H, W)`` in [0, 1], converted).
        **extra: more arrays (e.g. reference statistics ``mu``, ``sigma``).
    """
    if isinstance(images, torch.Tensor):
        images = to_uint8_hwc(images)
    arr = _check_images(np.asarray(images), str(path))
    p = Path(path)
    with atomic_path(p) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, arr_0=arr, **extra)
    return p


def save_reference_stats(
    path: str | os.PathLike, stats: dict[str, np.ndarray], images: np.ndarray | None = None
) -> Path:
    """Write reference statistics (``mu``, ``sigma``, ``mu_s``, ``sigma_s``, ...) as an ADM-style npz, atomically."""
    unknown = set(stats) - set(STAT_KEYS)
    if unknown:
        raise KeyError(f"unknown reference statistics {sorted(unknown)}; expected some of {STAT_KEYS}")
    p = Path(path)
    arrays = {k: np.asarray(v) for k, v in stats.items()}
    if images is not None:
        arrays["arr_0"] = _check_images(np.asarray(images), str(path))
    with atomic_path(p) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return p


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` float in [0, 1] (or uint8) -> uint8 ``(N, H, W, 3)`` (round to nearest)."""
    if images.dtype != torch.uint8:
        images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files below ``folder`` (recursive, sorted)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    from pae_fast.data.images import to_rgb

    try:
        with Image.open(path) as im:
            return np.asarray(to_rgb(im, path), dtype=np.uint8)  # 16-bit files scaled, not clipped
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def load_image_folder(folder: str | os.PathLike) -> np.ndarray:
    """All images of a folder as uint8 ``(N, H, W, 3)`` (they must share one size)."""
    files = list_image_files(folder)
    first = _read_image(files[0])
    out = np.empty((len(files), *first.shape), dtype=np.uint8)
    out[0] = first
    for i, f in enumerate(files[1:], 1):
        img = _read_image(f)
        if img.shape != first.shape:
            raise ValueError(f"{f} has size {img.shape[:2]}, but {files[0]} has {first.shape[:2]}; resize them first")
        out[i] = img
    return out


class ImageSource:
    """Images to evaluate: an ADM npz, a folder, or an in-memory array, read in uint8 NCHW batches.

    Args:
        source: path to an ``.npz`` (``arr_0``) or an image folder; or uint8 ``(N, H, W, 3)`` numpy; or a tensor
            ``(N, 3, H, W)`` (uint8, or float in [0, 1]).
        name: used in messages.

    Folders are read lazily, so images of different sizes are allowed (each batch holds one size); an npz's
    ``arr_0`` is streamed batch by batch from the archive (50k ImageNet-256 samples are 9.8 GB).
    """

    def __init__(self, source: str | os.PathLike | np.ndarray | torch.Tensor, name: str = "images") -> None:
        self.name = name
        self.stats: dict[str, np.ndarray] = {}
        self._array: np.ndarray | torch.Tensor | None = None
        self._files: list[Path] | None = None
        self._npz: Path | None = None
        self._npz_shape: tuple[int, ...] = ()
        if isinstance(source, torch.Tensor):
            if source.dim() != 4 or source.shape[1] != 3:
                raise ValueError(f"{name}: expected a (N, 3, H, W) tensor, got shape {tuple(source.shape)}")
            self._array = source
        elif isinstance(source, np.ndarray):
            self._array = _c_contiguous(_check_images(source, name), name)
        else:
            p = Path(source)
            self.name = str(p)
            if p.is_dir():
                self._files = list_image_files(p)
            elif p.suffix == ".npz" or p.is_file():
                keys = npz_keys(p)
                with np.load(p, allow_pickle=False) as f:  # NpzFile reads only the arrays asked for
                    self.stats = {k: f[k] for k in STAT_KEYS if k in keys}
                if "arr_0" in keys:
                    shape, fortran, dtype = _npz_member_header(p, "arr_0")
                    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
                        raise ValueError(f"{p}[arr_0]: expected uint8 images (N, H, W, 3), got {dtype} {shape}")
                    if fortran:  # not streamable in C order: read it whole (as ADM does) and copy once
                        with np.load(p, allow_pickle=False) as f:
                            self._array = _c_contiguous(f["arr_0"], f"{p}[arr_0]")
                    else:
                        self._npz, self._npz_shape = p, shape
                elif not self.stats:
                    raise ValueError(f"{p} holds neither images (arr_0) nor statistics (mu, sigma); keys: {keys}")
            else:
                raise FileNotFoundError(f"{name}: {p} is neither an image folder nor an npz file")

    @property
    def has_images(self) -> bool:
        return self._array is not None or self._files is not None or self._npz is not None

    def __len__(self) -> int:
        if self._files is not None:
            return len(self._files)
        if self._npz is not None:
            return self._npz_shape[0]
        return 0 if self._array is None else len(self._array)

    def read_all(self) -> np.ndarray:
        """All images as one uint8 ``(N, H, W, 3)`` array (they must share one size)."""
        parts = [to_uint8_hwc(b) for b in self.batches(256)]
        if not parts:
            raise ValueError(f"{self.name} holds no images")
        if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise ValueError(f"{self.name}: images of different sizes cannot form one arr_0; resize them first")
        return np.concatenate(parts)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield ``(B, 3, H, W)`` tensors (uint8, or the float tensor given)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self._files is not None:
            buf: list[np.ndarray] = []
            for f in self._files:
                img = _read_image(f)
                if buf and (img.shape != buf[0].shape or len(buf) == batch_size):
                    yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2)
                    buf = []
                buf.append(img)
            if buf:
                yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2)
        elif self._npz is not None:
            n, item = self._npz_shape[0], int(np.prod(self._npz_shape[1:]))
            with zipfile.ZipFile(self._npz) as zf, zf.open("arr_0.npy") as f:
                _read_npy_header(f)
                for i in range(0, n, batch_size):
                    b = min(batch_size, n - i)
                    raw = f.read(b * item)
                    if len(raw) != b * item:
                        raise ValueError(f"{self._npz}[arr_0] is truncated: images {i}..{i + b} are missing")
                    arr = np.frombuffer(raw, dtype=np.uint8).reshape(b, *self._npz_shape[1:])
                    yield torch.from_numpy(arr.copy()).permute(0, 3, 1, 2)
        elif isinstance(self._array, torch.Tensor):
            yield from self._array.split(batch_size)
        elif self._array is not None:
            for i in range(0, len(self._array), batch_size):
                yield torch.from_numpy(np.ascontiguousarray(self._array[i : i + batch_size])).permute(0, 3, 1, 2)

"""The DALI image loader: file reader sharded per rank, GPU ("mixed") or CPU decoding, ADM-style crop, random flip.

Same semantics as :class:`pae_fast.data.pil_loader.PILImageLoader`, with these documented differences
(docs/method.md §Data):

* Resize: one antialiased bicubic resize of the crop window (:func:`_adm_roi`) replaces ADM's box halvings followed
  by a bicubic resize (DALI has no box filter); the resize scale and the crop offsets are ADM's exactly. The
  measured difference to the PIL path is in the docs.
* Shuffle: the reader's ``shuffle_after_epoch`` (a global seeded shuffle, same on every rank, shards disjoint), not
  the DistributedSampler's permutation; flips come from DALI's ``coin_flip`` seeded per rank. Without
  ``drop_last`` uneven shards stay uneven (DistributedSampler repeats items to even them); with it both loaders
  give every rank the same number of full batches.
* Bad files: DALI stops its pipeline at the first undecodable file and cannot skip it. The file list is therefore
  validated up front with a cheap header check (:func:`pae_fast.data.images.check_image_header`); under
  ``on_bad_file: skip`` the files it rejects are dropped and counted. A file that passes the check but fails to
  decode later is named from DALI's message; under ``skip`` it is dropped, the pipeline is rebuilt and the epoch
  restarts, else :class:`BadImageError` is raised. libjpeg-turbo decodes some damaged JPEGs (with warnings) that PIL
  refuses, so DALI may train on a damaged image that the PIL path would skip.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from pae_fast.data.images import (
    BadFileLog,
    BadImageError,
    ImageBatch,
    ImageDataError,
    ImageSamples,
    OnBadFile,
    check_image_header,
    load_image,
)

__all__ = ["dali_available", "validate_samples", "DALIImageLoader"]

log = logging.getLogger("pae_fast.train.data")


def dali_available() -> tuple[bool, str]:
    """``(True, version)`` when ``nvidia.dali`` and its PyTorch plugin import, else ``(False, why)``."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising at import
        return False, f"{type(e).__name__}: {e} (install the 'dali' extra: pip install nvidia-dali-cuda130)"
    return True, dali.__version__


def validate_samples(samples: ImageSamples, on_bad_file: OnBadFile, bad_files: BadFileLog, threads: int = 1,
                     rank: int = 0, world_size: int = 1) -> ImageSamples:
    """Header-check every file (:func:`check_image_header`); return the items that pass.

    Under an initialised ``torch.distributed`` group each rank checks ``1 / world_size`` of the files and the
    results are gathered, so every rank ends with the same list.

    Raises:
        BadImageError: ``on_bad_file == "error"`` and a file fails (the first one is named, with the count).
    """
    import torch.distributed as dist

    gather = world_size > 1 and dist.is_available() and dist.is_initialized()
    mine = range(rank, len(samples), world_size) if gather else range(len(samples))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        found = [(i, r) for i, r in zip(mine, pool.map(lambda i: check_image_header(samples.paths[i]), mine)) if r]
    if gather:
        parts: list = [None] * world_size
        dist.all_gather_object(parts, found)
        found = sorted(x for part in parts for x in part)
    if not found:
        return samples
    if on_bad_file == "error":
        i, reason = found[0]
        more = f"; {len(found) - 1} more bad files" if len(found) > 1 else ""
        raise BadImageError(samples.paths[i], reason + more)
    for i, reason in found:
        bad_files.add(samples.paths[i], reason)
    bad = {i for i, _ in found}
    return samples.subset([i for i in range(len(samples)) if i not in bad])


def _flip_seed(seed: int, rank: int) -> int:
    digest = hashlib.sha256(f"dali-flip:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _adm_roi(shape, size: int):
    """ADM's crop window in source pixels, as DALI expressions (docs/method.md §Data).

    With ``m`` the short side, ADM halves ``k = max(0, floor(log2(m / S)))`` times (each halving floors the sides),
    resizes to ``(H', W')`` with short side ``S`` and the long side rounded, and cuts ``S x S`` at
    ``floor((H' - S) / 2), floor((W' - S) / 2)``. Resizing only the source window that maps onto that square, with
    the scale ``W / W'`` of the full resize, samples exactly the pixels that resize-then-crop would, at a fraction of
    the work. Returns ``(roi_start, roi_end)``, each ``(y, x)``.

    Args:
        shape: ``(H, W, C)`` float DataNode from ``peek_image_shape``.
    """
    from nvidia.dali import fn
    from nvidia.dali import math as dmath

    h, w = shape[0], shape[1]
    k = dmath.max(dmath.floor(dmath.log2(dmath.min(h, w) / size)), 0.0)
    scale = dmath.pow(2.0, k)
    h_k, w_k = dmath.floor(h / scale), dmath.floor(w / scale)
    short = dmath.min(h_k, w_k)
    new_h, new_w = dmath.floor(h_k * size / short + 0.5), dmath.floor(w_k * size / short + 0.5)
    top, left = dmath.floor((new_h - size) / 2), dmath.floor((new_w - size) / 2)
    sy, sx = h / new_h, w / new_w
    start = fn.stack(top * sy, left * sx)
    end = fn.stack((top + size) * sy, (left + size) * sx)
    return start, end


class DALIImageLoader:
    """Image batches from a DALI pipeline.

    Args:
        samples: the items (all ranks pass the same list).
        image_size: training resolution ``S``.
        batch_size: images per batch on this rank.
        rank, world_size: the reader's ``shard_id`` / ``num_shards``.
        device: a CUDA device decodes with ``"mixed"`` (nvJPEG) and runs the crop on that GPU; otherwise a CPU-only
            pipeline (``device_id=None``).
        threads: DALI CPU worker threads (``data.dali_threads``).
        prefetch: pipeline prefetch queue depth (``data.prefetch``).
        hflip, shuffle, drop_last, seed, on_bad_file: as :class:`~pae_fast.data.pil_loader.PILImageLoader`.

    Iterating yields :class:`ImageBatch` es; each ``iter()`` is one epoch of this rank's shard.

    Raises:
        ImageDataError: DALI is not importable (the message says why).
        BadImageError: a bad file under ``on_bad_file="error"``.
    """

    kind = "dali"

    def __init__(self, samples: ImageSamples, *, image_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", threads: int = 2, prefetch: int = 2, hflip: bool = True,
                 shuffle: bool = True, drop_last: bool = True, seed: int = 0, on_bad_file: OnBadFile = "error"):
        ok, why = dali_available()
        if not ok:
            raise ImageDataError(f"data.loader=dali but DALI is not usable: {why}")
        for name, v, low in (("data.batch_size", batch_size, 1), ("data.dali_threads", threads, 1),
                             ("data.prefetch", prefetch, 1), ("data.image_size", image_size, 1)):
            if v < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"data.on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.image_size, self.batch_size, self.rank, self.world_size = image_size, batch_size, rank, world_size
        self.threads, self.prefetch, self.hflip, self.shuffle = threads, prefetch, hflip, shuffle
        self.drop_last, self.seed, self.on_bad_file = drop_last, seed, on_bad_file
        self.bad_files = BadFileLog()
        self.epoch = 0
        # The sample list the loader was given; ``indices`` of batches refer to it even after files are dropped.
        self.samples = samples
        kept = validate_samples(samples, on_bad_file, self.bad_files, threads, rank, world_size)
        if len(kept) == 0:
            raise ImageDataError(f"{samples.source}: no decodable image among {len(samples)} files")
        position = {p: i for i, p in enumerate(samples.paths)}
        self._files = list(kept.paths)
        self._index = [position[p] for p in kept.paths]
        self._labels = torch.tensor(samples.labels, dtype=torch.int64)
        self._build()

    @property
    def decoder_device(self) -> str:
        return "mixed" if self.device.type == "cuda" else "cpu"

    def _pipeline(self):
        from nvidia.dali import fn, pipeline_def, types

        size = self.image_size

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=self.device.index if self.device.type == "cuda" else None,
                      prefetch_queue_depth=self.prefetch, seed=_flip_seed(self.seed, self.rank))
        def pipe():
            # The "label" the reader carries is the item's position in ``samples``; class labels are looked up.
            encoded, index = fn.readers.file(
                files=self._files, labels=self._index, shard_id=self.rank, num_shards=self.world_size,
                shuffle_after_epoch=self.shuffle, seed=self.seed & 0x7FFFFFFF, pad_last_batch=True,
                prefetch_queue_depth=self.prefetch, name="Reader",
            )
            # EXIF orientation is not applied, as in ADM's PIL path.
            images = fn.decoders.image(encoded, device=self.decoder_device, output_type=types.RGB,
                                       adjust_orientation=False)  # (H, W, 3) uint8
            roi_start, roi_end = _adm_roi(fn.peek_image_shape(encoded, adjust_orientation=False, dtype=types.FLOAT),
                                          size)
            images = fn.resize(images, size=(size, size), roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                               interp_type=types.INTERP_CUBIC, antialias=True)  # (S, S, 3)
            mirror = fn.random.coin_flip(probability=0.5) if self.hflip else 0
            images = fn.crop_mirror_normalize(  # (3, S, S) float in [0, 1]
                images, mirror=mirror, dtype=types.FLOAT, output_layout="CHW", mean=[0.0], std=[255.0],
            )
            return images, index

        return pipe()

    def _build(self) -> None:
        """(Re)build the pipeline and its iterator; a decode failure while prefetching is handled like one later."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        while True:
            self._mid_epoch = False
            self._reader_epochs = 0  # epochs the reader has finished since this build
            try:
                self._pipe = self._pipeline()
                self._pipe.build()
                self._iter = DALIGenericIterator([self._pipe], ["images", "index"], reader_name="Reader",
                                                 last_batch_policy=policy, auto_reset=False)
                return
            except RuntimeError as e:
                self._drop_failed_file(e)

    def __len__(self) -> int:
        # The reader's shard i holds files [n i / W, n (i + 1) / W) (floored). DROP gives every rank the batches of
        # the smallest shard (equal counts, as DDP needs); PARTIAL gives each rank the batches of the shard it
        # reads in the coming epoch (``len`` between epochs; empty padded batches are not yielded).
        n, w = len(self._files), self.world_size
        sizes = [n * (i + 1) // w - n * i // w for i in range(w)]
        if self.drop_last:
            return min(sizes) // self.batch_size
        # Unshuffled, the reader moves to the next shard every epoch; shuffled, each rank keeps its slice.
        shard = self.rank if self.shuffle else (self.rank + self._reader_epochs) % w
        return -(-sizes[shard] // self.batch_size)

    def _bad_path(self, message: str) -> tuple[str, str] | None:
        """The file behind a DALI failure and why: the one DALI's message names, else the first of this loader's
        files that PIL cannot decode fully (a scan of every file, with ``threads`` threads), else None."""
        ours = set(self._files)
        for m in re.finditer(r"(/[^\s'\"]+)", message):
            if m.group(1) in ours:
                return m.group(1), "named by DALI's error"
        log.warning("the DALI pipeline failed without naming a file; decoding all %d files with PIL to find it",
                    len(self._files))

        def reason(path: str) -> str | None:
            try:
                load_image(path)
            except BadImageError as e:
                return e.reason
            return None

        with ThreadPoolExecutor(self.threads) as pool:
            for path, why in zip(self._files, pool.map(reason, self._files)):
                if why is not None:
                    return path, why
        return None

    def __iter__(self) -> Iterator[ImageBatch]:
        if self._mid_epoch:  # the last epoch was abandoned: finish it so that every iter() starts an epoch
            for _ in self._iter:
                pass
            self._iter.reset()
            self._reader_epochs += 1
        self.epoch += 1
        while True:
            try:
                self._mid_epoch = True
                for out in self._iter:
                    images = out[0]["images"]  # (B, 3, S, S) float32, on the pipeline's device
                    if images.shape[0] == 0:  # a padded batch of a smaller shard, trimmed to nothing
                        continue
                    index = out[0]["index"].reshape(-1).to("cpu", torch.int64)  # (B,)
                    labels = self._labels[index]
                    yield ImageBatch(images.to(self.device, non_blocking=True),
                                     labels.to(self.device, non_blocking=True), index)
                self._iter.reset()
                self._reader_epochs += 1
                self._mid_epoch = False
                return
            except RuntimeError as e:
                self._drop_failed_file(e)
                self._build()

    def _drop_failed_file(self, e: RuntimeError) -> None:
        """After a pipeline failure: raise :class:`BadImageError` naming the file (``on_bad_file="error"``), or
        drop the file from the reader's list and count it (``"skip"``; the caller rebuilds the pipeline)."""
        if "decoders.image" not in str(e):  # not a decoding failure: nothing to blame on a file
            raise ImageDataError(f"the DALI pipeline failed: {e}") from e
        found = self._bad_path(str(e))
        if found is None:
            raise ImageDataError(f"the DALI pipeline failed and no file could be blamed (all decode with PIL): {e}") \
                from e
        path, why = found
        detail = str(e).strip().splitlines()
        if self.on_bad_file == "error":
            raise BadImageError(path, f"DALI could not decode it ({why}): {detail[-1] if detail else e}") from e
        self.bad_files.add(path, f"DALI decode failure after passing the header check ({why})")
        k = self._files.index(path)
        del self._files[k], self._index[k]
        if not self._files:
            raise ImageDataError(f"{self.samples.source}: no decodable image left") from e
        log.warning("rebuilding the DALI pipeline without %s; this epoch restarts", path)

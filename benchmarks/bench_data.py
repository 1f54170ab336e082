"""Image loader throughput: decode + ADM crop + flip, DALI against the PIL DataLoader on the same files.

Both loaders run with the same number of CPU threads (DALI ``threads`` = PIL ``num_workers``), the same batch size,
resolution, shuffling and flips; each is timed over whole epochs after one untimed warm-up epoch (workers started,
files in the page cache), the timed epochs interleaved. With CUDA the DALI ``mixed`` (nvJPEG) decoder is timed
as well. Without ``--root`` the script writes ImageNet-like JPEGs (random crops of scikit-image photographs
resized to about 500x375, quality 90)::

    python benchmarks/bench_data.py                          # 256 generated JPEGs, 2 threads, 256 px
    python benchmarks/bench_data.py --root /data/imagenet/train --limit 4096 --threads 8 --batch 64

Result: ``benchmarks/results/data_<cpu|cuda>.json`` (images/s of each loader and the DALI / PIL ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import RESULTS_DIR, environment  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def write_jpegs(folder: Path, count: int, classes: int = 4, seed: int = 0) -> None:
    """``count`` JPEGs in ``classes`` class folders, ImageNet-like sizes (short side 300-500, aspect 4:3 +-)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [np.ascontiguousarray(getattr(skimage.data, n)()[..., :3]) for n in PHOTOS]
    for i in range(count):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        ch, cw = int(rng.integers(h // 2, h)), int(rng.integers(w // 2, w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        short = int(rng.integers(300, 500))
        aspect = float(rng.uniform(1.2, 1.5))
        size = (round(short * aspect), short) if rng.random() < 0.8 else (short, round(short * aspect))
        out = folder / f"c{i % classes}" / f"{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[y:y + ch, x:x + cw]).resize(size, Image.Resampling.BICUBIC).save(out, quality=90)


def _epoch(loader) -> tuple[int, float]:
    """Images and seconds of one epoch of ``loader``."""
    import torch

    t0, n, cuda = time.perf_counter(), 0, False
    for batch in loader:
        n += batch.images.shape[0]
        cuda = batch.images.is_cuda
    if cuda:
        torch.cuda.synchronize()
    return n, time.perf_counter() - t0


def time_loaders(loaders: dict[str, Any], rounds: int) -> dict[str, Any]:
    """One untimed warm-up epoch each, then ``rounds`` rounds of one timed epoch per loader, interleaved so that a
    change in the machine's load hits every loader alike. images/s: the median over rounds."""
    for loader in loaders.values():
        _epoch(loader)
    runs: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(rounds):
        for k, loader in loaders.items():
            n, dt = _epoch(loader)
            runs[k].append(n / dt)
    return {k: {"images_per_s": statistics.median(v), "rounds": v} for k, v in runs.items()}


def run(root: str | None, count: int, limit: int | None, threads: int, batch: int, size: int, epochs: int,
        json_out: str | None) -> dict[str, Any]:
    import torch

    from pae_fast.data.dali_loader import DALIImageLoader, dali_available
    from pae_fast.data.images import scan_image_folder
    from pae_fast.data.pil_loader import PILImageLoader

    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        root = tmp.name
        write_jpegs(Path(root), count)
    samples = scan_image_folder(root)
    if limit is not None and limit < len(samples):
        samples = samples.subset(range(limit))
    torch.set_num_threads(1)  # the main process only moves batches; the decoders get the threads
    common = {"image_size": size, "batch_size": batch, "hflip": True, "shuffle": True, "drop_last": True,
              "prefetch": 2}
    rec: dict[str, Any] = {"benchmark": "bench_data", "env": environment(), "files": len(samples), "threads": threads,
                           "batch": batch, "image_size": size, "epochs": epochs,
                           "generated": tmp is not None, "results": {}}
    loaders: dict[str, Any] = {"pil": PILImageLoader(samples, num_workers=threads, **common)}
    ok, why = dali_available()
    if ok:
        loaders["dali_cpu"] = DALIImageLoader(samples, threads=threads, **common)
        if torch.cuda.is_available():
            loaders["dali_mixed"] = DALIImageLoader(samples, threads=threads, device="cuda", **common)
    else:
        rec["dali_unavailable"] = why
    rec["results"] = time_loaders(loaders, epochs)
    rec["env"]["machine"]["loadavg_1m_after"] = os.getloadavg()[0]
    base = rec["results"]["pil"]["images_per_s"]
    rec["ratio_vs_pil"] = {k: v["images_per_s"] / base for k, v in rec["results"].items() if k != "pil"}
    if tmp is not None:
        tmp.cleanup()
    out = Path(json_out) if json_out else RESULTS_DIR / f"data_{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    rec["json"] = str(out)
    return rec


def format_record(rec: dict[str, Any]) -> str:
    lines = [f"{rec['files']} files, {rec['image_size']} px, batch {rec['batch']}, {rec['threads']} threads/workers, "
             f"load {rec['env']['machine']['loadavg_1m']:.1f} -> {rec['env']['machine']['loadavg_1m_after']:.1f}"]
    for k, v in rec["results"].items():
        ratio = rec.get("ratio_vs_pil", {}).get(k)
        each = ", ".join(f"{r:.1f}" for r in v["rounds"])
        lines.append(f"  {k:11s} {v['images_per_s']:8.1f} images/s (median of {each})"
                     + (f"  {ratio:.2f}x PIL" if ratio else ""))
    if "dali_unavailable" in rec:
        lines.append(f"  DALI unavailable: {rec['dali_unavailable']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="an ImageFolder tree (default: generate JPEGs in a temp folder)")
    p.add_argument("--count", type=int, default=256, help="JPEGs to generate without --root")
    p.add_argument("--limit", type=int, default=None, help="use only the first N files of --root")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="DALI threads = PIL workers")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=256, help="training resolution")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader, interleaved (after a warm-up)")
    p.add_argument("--json", dest="json_out", default=None, help="result file (default results/data_<device>.json)")
    a = p.parse_args(argv)
    rec = run(a.root, a.count, a.limit, a.threads, a.batch, a.size, a.epochs, a.json_out)
    print(format_record(rec))
    print(f"wrote {rec['json']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quick look at a tokenizer: encode + decode a few image files, save input | reconstruction pairs, PSNR / SSIM.

Images are centre-cropped to a square and resized (bicubic) to the tokenizer's ``image_size``; the reconstruction is
``to_image_range(decode(encode(x)))``. Outputs in ``out_dir``: ``<stem>_recon.png`` per image (input left,
reconstruction right; :func:`output_names` keeps inputs of the same name apart),
``grid.png`` (all pairs stacked), ``metrics.json`` (per image and mean PSNR / SSIM, computed
by :mod:`pae_fast.eval.recon` on the [0, 1] tensors).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pae_fast.errors import DataError, OutputError
from pae_fast.eval.recon import psnr, ssim
from pae_fast.io import atomic_path, atomic_write_text, check_output_dir

__all__ = ["load_square_image", "output_names", "reconstruct_files"]

log = logging.getLogger(__name__)


def load_square_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image file -> ``(3, size, size)`` float in [0, 1] (centre square crop, bicubic resize)."""
    from PIL import Image

    from pae_fast.data.images import to_rgb

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {p} does not exist")
    try:
        with Image.open(p) as im:
            im = to_rgb(im, p)  # 16-bit files scaled, not clipped (BadImageError: a format with no 8-bit scale)
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {p}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def output_names(files: Sequence[str | os.PathLike]) -> list[str]:
    """The ``*_recon.png`` name of each input, unique and deterministic: ``<stem>_recon.png`` when the stem is
    unique among the inputs, else the path relative to the inputs' common folder with ``/`` and ``.`` written as
    ``__`` and ``_`` (``a/1.png``, ``b/1.png`` -> ``a__1_png_recon.png``, ``b__1_png_recon.png``).

    Raises:
        ConfigError: the same file is given twice.
    """
    from collections import Counter

    from pae_fast.errors import ConfigError

    paths = [Path(os.path.abspath(f)) for f in files]
    twice = [str(p) for p, n in Counter(paths).items() if n > 1]
    if twice:
        raise ConfigError(f"reconstruct: {twice[0]} is given more than once")
    stems = Counter(p.stem for p in paths)
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    out = []
    for p in paths:
        if stems[p.stem] == 1:
            out.append(f"{p.stem}_recon.png")
        else:
            rel = p.relative_to(root)
            out.append("__".join(rel.parent.parts + (rel.name.replace(".", "_"),)) + "_recon.png")
    return out


def _save_png(images: torch.Tensor, path: Path) -> Path:
    """``(3, H, W)`` in [0, 1] -> an 8-bit PNG written atomically."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


@torch.no_grad()
def reconstruct_files(
    tokenizer: torch.nn.Module,
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    check_stop: Callable[[], None] | None = None,
) -> dict:
    """Reconstruct image files with ``tokenizer`` and write pairs, a grid and ``metrics.json``.

    Args:
        tokenizer: a pae_fast tokenizer (``encode`` / ``decode`` / ``image_size``).
        files: image paths (png / jpg / ...).
        out_dir: created if missing.
        batch_size: images per forward.
        device: where the tokenizer runs.
        overwrite: replace outputs already in ``out_dir``; False refuses them (:class:`OutputError`) before anything
            is written.
        check_stop: called before each batch; it raises to stop (the command's SIGTERM / SIGINT check). The pairs
            of the finished batches stay (each written atomically); ``grid.png`` and ``metrics.json`` are not written.

    Returns:
        The metrics dict written to ``metrics.json``: ``{"images": [{"file", "psnr", "ssim"}...], "mean_psnr",
        "mean_ssim", "tokenizer", "latent_shape"}``.
    """
    from pae_fast.models.tokenizer import to_image_range

    if not files:
        raise ValueError("reconstruct: no image files given")
    out = check_output_dir(out_dir)
    names = output_names(files)
    existing = [n for n in (*names, "grid.png", "metrics.json") if (out / n).exists()]
    if existing and not overwrite:
        raise OutputError(f"--out {str(out)!r} already holds {existing[0]}"
                          f"{f' (and {len(existing) - 1} more outputs)' if len(existing) > 1 else ''}; pass "
                          "--overwrite to replace them, or choose another folder")
    for f in files:  # every input exists before anything is written
        if not Path(f).is_file():
            raise FileNotFoundError(f"image {f} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer.to(device).eval()
    S = tokenizer.image_size
    rows: list[dict] = []
    pairs: list[torch.Tensor] = []
    for start in range(0, len(files), batch_size):
        if check_stop is not None:
            check_stop()
        chunk = [Path(f) for f in files[start : start + batch_size]]
        x = torch.stack([load_square_image(f, S) for f in chunk]).to(device)  # (B, 3, S, S)
        y = to_image_range(tokenizer.decode(tokenizer.encode(x))).float()
        p, s = psnr(y, x), ssim(y, x)
        for i, f in enumerate(chunk):
            pair = torch.cat([x[i], y[i]], dim=2).cpu()  # (3, S, 2S): input | reconstruction
            pairs.append(pair)
            _save_png(pair, out / names[start + i])
            rows.append({"file": str(f), "output": names[start + i], "psnr": float(p[i]), "ssim": float(s[i])})
            log.info("%s  PSNR %.2f dB  SSIM %.4f", f.name, p[i], s[i])
    _save_png(torch.cat(pairs, dim=1), out / "grid.png")
    metrics = {
        "tokenizer": getattr(tokenizer, "variant", type(tokenizer).__name__),
        "latent_shape": list(tokenizer.latent_shape),
        "images": rows,
        "mean_psnr": float(np.mean([r["psnr"] for r in rows])),
        "mean_ssim": float(np.mean([r["ssim"] for r in rows])),
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics

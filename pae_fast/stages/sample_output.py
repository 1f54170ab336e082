"""What ``sample`` writes: the decoder it loads (:func:`load_decoder`) and the outputs (:func:`write_samples`:
decoded images as a PNG grid, per-image PNGs and an ADM npz, or the latents and a latent-channel preview)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pae_fast.config import Config, ConfigError, dump_yaml, save_resolved
from pae_fast.io import save_safetensors
from pae_fast.io_images import latent_preview, save_image_grid, save_png

__all__ = ["load_decoder", "write_samples", "decode_and_save"]

log = logging.getLogger("pae_fast.sample")


def write_samples(
    cfg: Config, z: Tensor, labels: Tensor, tokenizer: nn.Module | None, weights_file: Path,
    shape: tuple[int, ...], out_dir: Path, device: torch.device, check_stop: Callable[[], None] | None = None,
) -> list[Path]:
    """Write the resolved config and the samples into ``out_dir``: decoded images (:func:`decode_and_save`) with a
    ``tokenizer``, else ``latents.safetensors`` and ``latent_grid.png``. Returns what was written."""
    sc = cfg.sample
    written = [save_resolved(cfg, out_dir)]
    if tokenizer is None:
        save_safetensors({"latents": z, "labels": labels}, out_dir / "latents.safetensors",
                         metadata={"generator": str(weights_file), "config": dump_yaml(cfg)})
        written.append(out_dir / "latents.safetensors")
        if sc.save_png:
            preview = latent_preview(z[: min(sc.grid_max, 16)])
            nrow = min(shape[0], 8)  # one row per sample, one column per channel
            written.append(save_image_grid(preview, out_dir / "latent_grid.png", nrow=nrow))
        return written
    written += decode_and_save(tokenizer, z, labels, sc, out_dir, device, cfg.data.image_size, check_stop)
    return written


def load_decoder(cfg: Config, device: torch.device, weights_file: Path) -> nn.Module:
    """The decoder: ``tokenizer.name`` filled from ``weights_file``. A pae_fast tokenizer reads any layout
    ``create_tokenizer`` reads (ours, the PAE authors', RAE's released decoder ``.pt`` with the encoder from
    ``tokenizer.vfm_weights``); another registered decoder module loads its own state dict."""
    from pae_fast.models.tokenizer import Tokenizer, load_tokenizer_weights
    from pae_fast.registry import create_tokenizer
    from pae_fast.weights import load_weights

    try:
        tok = create_tokenizer(cfg.tokenizer.name)
    except KeyError as e:
        raise ConfigError(f"tokenizer.name={cfg.tokenizer.name!r} cannot decode sample.tokenizer_checkpoint="
                          f"{cfg.sample.tokenizer_checkpoint!r}: {e.args[0]}") from e
    if not callable(getattr(tok, "decode", None)):
        raise ConfigError(f"tokenizer {cfg.tokenizer.name!r} has no decode(latents) method")
    if isinstance(tok, Tokenizer):
        load_tokenizer_weights(tok, False, weights_file, cfg.tokenizer.vfm_weights)
    else:
        load_weights(tok, weights_file, key="sample.tokenizer_checkpoint")
    return tok.to(device).eval()


@torch.no_grad()
def decode_and_save(
    tok: nn.Module, z: Tensor, labels: Tensor, sc: Any, out_dir: Path, device: torch.device, image_size: int,
    check_stop: Callable[[], None] | None = None,
) -> list[Path]:
    """Decode in batches into one preallocated uint8 ``(N, H, W, 3)`` array (50k ImageNet samples: 9.8 GB).

    ``image_size`` is the run's ``data.image_size``: decoded images of another size are written as they are, with a
    warning (the reference statistics of an FID evaluation are computed at that size)."""
    from pae_fast.eval.images import save_npz_images, to_uint8_hwc
    from pae_fast.progress import progress

    arr = None
    img_dir = out_dir / "images"
    for s in progress(range(0, z.shape[0], sc.batch_size), "decoding", unit="batch"):
        if check_stop is not None:
            check_stop()
        x = tok.decode(z[s : s + sc.batch_size].to(device))  # (B, 3, H, W) in [0, 1]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"tokenizer.decode returned shape {tuple(x.shape)}; expected images (B, 3, H, W)")
        u8 = to_uint8_hwc(x.float().clamp(0, 1).cpu())
        if arr is None:
            import numpy as np

            if u8.shape[1:3] != (image_size, image_size):
                log.warning("the tokenizer decodes %dx%d images but data.image_size is %d", u8.shape[1], u8.shape[2],
                            image_size)

            arr = np.empty((z.shape[0], *u8.shape[1:]), dtype=np.uint8)
        arr[s : s + len(u8)] = u8
        if sc.save_png:
            for i, im in enumerate(u8):
                save_png(im, img_dir / f"{s + i:06d}.png")
    written = []
    if sc.save_png:
        grid = torch.from_numpy(arr[: sc.grid_max]).permute(0, 3, 1, 2).float() / 255
        written += [save_image_grid(grid, out_dir / "grid.png"), img_dir]
    if sc.save_npz:
        written.append(save_npz_images(out_dir / "samples.npz", arr, labels=labels.numpy()))
    return written

"""What ``train-tokenizer`` writes beside its checkpoints: held-out reconstruction metrics and input | reconstruction
grids (docs/method.md § Tokenizer training).

- ``<out_dir>/eval.jsonl``: one row per evaluation ``{"step", "weights", "psnr", "ssim", ["lpips"], ["rfid"],
  "num_images"}`` over the held-out images. ``weights`` names the weights that were evaluated, as the caller passed
  them: ``"ema"`` at every checkpoint (the EMA weights, what ``create_tokenizer(weights=<run folder>)`` loads),
  ``"raw"`` for the row at step 0 that starts every fresh run (the initial weights). Rows of steps after a resumed
  checkpoint are dropped, so the file always describes one history.
- ``<out_dir>/grids/step_<step>.png``: the first ``tokenizer.grid_items`` held-out images (top row) above their
  reconstructions (bottom row), clamped to [0, 1].
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pae_fast.io import atomic_write_text

__all__ = ["EVAL_FILE", "WEIGHTS", "HeldoutEvaluator"]

log = logging.getLogger("pae_fast.train.tokenizer")

EVAL_FILE = "eval.jsonl"
WEIGHTS = ("ema", "raw")  # the values of a row's "weights": which weights of the run were evaluated


class HeldoutEvaluator:
    """Held-out metrics and grids of a tokenizer, called from the engine's ``on_checkpoint`` (rank 0).

    Args:
        heldout: map-style dataset of ``(image (3, S, S) in [0, 1], label, ...)``; None: nothing is evaluated.
        batch_size: images per forward.
        grid_items: images shown in the grid (0: no grid).
        lpips: frozen LPIPS module or None (no ``lpips`` column).
        inception: FID Inception-v3 or None (no ``rfid`` column).
    """

    def __init__(self, heldout: torch.utils.data.Dataset | None, batch_size: int, grid_items: int,
                 lpips: nn.Module | None = None, inception: nn.Module | None = None) -> None:
        self.heldout, self.batch_size, self.grid_items = heldout, batch_size, grid_items
        self.lpips, self.inception = lpips, inception
        self._images: torch.Tensor | None = None

    def images(self) -> torch.Tensor:
        """All held-out images ``(N, 3, S, S)`` uint8 (read once; 8-bit levels as the image files hold them)."""
        if self._images is None:
            x = torch.stack([self.heldout[i][0] for i in range(len(self.heldout))])
            self._images = x if x.dtype == torch.uint8 else (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return self._images

    @torch.no_grad()
    def evaluate(self, tok: nn.Module, step: int, out_dir: str | Path, weights: str) -> dict[str, Any] | None:
        """Metrics of ``tok`` on the held-out images; appends the row to ``eval.jsonl`` and writes the grid.

        Args:
            tok: the tokenizer to evaluate.
            weights: which weights ``tok`` holds, one of :data:`WEIGHTS` (recorded in the row).
        """
        if weights not in WEIGHTS:
            raise ValueError(f"HeldoutEvaluator.evaluate: weights={weights!r}, expected one of {WEIGHTS}")
        if self.heldout is None or len(self.heldout) == 0:
            return None
        from pae_fast.eval.recon import reconstruction_metrics
        from pae_fast.models.tokenizer import to_image_range

        was_training = tok.training
        tok.eval()
        device = next(tok.parameters()).device
        x = self.images()
        try:
            batches = [(x[i : i + self.batch_size],) for i in range(0, x.shape[0], self.batch_size)]
            m = reconstruction_metrics(tok, batches, inception=self.inception, lpips=self.lpips, device=device)
            row = {"step": int(step), "weights": weights, **{k: float(v) for k, v in m.items()}}
            row["num_images"] = int(m["num_images"])
            if self.grid_items > 0:
                from pae_fast.io_images import save_image_grid

                g = x[: self.grid_items].to(device).float() / 255.0
                rec = to_image_range(tok(g).float())
                path = Path(out_dir) / "grids" / f"step_{step:07d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_image_grid(torch.cat([g, rec]).cpu(), path, nrow=g.shape[0])
        finally:
            tok.train(was_training)
        append_row(Path(out_dir) / EVAL_FILE, row)
        log.info("held-out step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                         if isinstance(v, float)))
        return row


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file (a torn last line is ignored)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Replace rows of steps ``>= row["step"]`` (a resumed run rewrites its future) and append ``row``, atomically."""
    rows = [r for r in read_rows(path) if r.get("step", -1) < row["step"]] + [row]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

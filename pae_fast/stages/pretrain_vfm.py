"""Pre-train the demo's frozen VFM, a tiny timm ViT, as a masked autoencoder on the demo images, on a CPU.

The demo needs a frozen vision foundation model with *learned* features (PAE and the RAE baseline encode with it,
and the Fréchet distance of generated images is measured in its feature space). No weights can be downloaded, so
unless the user gives a local file the demo trains one here, in about a minute (``docs/method.md §Demo VFM``):

- encoder: exactly :data:`VIT_TINY_KWARGS` (``timm`` ``VisionTransformer``, 64 px, patch 8, width 128, depth 4,
  CLS token), registered elsewhere as encoder ``"ViT-tiny"``; inputs normalised with the ImageNet mean / std;
- MAE recipe: 75 % of the 64 patch tokens masked at random per image; the encoder sees the CLS token and the
  visible patches; a small transformer decoder (width 96, depth 2) fills mask tokens in and predicts each patch's
  pixels; the loss is the MSE on masked patches against per-patch normalised pixels (mean 0, variance 1 per patch);
- AdamW (betas 0.9 / 0.95, weight decay 0.05 on matrices), linear warm-up then cosine decay, random h-flips;
- the encoder's positional embedding starts as the 2-D sine-cosine table (it stays trainable).

Only the encoder is saved (``timm`` key names, exactly ``VisionTransformer.state_dict()``) as safetensors with
metadata: what it is, the step count, the losses, the linear-probe accuracies of the features before and after
training and a hash of the configuration (a later run with the same hash skips training).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pae_fast.errors import NonFiniteError
from pae_fast.models.vfm import TINY_VIT_KWARGS

__all__ = [
    "VIT_TINY_KWARGS",
    "MAEConfig",
    "MaskedAutoencoder",
    "PretrainResult",
    "build_vit_tiny",
    "mean_patch_features",
    "probe_accuracy",
    "pretrain_vfm",
]


log = logging.getLogger("pae_fast.pretrain_vfm")

# The demo VFM: encoder "ViT-tiny" of the registry, whose arguments live with it (it loads the weights written here).
VIT_TINY_KWARGS: dict = TINY_VIT_KWARGS
WEIGHTS_FORMAT = "pae_fast.vfm.mae-encoder.v1"


def build_vit_tiny() -> nn.Module:
    """A randomly initialised ``timm`` ``VisionTransformer(**VIT_TINY_KWARGS)`` (input ``(B, 3, 64, 64)``)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**VIT_TINY_KWARGS)


def _normalize(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ImageNet-normalised."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


@dataclass
class MAEConfig:
    """Hyper-parameters of the MAE pre-training (all recorded in the weights' metadata and config hash)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    mask_ratio: float = 0.75
    decoder_width: int = 96
    decoder_depth: int = 2
    decoder_heads: int = 3
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps}, batch_size={self.batch_size}: expected >= 1")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio}: expected a value in (0, 1)")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction={self.warmup_fraction}: expected a value in [0, 1)")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr={self.lr}, weight_decay={self.weight_decay}: expected lr > 0, weight_decay >= 0")
        if self.decoder_width % self.decoder_heads:
            raise ValueError(f"decoder_width={self.decoder_width} is not a multiple of "
                             f"decoder_heads={self.decoder_heads}")


class MaskedAutoencoder(nn.Module):
    """A timm ``VisionTransformer`` encoder with a small MAE decoder for pre-training.

    Args:
        encoder: a ``VisionTransformer`` with one CLS token, no registers, positional embedding covering the CLS
            token (``no_embed_class=False``) and a fixed image size.
        decoder_width, decoder_depth, decoder_heads: the decoder transformer.
    """

    def __init__(self, encoder: nn.Module, decoder_width: int = 96, decoder_depth: int = 2,
                 decoder_heads: int = 3) -> None:
        super().__init__()
        from timm.layers import build_sincos2d_pos_embed
        from timm.models.vision_transformer import Block

        if getattr(encoder, "num_prefix_tokens", None) != 1 or encoder.cls_token is None or encoder.no_embed_class:
            raise ValueError("MaskedAutoencoder needs a VisionTransformer with exactly one CLS token, no register "
                             "tokens and a positional embedding that covers the CLS token")
        self.encoder = encoder
        gh, gw = encoder.patch_embed.grid_size
        self.grid, self.patch = (gh, gw), encoder.patch_embed.patch_size[0]
        dim = encoder.embed_dim
        with torch.no_grad():  # MAE starts from fixed 2-D sine-cosine positions; here they stay trainable
            encoder.pos_embed[0, 1:].copy_(build_sincos2d_pos_embed([gh, gw], dim))
            encoder.pos_embed[0, :1].zero_()
        self.decoder_embed = nn.Linear(dim, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.register_buffer("decoder_pos", torch.cat([torch.zeros(1, decoder_width),
                                                       build_sincos2d_pos_embed([gh, gw], decoder_width)])[None],
                             persistent=False)  # (1, 1 + N, Dd)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_width, decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)) for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(decoder_width, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_width, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, N, p*p*3)`` in raster order of the patches (the encoder's token order)."""
        B, p = x.shape[0], self.patch
        gh, gw = self.grid
        return x.reshape(B, 3, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, p * p * 3)

    def encode(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder tokens ``(B, 1 + K, D)`` (CLS first) of normalised images ``x (B, 3, H, W)``.

        Args:
            keep: ``(B, K)`` indices of the visible patches; ``None`` keeps all (then the result equals the
                encoder's ``forward_features``).
        """
        enc = self.encoder
        tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]  # (B, N, D)
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        h = enc.norm_pre(enc.pos_drop(torch.cat([cls, tokens], dim=1)))
        return enc.norm(enc.blocks(h))

    def random_keep(self, batch: int, mask_ratio: float, generator: torch.Generator | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
        """Indices ``(B, K)`` of the patches left visible, ``K = round(N (1 - mask_ratio))``, uniform per image."""
        n_keep = max(1, round(self.num_patches * (1 - mask_ratio)))
        noise = torch.rand(batch, self.num_patches, generator=generator)
        return noise.argsort(dim=1)[:, :n_keep].to(device)

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.75,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """MAE loss (a scalar) of images ``(B, 3, H, W)`` in [0, 1]: MSE on the masked, per-patch normalised pixels."""
        x = _normalize(images)
        B, N = x.shape[0], self.num_patches
        keep = self.random_keep(B, mask_ratio, generator, x.device)  # (B, K)
        h = self.decoder_embed(self.encode(x, keep))  # (B, 1 + K, Dd)
        full = self.mask_token.expand(B, N, -1).clone()  # (B, N, Dd): mask tokens, visible slots filled below
        full.scatter_(1, keep[..., None].expand(-1, -1, full.shape[-1]), h[:, 1:])
        d = torch.cat([h[:, :1], full], dim=1) + self.decoder_pos
        pred = self.decoder_pred(self.decoder_norm(self.decoder_blocks(d)))[:, 1:]  # (B, N, p*p*3)
        target = self.patchify(x)
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mu) / (var + 1e-6).sqrt()
        masked = torch.ones(B, N, device=x.device)
        masked.scatter_(1, keep, 0.0)
        per_patch = (pred - target).pow(2).mean(-1)  # (B, N)
        return (per_patch * masked).sum() / masked.sum()


@torch.no_grad()
def mean_patch_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """CLS-free mean-pooled features ``(N, D)`` of ``images (N, 3, H, W)`` in [0, 1] (ImageNet-normalised inside)."""
    was = encoder.training
    encoder.eval()
    out = [encoder.forward_features(_normalize(images[i : i + batch_size]))[:, encoder.num_prefix_tokens :].mean(1)
           for i in range(0, images.shape[0], batch_size)]
    encoder.train(was)
    return torch.cat(out)


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   ridge: float = 1e-2) -> float:
    """Held-out accuracy of a ridge-regression linear probe (one-hot targets) on features ``(N, D)``.

    Features are standardised with the training mean / std; ``ridge`` is relative to the mean eigenvalue.
    """
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a = torch.cat([(train_x - mu) / sd, torch.ones(len(train_x), 1)], 1).double()
    b = torch.cat([(test_x - mu) / sd, torch.ones(len(test_x), 1)], 1).double()
    K = int(max(train_y.max(), test_y.max())) + 1
    gram = a.T @ a
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, a.T @ F.one_hot(train_y, K).double())
    return float(((b @ w).argmax(1) == test_y).double().mean())


@dataclass
class PretrainResult:
    """What :func:`pretrain_vfm` did. ``losses`` is empty when a finished file was reused (``skipped``)."""

    path: Path
    steps: int
    initial_loss: float
    final_loss: float
    heldout_loss: float
    probe_accuracy: float
    probe_accuracy_init: float
    seconds: float
    skipped: bool = False
    losses: list[float] = field(default_factory=list)


def _config_hash(cfg: MAEConfig, data_fingerprint: str) -> str:
    blob = json.dumps({"mae": asdict(cfg), "vit": VIT_TINY_KWARGS, "data": data_fingerprint, "format": WEIGHTS_FORMAT},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _lr_at(step: int, cfg: MAEConfig) -> float:
    warm = int(cfg.warmup_fraction * cfg.steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def _existing(path: Path, config_hash: str) -> PretrainResult | None:
    """The result recorded in ``path`` when it holds weights of the same configuration, else None."""
    from pae_fast.weights import WeightsError, read_state_dict

    if not path.is_file():
        return None
    try:
        _, meta = read_state_dict(path, key="vfm weights")
    except WeightsError as e:
        log.warning("%s is unreadable (%s); training again", path, e)
        return None
    if meta.get("format") != WEIGHTS_FORMAT or meta.get("config_hash") != config_hash:
        return None
    return PretrainResult(path, int(meta["steps"]), float(meta["initial_loss"]), float(meta["final_loss"]),
                          float(meta["heldout_loss"]), float(meta["probe_accuracy"]),
                          float(meta["probe_accuracy_init"]), 0.0, skipped=True)


def pretrain_vfm(
    out: str | os.PathLike,
    cfg: MAEConfig | None = None,
    train_images: torch.Tensor | None = None,
    train_labels: torch.Tensor | None = None,
    heldout_images: torch.Tensor | None = None,
    heldout_labels: torch.Tensor | None = None,
    log_every: int = 100,
    progress: bool | None = None,
    reuse: bool = True,
    overwrite: bool = True,
    check_stop: Callable[[], None] | None = None,
) -> PretrainResult:
    """Train ``VisionTransformer(**VIT_TINY_KWARGS)`` as an MAE and save its encoder to ``out`` (safetensors).

    Args:
        out: the weights file to write (atomically); its metadata records the run.
        cfg: hyper-parameters (:class:`MAEConfig` defaults: 300 steps of batch 64).
        train_images, train_labels: ``(N, 3, 64, 64)`` in [0, 1] and ``(N,)``; default: the demo images'
            training split (:func:`pae_fast.data.demo_images.build_demo_images` with ``cfg.seed``).
        heldout_images, heldout_labels: held-out images for the held-out MAE loss and the linear probe; default:
            the demo images' held-out split (given together with the training images or not at all).
        log_every: steps between log lines when no progress bar is shown.
        progress: tqdm bar (default: when stderr is a terminal).
        reuse: return at once when ``out`` already holds weights of the same configuration and data.
        overwrite: replace an existing ``out`` that is not reused; False refuses it (``OutputError``, exit code 3)
            before training, as the ``pretrain-vfm`` command does without ``--overwrite``.
        check_stop: called before each step; it raises to stop (the command's SIGTERM / SIGINT check). Nothing is
            written before the end, so ``out`` stays as it was.

    Returns:
        :class:`PretrainResult`; ``final_loss`` is the mean training loss of the last 10 % of the steps.
    """
    from pae_fast.io import check_output_file, save_safetensors

    cfg = cfg or MAEConfig()
    cfg.validate()
    out = Path(out)
    if (train_images is None) != (heldout_images is None):
        raise ValueError("give both train_images and heldout_images, or neither (the demo images are used)")
    if train_images is None:
        from pae_fast.data.demo_images import build_demo_images

        demo = build_demo_images(seed=cfg.seed)
        train_images, train_labels = demo.train.images, demo.train.labels
        heldout_images, heldout_labels = demo.heldout.images, demo.heldout.labels
    size = VIT_TINY_KWARGS["img_size"]
    for name, t in (("train_images", train_images), ("heldout_images", heldout_images)):
        if t.ndim != 4 or tuple(t.shape[1:]) != (3, size, size):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (N, 3, {size}, {size}) in [0, 1]")
    if train_labels is None or heldout_labels is None:
        raise ValueError("train_labels and heldout_labels are needed for the linear probe")
    h = hashlib.sha256()
    for t in (train_images, train_labels, heldout_images, heldout_labels):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    config_hash = _config_hash(cfg, h.hexdigest())
    if reuse and (done := _existing(out, config_hash)) is not None:
        log.info("VFM weights %s already trained with this configuration (hash %s); reusing them", out, config_hash)
        return done
    check_output_file(out, overwrite)  # before training: a folder, an existing file or an unwritable place

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(cfg.seed)
        model = MaskedAutoencoder(build_vit_tiny(), cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    feats = (mean_patch_features(model.encoder, train_images), mean_patch_features(model.encoder, heldout_images))
    acc_init = probe_accuracy(feats[0], train_labels, feats[1], heldout_labels)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "token" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    from pae_fast.data.demo_images import random_hflip

    show_bar = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show_bar:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="pretrain-vfm (MAE)", dynamic_ncols=True)
    log.info("MAE pre-training of ViT-tiny: %d steps of batch %d on %d images, mask ratio %.2f",
             cfg.steps, cfg.batch_size, len(train_images), cfg.mask_ratio)
    losses: list[float] = []
    model.train()
    n = len(train_images)
    perm, pos = torch.randperm(n, generator=g), 0
    t_train = time.perf_counter()
    try:
        for step in range(cfg.steps):
            if check_stop is not None:
                check_stop()
            if pos + cfg.batch_size > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos : pos + cfg.batch_size]
            pos += cfg.batch_size
            batch = random_hflip(train_images[idx], g)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            loss = model(batch, cfg.mask_ratio, g)
            if not torch.isfinite(loss):
                raise NonFiniteError(f"MAE loss is {loss.item()} at step {step}; lower the learning rate "
                                         f"(lr={cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            elif (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                rate = (step + 1) / (time.perf_counter() - t_train)
                log.info("step %d/%d  loss %.4f  %.1f steps/s  eta %.0f s", step + 1, cfg.steps, losses[-1], rate,
                         (cfg.steps - step - 1) / rate)
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    with torch.no_grad():
        gh = torch.Generator().manual_seed(cfg.seed + 2)
        heldout_loss = float(torch.stack([
            model(heldout_images[i : i + 256], cfg.mask_ratio, gh) for i in range(0, len(heldout_images), 256)
        ]).mean())
    feats = (mean_patch_features(model.encoder, train_images), mean_patch_features(model.encoder, heldout_images))
    acc = probe_accuracy(feats[0], train_labels, feats[1], heldout_labels)
    tail = max(1, cfg.steps // 10)
    initial, final = losses[0], sum(losses[-tail:]) / tail
    meta = {
        "format": WEIGHTS_FORMAT,
        "description": "ViT-tiny encoder (timm VisionTransformer, keys of its state_dict) pre-trained as a masked "
                       "autoencoder on the pae_fast demo images; inputs [0, 1] normalised with ImageNet mean/std",
        "encoder": "ViT-tiny",
        "vit_kwargs": json.dumps(VIT_TINY_KWARGS, sort_keys=True),
        "mae_config": json.dumps(asdict(cfg), sort_keys=True),
        "config_hash": config_hash,
        "steps": str(cfg.steps),
        "initial_loss": f"{initial:.6f}",
        "final_loss": f"{final:.6f}",
        "heldout_loss": f"{heldout_loss:.6f}",
        "probe_accuracy": f"{acc:.6f}",
        "probe_accuracy_init": f"{acc_init:.6f}",
        "train_images": str(len(train_images)),
    }
    save_safetensors(model.encoder.state_dict(), out, metadata=meta)
    seconds = time.perf_counter() - t0
    log.info("VFM saved to %s: MAE loss %.4f -> %.4f (held-out %.4f), linear probe %.3f (random init %.3f), %.0f s",
             out, initial, final, heldout_loss, acc, acc_init, seconds)
    return PretrainResult(out, cfg.steps, initial, final, heldout_loss, acc, acc_init, seconds, False, losses)

"""Tiny stand-ins for the tokenizer parts the losses talk to (tests only)."""

import dataclasses

import torch
import torch.nn as nn

from pae_fast.config import TokenizerConfig
from pae_fast.models.discriminator import DinoDiscriminator

TINY_DISC = {"model": "vit_small_patch8_224.dino", "blocks": (1, 3), "input_size": 32,
             "backbone_kwargs": {"depth": 4, "embed_dim": 32, "num_heads": 2}}  # fmt: skip


def tiny_disc(**kw) -> DinoDiscriminator:
    args = {**TINY_DISC, "allow_random": True, **kw}
    return DinoDiscriminator(**args)


def rms1(*shape, dtype=torch.float32, generator=None):
    z = torch.randn(*shape, dtype=torch.float64, generator=generator)
    return (z / z.pow(2).mean(-1, keepdim=True).sqrt()).to(dtype)


class TinyDecoder(nn.Module):
    """(B, C, h, w) latent -> (B, 3, h*p, w*p) image in [0, 1]; ``last`` is the last layer (nn.Linear)."""

    def __init__(self, channels: int = 8, patch: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.p = patch
        self.hidden = nn.Linear(channels, hidden)
        self.last = nn.Linear(hidden, patch * patch * 3)
        self.calls: list[int] = []  # batch size of every call

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.calls.append(z.shape[0])
        B, C, h, w = z.shape
        x = self.last(torch.tanh(self.hidden(z.flatten(2).transpose(1, 2))))  # (B, hw, p*p*3)
        x = x.view(B, h, w, self.p, self.p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, h * self.p, w * self.p)
        return torch.sigmoid(x)


class CountingLPIPS(nn.Module):
    """A differentiable distance-like stand-in for LPIPS (its ``features`` / ``features_distance`` split) that records
    every feature pass: ``passes`` = ``[(batch size, grad enabled)]``."""

    def __init__(self) -> None:
        super().__init__()
        self.passes: list[tuple[int, bool]] = []

    @property
    def images(self) -> int:
        """Images the stand-in "trunk" has seen."""
        return sum(n for n, _ in self.passes)

    def features(self, x):
        self.passes.append((x.shape[0], torch.is_grad_enabled()))
        return [x]

    def distance(self, fa, fb):
        return (fa[0] - fb[0]).pow(2).flatten(1).mean(1).sqrt()

    def features_distance(self, x, anchor):
        f = self.features(x)
        return f, self.distance(f, [a.detach() for a in anchor])

    def forward(self, x, y):
        return self.distance(self.features(x), self.features(y))


def tok_cfg(**kw) -> TokenizerConfig:
    base = {"lpips_weights": "none", "lambda_gan": 0.0}
    return dataclasses.replace(TokenizerConfig(), **{**base, **kw})

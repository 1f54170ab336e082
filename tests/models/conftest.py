"""Shared fixtures of the generator tests: tiny models with non-zero weights and matching inputs."""

from __future__ import annotations

import pytest
import torch

from pae_fast.registry import create_generator

# Tiny widths keep the Triton interpreter quick: 8x8 latents with patch 2 -> 16 tokens, head_dim 16 / 24.
TINY = dict(depth=2, hidden_size=64, num_heads=4, in_channels=4, input_size=8, num_classes=3)
TINY_HEAD = dict(head_hidden_size=96, head_depth=2, head_num_heads=4)


def build_tiny(name: str, perturb: bool = True, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny registered generator; with ``perturb`` every trainable weight gets noise (the zero-init adaLN and
    final layer would otherwise make every output 0 and hide wiring bugs)."""
    kw = dict(TINY, **(TINY_HEAD if name.startswith("DiTDH") else {}))
    kw.update(overrides)
    torch.manual_seed(seed)
    model = create_generator(name, **kw)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_inputs(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    C, S = model.in_channels, model.input_size
    x = torch.randn(batch, C, S, S, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, y


@pytest.fixture
def tiny():
    return build_tiny


@pytest.fixture
def inputs():
    return tiny_inputs

"""Differentiable augmentation (DiffAug) applied to every image the discriminator sees (docs/method.md §GAN).

Three families, each drawn independently per sample and applied as differentiable tensor ops, so the generator's
gradient flows through the augmentation:

- ``color``: brightness ``+U(-0.25, 0.25)`` (= the usual ``U(-0.5, 0.5)`` on the [-1, 1] scale; our images are in
  [0, 1]), saturation ``x <- mean_c + (x - mean_c) * U(0, 2)``, contrast ``x <- mean + (x - mean) * U(0.5, 1.5)``
  (mean over channels and pixels);
- ``translation``: shift by up to ``translation_ratio`` of the size in each direction, zero fill;
- ``cutout``: one zeroed square of side ``cutout_ratio`` of the size at a random position.

The ranges are those of data-efficient GAN training (Zhao et al., 2020) [2nd]; the implementation is our own
(an integer gather for translation, a mask for cutout).
"""

from __future__ import annotations

import torch

__all__ = ["POLICIES", "parse_policy", "diff_augment"]

POLICIES = ("color", "translation", "cutout")


def parse_policy(policy: str | None) -> tuple[str, ...]:
    """``"color,translation,cutout"`` -> a tuple of names; ``""``/None -> ``()``. Unknown names are errors."""
    if not policy:
        return ()
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    bad = [p for p in names if p not in POLICIES]
    if bad:
        raise ValueError(f"DiffAug policy {policy!r}: unknown {bad}; valid names: {', '.join(POLICIES)}")
    return names


def _rand(x: torch.Tensor, generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)


def _color(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    B = x.shape[0]
    x = x + (_rand(x, g, B, 1, 1, 1) - 0.5) * 0.5  # +-0.5 on the [-1, 1] scale
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (_rand(x, g, B, 1, 1, 1) * 2) + mean_c
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, g, B, 1, 1, 1) + 0.5) + mean


def _translation(x: torch.Tensor, g: torch.Generator | None, ratio: float) -> torch.Tensor:
    B, _, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (B, 1, 1), generator=g, device=x.device)
    dx = torch.randint(-sw, sw + 1, (B, 1, 1), generator=g, device=x.device)
    ys = torch.arange(H, device=x.device).view(1, H, 1) - dy  # source row of each output row
    xs = torch.arange(W, device=x.device).view(1, 1, W) - dx
    valid = ((ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)).unsqueeze(1)  # (B, 1, H, W)
    idx = ys.clamp(0, H - 1) * W + xs.clamp(0, W - 1)  # (B, H, W) flat source index
    out = x.flatten(2).gather(2, idx.flatten(1).unsqueeze(1).expand(-1, x.shape[1], -1)).view_as(x)
    return out * valid.to(x.dtype)


def _cutout(x: torch.Tensor, g: torch.Generator | None, ratio: float) -> torch.Tensor:
    B, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    cy = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), generator=g, device=x.device)  # square centre
    cx = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), generator=g, device=x.device)
    ys = torch.arange(H, device=x.device).view(1, H, 1)
    xs = torch.arange(W, device=x.device).view(1, 1, W)
    inside = (ys >= cy - ch // 2) & (ys < cy - ch // 2 + ch) & (xs >= cx - cw // 2) & (xs < cx - cw // 2 + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def diff_augment(
    x: torch.Tensor,
    policy: str | tuple[str, ...] = POLICIES,
    translation_ratio: float = 0.125,
    cutout_ratio: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment a batch with the given families, in the order color -> translation -> cutout.

    Args:
        x: ``(B, C, H, W)`` images in [0, 1].
        policy: a comma-separated string or a tuple of names from :data:`POLICIES`.
        translation_ratio: maximum shift as a fraction of H / W.
        cutout_ratio: side of the cut-out square as a fraction of H / W.
        generator: randomness source (None: the global RNG of x's device).

    Returns:
        ``(B, C, H, W)`` augmented images, same dtype; differentiable w.r.t. ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"diff_augment: expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    names = parse_policy(policy) if isinstance(policy, str) else tuple(policy)
    parse_policy(",".join(names))  # validate tuples too
    for name in POLICIES:  # fixed order whatever the spelling order
        if name not in names:
            continue
        if name == "color":
            x = _color(x, generator)
        elif name == "translation":
            x = _translation(x, generator, translation_ratio)
        else:
            x = _cutout(x, generator, cutout_ratio)
    return x

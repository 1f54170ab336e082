"""Velocity functions for sampling: conditional, classifier-free guidance with an interval, AutoGuidance.

Each builder binds a generator ``model(x_t, t, y) -> v`` and its labels into a :data:`VelocityFn`
``fn(x (B, ...), t (B,)) -> v`` for the samplers. t = 1 is data.

- **CFG** (docs/method.md § Sampling): ``v = v_∅ + w·(v_y − v_∅)`` on **all** channels (the original LightningDiT
  guided only the first 3 channels; we do not), applied only while ``start ≤ t ≤ end`` (PAE: w = 2.5 from
  t = 0.25); outside the interval the conditional velocity is used. Conditional and unconditional passes run as
  one batch of 2B.
- **AutoGuidance** (Karras et al., 2024; RAE): ``v = v_guide + w·(v_main − v_guide)``, both conditional, the guide
  a smaller / earlier model (RAE: w ≈ 1.42–1.5).
- Label schedules: class-balanced (e.g. 50 per class for FID) or uniformly random.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pae_fast.flow.samplers import VelocityFn

__all__ = [
    "conditional_velocity",
    "ClassifierFreeGuidance",
    "AutoGuidance",
    "guidance_mask",
    "class_balanced_labels",
    "random_labels",
]


def conditional_velocity(model: nn.Module, y: Tensor) -> VelocityFn:
    """``fn(x, t) = model(x, t, y)`` (no guidance).

    Args:
        model: generator ``model(x_t (B, C, H, W), t (B,), y (B,)) -> v``.
        y: class labels ``(B,)`` long.
    """

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return model(x, t, y)

    return fn


def guidance_mask(t: Tensor, start: float, end: float = 1.0) -> Tensor:
    """Boolean ``(B,)``: where guidance is on, ``start ≤ t ≤ end``."""
    return (t >= start) & (t <= end)


def _check_interval(start: float, end: float) -> None:
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0 and start <= end):
        raise ValueError(f"guidance interval must satisfy 0 <= start <= end <= 1, got start={start}, end={end}")


def _blend(v_cond: Tensor, v_guided: Tensor, on: Tensor) -> Tensor:
    """Guided velocity where ``on`` (B,), conditional elsewhere."""
    return torch.where(on.view(-1, *([1] * (v_cond.ndim - 1))), v_guided, v_cond)


class ClassifierFreeGuidance:
    """Classifier-free guidance on all channels, inside a time interval.

    Args:
        model: generator trained with label dropout; ``null_class`` is its unconditional label.
        y: class labels ``(B,)`` long.
        scale: w (1 = no guidance).
        interval_start: guidance only while ``t ≥ interval_start`` (t = 1 is data).
        interval_end: ... and ``t ≤ interval_end``.
        null_class: the unconditional label; default ``model.null_class``.
    """

    def __init__(
        self,
        model: nn.Module,
        y: Tensor,
        scale: float,
        interval_start: float = 0.0,
        interval_end: float = 1.0,
        null_class: int | None = None,
    ) -> None:
        _check_interval(interval_start, interval_end)
        if null_class is None:
            null_class = getattr(model, "null_class", None)
            if null_class is None:
                raise ValueError(
                    "classifier-free guidance needs the model's unconditional label: the model has no `null_class` "
                    "attribute; pass null_class= or sample with guidance 'none'"
                )
        self.model = model
        self.y = y
        self.scale = float(scale)
        self.start = float(interval_start)
        self.end = float(interval_end)
        self.y_null = torch.full_like(y, int(null_class))

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        on = guidance_mask(t, self.start, self.end)
        if self.scale == 1.0 or not bool(on.any()):
            return self.model(x, t, self.y)
        v = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.y, self.y_null]))
        v_cond, v_uncond = v.chunk(2)
        v_guided = v_uncond + self.scale * (v_cond - v_uncond)
        return v_guided if bool(on.all()) else _blend(v_cond, v_guided, on)


class AutoGuidance:
    """AutoGuidance: ``v = v_guide + w·(v_main − v_guide)``, inside an optional time interval.

    Args:
        model: the main generator.
        guide: the guiding generator (same inputs; a smaller or less-trained model).
        y: class labels ``(B,)`` long, given to both.
        scale: w (1 = the main model alone).
        interval_start: guidance only while ``t ≥ interval_start``.
        interval_end: ... and ``t ≤ interval_end``.
    """

    def __init__(
        self,
        model: nn.Module,
        guide: nn.Module,
        y: Tensor,
        scale: float,
        interval_start: float = 0.0,
        interval_end: float = 1.0,
    ) -> None:
        _check_interval(interval_start, interval_end)
        self.model = model
        self.guide = guide
        self.y = y
        self.scale = float(scale)
        self.start = float(interval_start)
        self.end = float(interval_end)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        v_main = self.model(x, t, self.y)
        on = guidance_mask(t, self.start, self.end)
        if self.scale == 1.0 or not bool(on.any()):
            return v_main
        v_guide = self.guide(x, t, self.y)
        v_guided = v_guide + self.scale * (v_main - v_guide)
        return v_guided if bool(on.all()) else _blend(v_main, v_guided, on)


def class_balanced_labels(
    num_classes: int, per_class: int, *, shuffle: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """Exactly ``per_class`` labels of every class (FID protocol: 50 per class, 50k samples for ImageNet).

    Args:
        num_classes: K.
        per_class: n.
        shuffle: random order (else ``0…0 1…1 …``).
        generator: RNG for the shuffle.

    Returns:
        ``(K·n,)`` int64 labels.
    """
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"need num_classes >= 1 and per_class >= 1, got {num_classes} and {per_class}")
    y = torch.arange(num_classes, dtype=torch.long).repeat_interleave(per_class)
    if shuffle:
        y = y[torch.randperm(y.numel(), generator=generator)]
    return y


def random_labels(num_samples: int, num_classes: int, *, generator: torch.Generator | None = None) -> Tensor:
    """``(N,)`` int64 labels drawn uniformly from ``[0, num_classes)``."""
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"need num_samples >= 1 and num_classes >= 1, got {num_samples} and {num_classes}")
    return torch.randint(0, num_classes, (num_samples,), generator=generator)

"""Time conventions of generator weights: ours (t = 1 data, predicts ``v = x1 − x0``) and RAE's (docs/method.md
§Sampling, "RAE checkpoints").

RAE's stage-2 code trains on ``x_τ = (1 − τ)·x + τ·ε`` (τ = 1 is noise) and its network predicts ``u = ε − x``.
With ``t = 1 − τ`` that is our path ``x_t = t·x + (1 − t)·ε``, and ``u = dx/dτ = −dx/dt = −v``. So a network with
RAE's convention becomes one with ours by ``v(x, t, y) = −net(x, 1 − t, y)``, applied once when the weights are
loaded; samplers, CFG, AutoGuidance (an RAE guide included) and evaluation then see one convention.

RAE's sampling grid in its own time, ``shift_α(linspace(1, 1/1000, 50))`` (Euler, 49 steps), is in ours
``shift_{1/α}(linspace(0, 1 − 1/1000, 50))``: ``sample.steps: 49``, ``sample.t_end: 0.999`` and the shift 1/α with
α = sqrt(C·H·W / 4096) computed from the latent shape (``sample.dimension_shift: true``; √48 for 768 × 16 × 16,
≈ 0.99311 at the end).

    from pae_fast.flow.convention import resolve_time_convention, wrap_time_convention
    convention = convention_for(cfg.flow, metadata, where=str(weights_file))
    model = wrap_time_convention(model, convention)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

__all__ = [
    "TIME_CONVENTIONS",
    "METADATA_KEY",
    "RAETimeConvention",
    "wrap_time_convention",
    "resolve_time_convention",
    "convention_for",
]

TIME_CONVENTIONS: tuple[str, ...] = ("pae", "rae")
METADATA_KEY = "time_convention"  # checkpoint metadata entry that records the convention of the weights


class RAETimeConvention(nn.Module):
    """A generator in RAE's convention seen in ours: ``forward(x, t, y) = −net(x, 1 − t, y)``.

    Args:
        net: ``net(x_τ (B, C, H, W), τ (B,), y (B,), ...) -> ε − x`` with τ = 1 noise.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, y: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``x (B, C, H, W)``, ``t (B,)`` with t = 1 data, ``y (B,)`` -> ``v (B, C, H, W)``."""
        return -self.net(x, 1 - t, y, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped generator (``num_classes``, ``null_class``, ``in_channels``, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)


def wrap_time_convention(model: nn.Module, convention: str) -> nn.Module:
    """``model`` seen in our convention: unchanged for ``"pae"``, wrapped once for ``"rae"`` (idempotent).

    Args:
        model: the loaded generator.
        convention: ``"pae"`` (ours) or ``"rae"``.
    """
    if convention not in TIME_CONVENTIONS:
        raise ValueError(f"flow.time_convention: expected one of {', '.join(TIME_CONVENTIONS)}, got {convention!r}")
    if convention == "pae" or isinstance(model, RAETimeConvention):
        return model
    return RAETimeConvention(model)


def resolve_time_convention(configured: str, metadata: Mapping[str, str] | None = None, where: str = "") -> str:
    """The convention of a checkpoint's weights: its metadata when it records one, else ``flow.time_convention``.

    Args:
        configured: ``flow.time_convention`` (for files without metadata, e.g. RAE's own ``.pt``).
        metadata: the checkpoint's metadata (key :data:`METADATA_KEY`).
        where: the checkpoint, for messages.

    Raises:
        ValueError: an unknown value, or the config asks for ``"rae"`` while the metadata records ``"pae"``.
    """
    if configured not in TIME_CONVENTIONS:
        raise ValueError(f"flow.time_convention: expected one of {', '.join(TIME_CONVENTIONS)}, got {configured!r}")
    recorded = (metadata or {}).get(METADATA_KEY)
    if recorded is None:
        return configured
    if recorded not in TIME_CONVENTIONS:
        raise ValueError(
            f"{where or 'checkpoint'} metadata {METADATA_KEY}={recorded!r}: expected one of "
            f"{', '.join(TIME_CONVENTIONS)}"
        )
    if configured == "rae" and recorded == "pae":
        raise ValueError(
            f"flow.time_convention=rae, but {where or 'the checkpoint'} records {METADATA_KEY}=pae "
            "(trained by pae_fast): drop the override"
        )
    return recorded


def convention_for(flow_cfg: Any, metadata: Mapping[str, str] | None = None, where: str = "") -> str:
    """:func:`resolve_time_convention` with ``flow_cfg.time_convention`` (a :class:`~pae_fast.config.FlowConfig`)."""
    return resolve_time_convention(flow_cfg.time_convention, metadata, where)

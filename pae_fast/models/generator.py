"""What every class-conditional generator shares: input checks, the null class, variant registration,
construction from a config and loading trained weights (docs/method.md § Generators).

Architecture files (:mod:`pae_fast.models.lightningdit`, :mod:`pae_fast.models.ditdh`) hold only their blocks and a
``VARIANTS`` table of constructor arguments; :func:`register_variants` puts each entry into the one
:data:`pae_fast.registry.GENERATORS` registry.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pae_fast.registry import create_generator, register_generator

__all__ = [
    "check_inputs",
    "ClassConditionalGenerator",
    "build_variant",
    "build_named",
    "register_variant",
    "register_variants",
    "CONFIG_FIELDS",
    "generator_from_config",
    "load_generator_weights",
    "UPSTREAM_CONSTANTS",
]


def check_inputs(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``(x_t, t, y)`` against a generator; returns ``t`` and ``y`` as ``(B,)`` (a scalar ``t`` expands)."""
    name = type(model).__name__
    C, S = model.in_channels, model.input_size
    if x.dim() != 4 or x.shape[1] != C or x.shape[2] != S or x.shape[3] != S:
        raise ValueError(f"{name}: x_t must be (B, {C}, {S}, {S}) (in_channels, input_size), got {tuple(x.shape)}")
    B = x.shape[0]
    if t.dim() == 0:
        t = t.expand(B)
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name}: t must be (B,) = ({B},) or a scalar, got {tuple(t.shape)}")
    if tuple(y.shape) != (B,) or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name}: y must be an integer tensor of shape ({B},), got {y.dtype} {tuple(y.shape)}")
    return t, y


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class ClassConditionalGenerator(nn.Module):
    """What LightningDiT and DiT^DH share beyond their blocks: the label table's null class and checkpointing."""

    y_embedder: nn.Module
    grad_checkpointing: bool

    @property
    def null_class(self) -> int:
        """The unconditional label (``num_classes``)."""
        return self.y_embedder.null_class

    @property
    def num_classes(self) -> int:
        return self.y_embedder.num_classes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.no_grad()
    def _init_conditioning_and_zero_outputs(self) -> None:
        """N(0, 0.02) label table and t-MLP; adaLN-Zero: zero modulation in every block and a zero final layer, so
        the model outputs exactly 0 at init."""
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)


# ----------------------------------------------------------------------------------------------------------------
# Named variants and construction from a config
# ----------------------------------------------------------------------------------------------------------------


def build_variant(cls: type, name: str, variant: Mapping[str, Any], overrides: Mapping[str, Any]) -> Any:
    """``cls(**variant, **overrides)`` with None overrides dropped and unknown options named in the error."""
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(k for k in overrides if k not in valid)
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}")
    kwargs = dict(variant)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    model = cls(**kwargs)
    model.variant = name
    return model


def build_named(cls: type, family: str, variants: Mapping[str, Mapping[str, Any]], name: str,
                overrides: Mapping[str, Any]) -> Any:
    """The variant ``name`` of an architecture's ``VARIANTS`` table, built by :func:`build_variant`.

    Raises:
        KeyError: ``name`` is not in ``variants`` (the message lists the ``family``'s valid names).
    """
    if name not in variants:
        raise KeyError(f"unknown {family} variant {name!r}; valid: {', '.join(variants)}")
    return build_variant(cls, name, variants[name], overrides)


def register_variant(name: str, cls: type, variant: Mapping[str, Any]) -> None:
    """Register ``cls(**variant)`` as the generator ``name`` (``create_generator(name, **overrides)``)."""
    variant = dict(variant)

    def build(**overrides: Any) -> nn.Module:
        return build_variant(cls, name, variant, overrides)

    build.__name__ = build.__qualname__ = f"build_{name}"
    build.__doc__ = f"Build {name} ({cls.__name__}; overrides: constructor arguments)."
    register_generator(name, build)


def register_variants(cls: type, variants: Mapping[str, Mapping[str, Any]]) -> None:
    """Register every entry of an architecture's ``VARIANTS`` table (name -> constructor arguments)."""
    for name, variant in variants.items():
        register_variant(name, cls, variant)


# GeneratorConfig fields that are constructor options (None = the variant's default).
CONFIG_FIELDS = (
    "in_channels", "input_size", "num_classes", "class_dropout", "depth", "hidden_size", "num_heads", "patch_size",
    "use_qknorm", "use_rope", "use_swiglu", "wo_shift", "grad_checkpointing",
    "head_depth", "head_hidden_size", "head_num_heads",
)  # fmt: skip


def generator_from_config(cfg: Any, device: torch.device | str | None = None) -> nn.Module:
    """Build the generator a :class:`pae_fast.config.GeneratorConfig` describes (and load ``cfg.checkpoint``).

    Args:
        cfg: the ``model`` section of a run config.
        device: where to build it (``"meta"`` builds without memory); default: the current default device.

    Returns:
        The model, in train mode.
    """
    overrides = {f: getattr(cfg, f) for f in CONFIG_FIELDS if getattr(cfg, f, None) is not None}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = create_generator(cfg.name, **overrides)
    if getattr(cfg, "checkpoint", None):
        load_generator_weights(model, cfg.checkpoint, key="model.checkpoint")
    return model


# Upstream LightningDiT / RAE checkpoints store their RoPE tables as persistent buffers; ours are rebuilt.
UPSTREAM_CONSTANTS: tuple[str, ...] = (".freqs_cos", ".freqs_sin")


def load_generator_weights(
    model: nn.Module, path: str, prefer: tuple[str, ...] = ("ema", "model"), key: str = "weights"
) -> dict[str, str]:
    """Load trained weights into a generator through :func:`pae_fast.weights.load_weights` (strict).

    Accepts what :func:`pae_fast.weights.read_state_dict` reads: safetensors, ``.pt``/``.pth`` with
    ``weights_only=True`` (``{"ema": ..., "model": ...}`` takes the first of ``prefer``), run and checkpoint folders;
    wrapper prefixes are stripped and upstream RoPE tables (``*.freqs_cos``/``*.freqs_sin``) ignored.

    Returns:
        The file's metadata plus ``"weights_file"``.

    Raises:
        pae_fast.weights.WeightsError: naming the file and the missing / unexpected / mis-shaped keys.
    """
    from pae_fast.weights import load_weights

    return load_weights(model, path, prefer=prefer, skip=lambda k: k.endswith(UPSTREAM_CONSTANTS), key=key)

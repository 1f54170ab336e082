"""Parameter and compute counting for the generators, on the meta device (no memory, no weights).

"GFLOPs" in DiT-family papers are multiply-accumulates (docs/method.md § Compute accounting), so this module
reports **MACs**:
``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per MAC of every matmul / conv / attention product, and
we halve it. Attention's two ``N x N`` products are included; elementwise ops (norms, modulation, softmax) are not.
Training FLOPs per sample ~ 6 x MACs (forward 2, backward 4).

    python -m pae_fast info --model LightningDiT-XL/1     # 675.26M parameters, 118.6 GMAC per image
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pae_fast.kernels import use_backend

__all__ = [
    "count_params",
    "forward_gmacs",
    "example_inputs",
    "meta_twin",
    "GeneratorProfile",
    "profile_generator",
    "describe_generator",
    "train_flops_per_sample",
]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (frozen ones such as the fixed sin-cos APE included unless ``trainable_only``).

    Published counts (LightningDiT-XL/1 = 675.26M, DiT^DH-XL = 839M) include the frozen APE, as DiT's do.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def meta_twin(model: nn.Module) -> nn.Module:
    """The same architecture on the meta device (from ``model.arch``), or ``model`` itself if already on meta."""
    if all(p.device.type == "meta" for p in model.parameters()):
        return model
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError(f"{type(model).__name__} has no `arch` (its constructor arguments); build it on meta yourself")
    with torch.device("meta"):
        twin = type(model)(**arch)
    twin.train(model.training)
    return twin


def example_inputs(model: nn.Module, batch_size: int = 1, device: torch.device | str = "meta") -> tuple:
    """``(x_t, t, y)`` of the right shapes for a generator (``in_channels``, ``input_size``, ``num_classes``)."""
    C, S = model.in_channels, model.input_size
    x = torch.zeros(batch_size, C, S, S, device=device)
    t = torch.zeros(batch_size, device=device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    return x, t, y


def _fqn_counts(counter: FlopCounterMode) -> dict[str, int]:
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def forward_gmacs(
    model: nn.Module, inputs: tuple | None = None, per_module: bool = False
) -> float | tuple[float, dict[str, float]]:
    """Forward multiply-accumulates (in 10^9) of ``model(*inputs)``, counted on a meta-device twin.

    The count is made with the reference ops (``use_backend("torch")``): fused kernels change memory traffic,
    never the number of MACs, and the references expose every matmul to the counter.

    Args:
        model: a generator (any device; a meta twin is built from ``model.arch`` so no memory is used).
        inputs: the forward arguments (on meta); default :func:`example_inputs` with batch 1 (= per image).
        per_module: also return ``{module path: GMAC}`` (FlopCounterMode's hierarchy, e.g. ``"DiTDH.blocks.28"``).

    Returns:
        GMAC for the whole batch, and the per-module table when ``per_module``.
    """
    twin = meta_twin(model)
    if inputs is None:
        inputs = example_inputs(twin)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), use_backend("torch"), counter:
        twin(*inputs)
    total = counter.get_total_flops() / 2 / 1e9
    if per_module:
        return total, {k: v / 2 / 1e9 for k, v in _fqn_counts(counter).items()}
    return total


@dataclass
class GeneratorProfile:
    """What ``info --model`` prints: sizes and costs per image."""

    name: str
    params: int
    trainable_params: int
    gmacs: float  # forward, per image
    breakdown: dict[str, float] = field(default_factory=dict)  # GMAC per image by part

    @property
    def train_gflops(self) -> float:
        """Training FLOPs per image, forward + backward (~ 6 x MACs), in 10^9."""
        return 6.0 * self.gmacs


def _parts(model: nn.Module, table: dict[str, float]) -> dict[str, float]:
    """Group the per-module table: block sub-modules by stack (trunk / head), embedders, final layer parts.

    FlopCounterMode attributes work to the module whose ``forward`` runs it, so the adaLN linears (called by the
    block runner, outside the block's own forward) appear under their own names, never twice.
    """
    root = type(model).__name__
    depth = getattr(model, "depth", len(model.blocks))
    has_head = depth < len(model.blocks)
    parts: dict[str, float] = {}
    for name, v in table.items():
        if not name.startswith(root + "."):
            continue
        path = name[len(root) + 1 :].split(".")
        if path[0] == "blocks" and len(path) == 3:
            stack = ("trunk" if int(path[1]) < depth else "head") if has_head else "blocks"
            key = f"{stack} {path[2]}"
        elif path[0] == "final_layer" and len(path) == 2:
            key = f"final {path[1]}"
        elif len(path) == 1 and path[0] not in ("blocks", "final_layer"):
            key = path[0]
        else:
            continue
        parts[key] = parts.get(key, 0.0) + v
    return parts


def profile_generator(model_or_name: nn.Module | str, **overrides: Any) -> GeneratorProfile:
    """Parameters and forward GMAC per image of a generator (built on meta when given a registered name)."""
    from pae_fast.registry import create_generator

    if isinstance(model_or_name, str):
        with torch.device("meta"):
            model = create_generator(model_or_name, **overrides)
        name = model_or_name
    else:
        model = model_or_name
        name = getattr(model, "variant", type(model).__name__)
    total, table = forward_gmacs(model, per_module=True)
    return GeneratorProfile(
        name=name,
        params=count_params(model),
        trainable_params=count_params(model, trainable_only=True),
        gmacs=total,
        breakdown=_parts(meta_twin(model), table),
    )


def describe_generator(name: str, **overrides: Any) -> str:
    """A few lines for ``python -m pae_fast info --model NAME``."""
    prof = profile_generator(name, **overrides)
    lines = [
        f"{prof.name}{' ' + str(overrides) if overrides else ''}",
        f"  parameters          {prof.params:,} ({prof.params / 1e6:.2f}M; trainable {prof.trainable_params:,})",
        f"  forward GMAC/image  {prof.gmacs:.2f}   (DiT papers' 'GFLOPs'; training ~ {prof.train_gflops:.0f} GFLOP)",
    ]
    for part, v in sorted(prof.breakdown.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {part:<26} {v:9.3f} GMAC")
    return "\n".join(lines)


def train_flops_per_sample(model: nn.Module) -> float:
    """Training FLOPs per sample of a generator: forward + backward = 3 x forward, forward = 2 x MACs.

    Counted on a meta twin (:func:`forward_gmacs`), so it costs no memory; the engine turns it into achieved
    TFLOP/s and MFU (docs/method.md § Compute accounting).
    """
    return 3.0 * 2.0 * forward_gmacs(model) * 1e9

"""The PAE authors' LightningDiT checkpoints load strictly into the presets that reproduce them.

The authors' layout is written out below from their model definition (LightningDiT's ``lightningdit.py``, as PAE
ships it: ``PatchEmbed`` ``x_embedder``, ``TimestepEmbedder``, ``LabelEmbedder`` with a null row, a frozen
``pos_embed``, the persistent ``feat_rope`` tables, RMSNorm blocks with SwiGLU ``w12`` / ``w3``, and — with
``use_qknorm: true``, their 800-epoch config — an RMSNorm ``q_norm`` / ``k_norm`` over the head dimension); the
same block names appear in RAE's released DiTᴰᴴ layout (``shared/reference/rae/rae_stage2_ditdh_XL.txt``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pae_fast.config import load_config
from pae_fast.models.generator import UPSTREAM_CONSTANTS, generator_from_config, load_generator_weights
from pae_fast.weights import WeightsError, load_into

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def authors_lightningdit_layout(
    depth: int, hidden: int, heads: int, in_channels: int, size: int, qknorm: bool, patch: int = 1,
    num_classes: int = 1000,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the authors' LightningDiT state dict (module docstring)."""
    hd, mlp, tokens = hidden // heads, int(2 / 3 * 4 * hidden), (size // patch) ** 2
    out = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "feat_rope.freqs_cos": (tokens, hd),
        "feat_rope.freqs_sin": (tokens, hd),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        out |= {
            b + "norm1.weight": (hidden,),
            b + "attn.qkv.weight": (3 * hidden, hidden),
            b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden),
            b + "attn.proj.bias": (hidden,),
            b + "norm2.weight": (hidden,),
            b + "mlp.w12.weight": (2 * mlp, hidden),
            b + "mlp.w12.bias": (2 * mlp,),
            b + "mlp.w3.weight": (hidden, mlp),
            b + "mlp.w3.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
            b + "adaLN_modulation.1.bias": (6 * hidden,),
        }
        if qknorm:
            out |= {b + "attn.q_norm.weight": (hd,), b + "attn.k_norm.weight": (hd,)}
    out |= {
        "final_layer.norm_final.weight": (hidden,),
        "final_layer.linear.weight": (patch * patch * in_channels, hidden),
        "final_layer.linear.bias": (patch * patch * in_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    return out


def _skip(k: str) -> bool:
    return k.endswith(UPSTREAM_CONSTANTS)


@pytest.mark.parametrize("preset,qknorm", [("pae_lightningdit_xl1_80ep", False), ("pae_lightningdit_xl1_800ep", True),
                                           ("pae_lightningdit_xl1_800ep_sde", True)])
def test_paper_size_layout_loads_strictly_on_meta(preset, qknorm):
    """Every key and shape of the authors' XL/1 checkpoint (80 epochs: no qk norm; 800 epochs: q_norm / k_norm)."""
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    assert cfg.model.use_qknorm is qknorm
    model = generator_from_config(cfg.model, device="meta")
    layout = authors_lightningdit_layout(28, 1152, 16, 32, 16, qknorm)
    assert sum(k.endswith(("q_norm.weight", "k_norm.weight")) for k in layout) == (56 if qknorm else 0)
    load_into(model, {k: torch.empty(s, device="meta") for k, s in layout.items()}, strict=True, skip=_skip)
    other = authors_lightningdit_layout(28, 1152, 16, 32, 16, not qknorm)
    with pytest.raises(WeightsError, match="unexpected 56: .*q_norm" if not qknorm else "missing 56: .*q_norm"):
        load_into(model, {k: torch.empty(s, device="meta") for k, s in other.items()}, strict=True, skip=_skip)


def test_800ep_checkpoint_values_load_into_the_preset_model(tmp_path):
    """A small model built from the 800-epoch preset (only the sizes changed) takes a random checkpoint in the
    authors' layout (``{"model": ...}`` with DDP / compile prefixes) value for value, q_norm / k_norm included."""
    cfg = load_config(CONFIGS / "pae_lightningdit_xl1_800ep.yaml")
    small = dataclasses.replace(cfg.model, depth=2, hidden_size=64, num_heads=4, input_size=4, num_classes=5)
    model = generator_from_config(small)
    layout = authors_lightningdit_layout(2, 64, 4, 32, 4, qknorm=True, num_classes=5)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in layout.items()}
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pt")
    load_generator_weights(model, str(tmp_path / "ckpt.pt"), prefer=("model",))
    got = model.state_dict()
    for k, v in state.items():
        if not _skip(k):
            assert torch.equal(got[k], v), k
    assert torch.equal(got["blocks.1.attn.k_norm.weight"], state["blocks.1.attn.k_norm.weight"])

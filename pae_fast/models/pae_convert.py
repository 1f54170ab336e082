"""The PAE and RAE authors' released tokenizer checkpoints -> pae_fast modules, by name, strictly.

Their layout (facts in docs/method.md §PAE tokenizer, from the authors' inference code at commit 51f8fa6):
``encoder.*`` (HF transformers encoders: Dinov2WithRegisters, DINOv3ViT, Siglip vision tower, ViTMAE; MAE under
``encoder.model.``, the others under ``encoder.encoder.``; the final LayerNorm has no affine keys),
``delta_encoder.*`` (the DAM), ``latent_compressor.{0,1}`` (attention, conv), ``latent_decompressor.{0,1}``
(conv, attention) and ``decoder.*`` (an HF ViT-MAE-style decoder with separate query/key/value).

What the conversion changes besides names:
- separate q/k/v projections are concatenated into one ``qkv`` (rows [q; k; v]);
- DINOv2: the CLS position is folded into ``cls_token``; the 37x37 position table is resampled to the encoder's
  grid as transformers does at run time (bicubic, antialias, fp32); ``mask_token`` is dropped (never used);
- DINOv3: ``mask_token`` dropped; the absent k bias stays the encoder's fixed zero;
- SigLIP2: the attention-pooling ``head.*`` is dropped (computed but unused by the authors' encode); a table of
  another grid is resampled as transformers' SigLIP does at run time (bicubic, no antialias; the 256-px encoder's
  16x16 table is kept as is);
- MAE: the 14x14 table is resampled to the grid (bicubic, no antialias, CLS slot kept), as the authors' run time.

Every other key must map; leftovers and gaps are reported with :func:`pae_fast.weights.key_diff`.

RAE's released stage-1 decoder (``model.pt``: the decoder alone, ``decoder_embed.*``, ``decoder_layers.N.*``,
``decoder_norm.*``, ``decoder_pred.*``, ``decoder_pos_embed``, ``trainable_cls_token``) is the same ViT-MAE-style
decoder without the ``decoder.`` prefix: it is converted by the same rules (:func:`convert_authors_rae`), its encoder
comes from the HF checkpoint (:func:`hf_encoder_to_timm`) and its ``stat.pt`` is read by
:func:`pae_fast.weights.read_latent_stats` (docs/method.md § RAE checkpoints). :func:`split_release_folder` finds the
three in one folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from pae_fast.weights import TORCH_SUFFIXES, WeightsError, load_into, read_shapes, strip_prefixes

__all__ = [
    "encoder_family",
    "convert_authors_pae",
    "load_authors_pae",
    "is_authors_pae",
    "is_authors_rae",
    "convert_authors_rae",
    "load_authors_layout",
    "split_release_folder",
    "is_hf_encoder",
    "hf_encoder_to_timm",
]

Tensors = dict[str, torch.Tensor]

# A transformers ViT / ViT-MAE layer's parts -> timm ``Block`` parts (the MAE encoder and the authors' decoder);
# the layer index is group 1 of the layer prefix, so the parts' own groups count from 2.
_HF_VIT_LAYER: list[tuple[str, str]] = [
    (r"layernorm_before\.(.*)", r"norm1.\2"),
    (r"layernorm_after\.(.*)", r"norm2.\2"),
    (r"attention\.output\.dense\.(.*)", r"attn.proj.\2"),
    (r"intermediate\.dense\.(.*)", r"mlp.fc1.\2"),
    (r"output\.dense\.(.*)", r"mlp.fc2.\2"),
]


def _layer_rules(layer: str, parts: list[tuple[str, str]], block: str = r"blocks.\1.") -> list[tuple[str, str]]:
    """Rules for every part of a numbered layer: ``layer`` regex (index = group 1) + part -> ``block`` + template."""
    return [(layer + pattern, block + template) for pattern, template in parts]


_DECODER_LAYER = r"decoder\.decoder_layers\.(\d+)\."

# trainable part: (authors' regex, our template); applied to keys that are not encoder keys
_REST_RULES: list[tuple[str, str]] = [
    (r"delta_encoder\.(.*)", r"dam.\1"),
    (r"latent_compressor\.0\.(.*)", r"projector.attn.\1"),
    (r"latent_compressor\.1\.(.*)", r"projector.conv.\1"),
    (r"latent_decompressor\.0\.(.*)", r"decompressor.conv.\1"),
    (r"latent_decompressor\.1\.(.*)", r"decompressor.attn.\1"),
    (r"decoder\.decoder_pos_embed", r"decoder.pos_embed"),
    (r"decoder\.trainable_cls_token", r"decoder.cls_token"),
    (r"decoder\.decoder_embed\.(.*)", r"decoder.embed.\1"),
    (r"decoder\.decoder_norm\.(.*)", r"decoder.norm.\1"),
    (r"decoder\.decoder_pred\.(.*)", r"decoder.pred.\1"),
    *_layer_rules(_DECODER_LAYER, _HF_VIT_LAYER, r"decoder.blocks.\1."),
]
_DECODER_QKV = _DECODER_LAYER + r"attention\.attention\.(query|key|value)\.(weight|bias)"

# encoder part, relative to the encoder prefix -> relative to vfm.model.; q/k/v handled by _QKV below
_ENCODER_RULES: dict[str, list[tuple[str, str]]] = {
    "dinov2": [
        (r"embeddings\.register_tokens", r"reg_token"),
        (r"embeddings\.patch_embeddings\.projection\.(.*)", r"patch_embed.proj.\1"),
        *_layer_rules(r"encoder\.layer\.(\d+)\.", [
            (r"norm([12])\.(.*)", r"norm\2.\3"),
            (r"attention\.output\.dense\.(.*)", r"attn.proj.\2"),
            (r"layer_scale([12])\.lambda1", r"ls\2.gamma"),
            (r"mlp\.(fc[12])\.(.*)", r"mlp.\2.\3"),
        ]),
    ],
    "dinov3": [
        (r"embeddings\.cls_token", r"cls_token"),
        (r"embeddings\.register_tokens", r"reg_token"),
        (r"embeddings\.patch_embeddings\.(.*)", r"patch_embed.proj.\1"),
        *_layer_rules(r"layer\.(\d+)\.", [
            (r"norm([12])\.(.*)", r"norm\2.\3"),
            (r"attention\.o_proj\.(.*)", r"attn.proj.\2"),
            (r"layer_scale([12])\.lambda1", r"gamma_\2"),
            (r"mlp\.up_proj\.(.*)", r"mlp.fc1.\2"),
            (r"mlp\.down_proj\.(.*)", r"mlp.fc2.\2"),
        ]),
    ],
    "siglip": [
        (r"embeddings\.patch_embedding\.(.*)", r"patch_embed.proj.\1"),
        *_layer_rules(r"encoder\.layers\.(\d+)\.", [
            (r"layer_norm([12])\.(.*)", r"norm\2.\3"),
            (r"self_attn\.out_proj\.(.*)", r"attn.proj.\2"),
            (r"mlp\.(fc[12])\.(.*)", r"mlp.\2.\3"),
        ]),
    ],
    "mae": [
        (r"embeddings\.cls_token", r"cls_token"),
        (r"embeddings\.patch_embeddings\.projection\.(.*)", r"patch_embed.proj.\1"),
        *_layer_rules(r"encoder\.layer\.(\d+)\.", _HF_VIT_LAYER),
    ],
}
# (regex with groups layer, part, kind) per family; part names map to q/k/v
_QKV: dict[str, tuple[str, dict[str, str]]] = {
    "dinov2": (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)",
               {"query": "q", "key": "k", "value": "v"}),
    "dinov3": (r"layer\.(\d+)\.attention\.(q_proj|k_proj|v_proj)\.(weight|bias)",
               {"q_proj": "q", "k_proj": "k", "v_proj": "v"}),
    "siglip": (r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)",
               {"q_proj": "q", "k_proj": "k", "v_proj": "v"}),
    "mae": (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)",
            {"query": "q", "key": "k", "value": "v"}),
}
# keys the authors' state dict holds but their encode never uses
_UNUSED: dict[str, str] = {
    "dinov2": r"embeddings\.mask_token",
    "dinov3": r"embeddings\.mask_token",
    "siglip": r"head\..*",
    "mae": r"$^",
}


def encoder_family(encoder_name: str) -> str:
    """``"DINOv2-L"`` -> ``"dinov2"`` etc.; raises for encoders the authors never released a PAE with."""
    for prefix, fam in (("DINOv2", "dinov2"), ("DINOv3", "dinov3"), ("SigLIP2", "siglip"), ("MAE", "mae")):
        if encoder_name.startswith(prefix):
            return fam
    raise WeightsError(f"no authors' checkpoint layout is known for encoder {encoder_name!r}")


def _encoder_prefix(family: str) -> str:
    return "encoder.model." if family == "mae" else "encoder.encoder."


def _resample_grid(table: torch.Tensor, grid: int, antialias: bool) -> torch.Tensor:
    """``(1, n*n, D)`` -> ``(1, grid*grid, D)``: bicubic on the square grid, align_corners=False, in fp32."""
    n = int(round(table.shape[1] ** 0.5))
    if n * n != table.shape[1]:
        raise WeightsError(f"position table {tuple(table.shape)} is not a square grid")
    if n == grid:
        return table
    D = table.shape[-1]
    x = table.reshape(1, n, n, D).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(table.dtype)


def _apply(rules: list[tuple[str, str]], key: str) -> str | None:
    for pattern, template in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None


def _fuse_qkv(parts: dict[tuple[str, str], dict[str, torch.Tensor]], out: Tensors, target: Callable[[str, str], str],
              what: str, zero_k_bias: bool = False) -> None:
    for (layer, kind), qkv in parts.items():
        if kind == "bias" and zero_k_bias and set(qkv) == {"q", "v"}:  # DINOv3: q/v biases, k fixed at zero
            out[target(layer, "q_bias")] = qkv["q"]
            out[target(layer, "v_bias")] = qkv["v"]
            continue
        if set(qkv) != {"q", "k", "v"}:
            raise WeightsError(f"{what}: layer {layer} {kind} has only {sorted(qkv)} of q, k, v")
        out[target(layer, f"qkv.{kind}")] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)


def convert_authors_pae(state: Mapping[str, torch.Tensor], family: str, grid: int,
                        what: str = "authors' checkpoint") -> tuple[Tensors, list[str]]:
    """Authors' PAE keys -> pae_fast ``PAETokenizer`` keys.

    Args:
        state: the authors' state dict (wrapper prefixes already stripped).
        family: ``dinov2 | dinov3 | siglip | mae`` (:func:`encoder_family`).
        grid: the encoder's token grid side (16 in every paper config).

    Returns:
        ``(converted, leftovers)``: keys of ours, and authors' keys no rule knows (dropped-by-design keys excluded).
    """
    out: Tensors = {}
    leftovers: list[str] = []
    dec_qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    enc_qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    enc_prefix = _encoder_prefix(family)
    qkv_re, qkv_names = _QKV[family]
    for key, t in state.items():
        if key.startswith(enc_prefix):
            k = key[len(enc_prefix):]
            if re.fullmatch(_UNUSED[family], k):
                continue
            if m := re.fullmatch(qkv_re, k):
                enc_qkv.setdefault((m.group(1), m.group(3)), {})[qkv_names[m.group(2)]] = t
            elif family == "dinov2" and k in ("embeddings.cls_token", "embeddings.position_embeddings"):
                continue  # folded below
            elif family == "siglip" and k == "embeddings.position_embedding.weight":
                out["vfm.model.pos_embed"] = _resample_grid(t.unsqueeze(0), grid, antialias=False)
            elif family == "mae" and k == "embeddings.position_embeddings":
                out["vfm.model.pos_embed"] = torch.cat([t[:, :1], _resample_grid(t[:, 1:], grid, False)], dim=1)
            elif (new := _apply(_ENCODER_RULES[family], k)) is not None:
                out["vfm.model." + new] = t
            else:
                leftovers.append(key)
        elif m := re.fullmatch(_DECODER_QKV, key):
            dec_qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)[0]] = t
        elif (new := _apply(_REST_RULES, key)) is not None:
            out[new] = t
        else:
            leftovers.append(key)
    if family == "dinov2" and f"{enc_prefix}embeddings.position_embeddings" in state:
        pos = state[f"{enc_prefix}embeddings.position_embeddings"]  # (1, 1 + n*n, D), slot 0 = CLS position
        out["vfm.model.cls_token"] = state[f"{enc_prefix}embeddings.cls_token"] + pos[:, :1]
        out["vfm.model.pos_embed"] = _resample_grid(pos[:, 1:], grid, antialias=True)
    _fuse_qkv(dec_qkv, out, lambda i, name: f"decoder.blocks.{i}.attn.{name}", what)
    attn_name = "attn"
    _fuse_qkv(enc_qkv, out, lambda i, name: f"vfm.model.blocks.{i}.{attn_name}.{name}", what,
              zero_k_bias=family == "dinov3")
    return out, leftovers


def is_authors_pae(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a (prefix-stripped) state dict is in the authors' PAE layout."""
    return any(k.startswith(("delta_encoder.", "latent_compressor.")) for k in state)


def load_authors_pae(tok: torch.nn.Module, state: Mapping, what: str = "authors' checkpoint",
                     need_vfm: bool = True) -> bool:
    """Convert an authors' checkpoint and load it into a :class:`~pae_fast.models.pae.PAETokenizer`, strictly.

    Args:
        tok: the tokenizer (its encoder decides the family).
        state: the authors' state dict; a ``{"model": ...}`` wrapper and ``module.`` / ``_orig_mod.`` prefixes are
            removed here too.
        need_vfm: the checkpoint must carry the encoder (False when the encoder was loaded from its own file).

    Returns:
        Whether the checkpoint carried the encoder (then loaded from it, replacing any loaded before).

    Raises:
        WeightsError: with the key diff (missing / unexpected / wrong shape, in our names) and any unknown keys.
    """
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    state = strip_prefixes(state)
    if getattr(tok, "kind", None) != "pae":
        raise WeightsError(f"{what} is a PAE checkpoint; {getattr(tok, 'variant', type(tok).__name__)} is not a PAE")
    family = encoder_family(tok.vfm.name)
    converted, leftovers = convert_authors_pae(state, family, tok.vfm.grid_size, what)
    if leftovers:
        more = f" ... (+{len(leftovers) - 12} more)" if len(leftovers) > 12 else ""
        raise WeightsError(f"{what}: {len(leftovers)} keys of the authors' layout have no counterpart in "
                           f"{tok.variant}: {', '.join(leftovers[:12])}{more}")
    has_vfm = any(k.startswith("vfm.") for k in converted)
    if not has_vfm and need_vfm:
        raise WeightsError(f"{what} holds no encoder.* weights; pass the encoder's own file as vfm_weights=")
    load_into(tok, converted, what=what, strict=True, skip=None if has_vfm else (lambda k: k.startswith("vfm.")))
    tok.vfm.freeze()
    return has_vfm


_RAE_DECODER_ROOTS = ("decoder_embed.", "decoder_layers.", "decoder_norm.", "decoder_pred.", "decoder_pos_embed",
                      "trainable_cls_token")


def is_authors_rae(state: Mapping[str, torch.Tensor] | list[str]) -> bool:
    """Whether a (prefix-stripped) state dict, or its keys, is RAE's released stage-1 decoder layout."""
    return any(k.startswith(("decoder_embed.", "decoder_layers.")) for k in state)


def convert_authors_rae(state: Mapping[str, torch.Tensor], what: str = "RAE decoder") -> tuple[Tensors, list[str]]:
    """RAE's decoder keys -> pae_fast ``RAETokenizer`` keys (``decoder.*``): the PAE decoder rules after the prefix.

    Returns:
        ``(converted, leftovers)``: keys of ours, and RAE keys no rule knows (anything that is not the decoder).
    """
    decoder = {f"decoder.{k}": v for k, v in state.items() if k.startswith(_RAE_DECODER_ROOTS)}
    out, leftovers = convert_authors_pae(decoder, "dinov2", 16, what)  # no encoder keys: family and grid unused
    return out, leftovers + [k for k in state if not k.startswith(_RAE_DECODER_ROOTS)]


def load_authors_layout(tok: torch.nn.Module, state: Mapping, what: str, need_vfm: bool = True) -> bool | None:
    """Load a state dict in one of the authors' layouts (PAE checkpoint, RAE decoder) into ``tok``, strictly.

    Returns:
        None when ``state`` is in neither layout (the caller loads it as ours); otherwise whether it carried the
        encoder (an RAE decoder never does).

    Raises:
        WeightsError: the layout does not fit ``tok`` (key diff in our names), or the encoder is missing.
    """
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    state = strip_prefixes(state)
    if is_authors_pae(state):
        return load_authors_pae(tok, state, what=what, need_vfm=need_vfm)
    if not is_authors_rae(state):
        return None
    if getattr(tok, "kind", None) != "rae":
        raise WeightsError(f"{what} is RAE's released decoder; {getattr(tok, 'variant', type(tok).__name__)} is not "
                           "an RAE tokenizer")
    if need_vfm:
        raise WeightsError(f"{what} is RAE's decoder alone; pass the encoder's own file (e.g. the HF "
                           "dinov2-with-registers-base checkpoint) as vfm_weights=")
    converted, leftovers = convert_authors_rae(state, what)
    if leftovers:
        more = f" ... (+{len(leftovers) - 12} more)" if len(leftovers) > 12 else ""
        raise WeightsError(f"{what}: {len(leftovers)} keys of RAE's decoder layout have no counterpart in "
                           f"{tok.variant}: {', '.join(leftovers[:12])}{more}")
    load_into(tok, converted, what=what, strict=True, skip=lambda k: k.startswith("vfm."))
    return False


_STATS_KEYS = {"mean", "var", "std"}


def split_release_folder(folder: str | os.PathLike, what: str = "weights") -> dict[str, Path]:
    """The files of a folder of released tokenizer files, by what they hold (their keys, not their names).

    The folder (not a checkpoint or run folder) holds, at its top level: the tokenizer weights (an RAE decoder, a PAE
    checkpoint or ours), optionally the encoder (a transformers or timm checkpoint: ``model.safetensors``, ...) and
    optionally latent statistics (RAE's ``stat.pt`` or our ``stats.safetensors``).

    Returns:
        ``{"weights": file, "vfm_weights"?: file, "latent_stats"?: file}``.

    Raises:
        WeightsError: no tokenizer weights, or two files of one kind (the message lists them).
    """
    root = Path(folder)
    found: dict[str, list[Path]] = {"weights": [], "vfm_weights": [], "latent_stats": []}
    for f in sorted(root.iterdir()):
        if not f.is_file() or f.suffix not in (".safetensors", *TORCH_SUFFIXES):
            continue
        keys = read_shapes(f, key=what)
        if keys and set(keys) <= _STATS_KEYS and "mean" in keys:
            found["latent_stats"].append(f)
        elif is_authors_rae(keys) or is_authors_pae(keys) or any(k.startswith(("decoder.", "vfm.")) for k in keys):
            found["weights"].append(f)
        else:
            found["vfm_weights"].append(f)
    doubles = {k: v for k, v in found.items() if len(v) > 1}
    if doubles:
        shown = "; ".join(f"{k}: {', '.join(p.name for p in v)}" for k, v in doubles.items())
        raise WeightsError(f"{what}={str(folder)!r}: more than one file of a kind ({shown}); pass them one by one "
                           "(weights=, vfm_weights=, latent_stats=)")
    if not found["weights"]:
        names = ", ".join(p.name for v in found.values() for p in v) or "none"
        raise WeightsError(f"{what}={str(folder)!r}: no tokenizer weights (decoder) among its files ({names})")
    return {k: v[0] for k, v in found.items() if v}


# transformers checkpoints of the encoders alone: their roots, and the parts a frozen patch-token encoder never uses
_HF_ROOTS = ("vision_model.", "vit.")  # SiglipModel / ViTMAEForPreTraining wrap the vision tower
_HF_FINAL_LN = ("layernorm.weight", "layernorm.bias", "norm.weight", "norm.bias", "post_layernorm.weight",
                "post_layernorm.bias")


def is_hf_encoder(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether an encoder state dict is in transformers' layout (timm's keys never start like these)."""
    return any(k.startswith(("embeddings.", "encoder.layer", "layer.", *_HF_ROOTS)) for k in state)


def hf_encoder_to_timm(state: Mapping[str, torch.Tensor], encoder_name: str, grid: int,
                       what: str = "encoder weights") -> Tensors:
    """A transformers encoder checkpoint -> timm keys of our :class:`~pae_fast.models.vfm.FrozenVFM` model.

    The final LayerNorm's affine is dropped (the PAE/RAE encoders apply it without), as are the parts outside the
    vision tower (SigLIP's text model, ViT-MAE's decoder) and the unused keys listed in :data:`_UNUSED`.
    """
    family = encoder_family(encoder_name)
    keys = list(state)
    root = next((r for r in _HF_ROOTS if any(k.startswith(r) for k in keys)), "")
    tower = {k[len(root):]: v for k, v in state.items() if k.startswith(root)}
    tower = {k: v for k, v in tower.items() if k not in _HF_FINAL_LN}
    prefix = _encoder_prefix(family)
    out, leftovers = convert_authors_pae({prefix + k: v for k, v in tower.items()}, family, grid, what)
    if leftovers:
        more = f" ... (+{len(leftovers) - 12} more)" if len(leftovers) > 12 else ""
        shown = ", ".join(k[len(prefix):] for k in leftovers[:12])
        raise WeightsError(f"{what}: {len(leftovers)} keys of the transformers {family} layout have no counterpart in "
                           f"encoder {encoder_name}: {shown}{more}")
    return {k[len("vfm.model."):]: v for k, v in out.items()}

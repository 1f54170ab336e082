"""The tokenizer API shared by PAE and RAE, and the loading rules behind ``create_tokenizer``.

Every tokenizer is an ``nn.Module`` with:

- ``image_size`` (S), ``latent_shape`` ``(C, H, W)``, ``kind`` (``"pae" | "rae"``), ``stats_mode`` (``"channel"``
  for PAE, ``"chw"`` for RAE: the mode of ``pae_fast.data.latent_stats``), ``vfm_dim`` (D), ``mean`` / ``std``
  (the VFM input normalisation, also the decoder's output space);
- ``vfm``: the frozen encoder (:class:`~pae_fast.models.vfm.FrozenVFM`, eval mode, no grad, always, except in the
  ``finetune_vfm`` ablation: docs/method.md § DAM fusion ablation);
- ``encode(images) -> z``, ``decode(z) -> images``, ``encode_features(images) -> TokenizerFeatures``,
  ``decode_tokens``; ``last_decoder_layer`` (the pixel ``nn.Linear`` of the decoder, for the GAN's adaptive
  weight); ``trainable_parameters()`` (all but the frozen VFM; the fixed position tables are buffers).

``decode`` returns the decoder output mapped back to [0, 1] pixel space but NOT clamped (as the authors' code);
:func:`to_image_range` clamps for display or saving.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from pae_fast.models.vfm import FrozenVFM
from pae_fast.registry import register_tokenizer
from pae_fast.weights import WeightsError, is_release_folder, load_into, read_latent_stats, read_state_dict

__all__ = [
    "TokenizerFeatures",
    "Tokenizer",
    "to_image_range",
    "load_tokenizer_weights",
    "register_tokenizer_variants",
    "describe_tokenizer",
]

log = logging.getLogger(__name__)


class TokenizerFeatures(NamedTuple):
    """What ``encode_features`` returns.

    Attributes:
        z: ``(B, C, H, W)`` the latent (PAE: RMS-normalised tokens; RAE: raw VFM tokens as a map).
        vfm_tokens: ``(B, N, D)`` frozen VFM patch tokens after the affine-free final LayerNorm (the DAM's input).
        pixels: ``(B, 3, S_vfm, S_vfm)`` the resized, normalised image both the VFM and the DAM saw.
        dam_tokens: ``(B, N, D)`` the DAM output ``H_z`` (PAE), None for RAE.
        logvar: ``(B, C, H, W)`` the latent's log-variance (the KL ablation's ``*-kl`` variants), else None.
    """

    z: torch.Tensor
    vfm_tokens: torch.Tensor
    pixels: torch.Tensor
    dam_tokens: torch.Tensor | None = None
    logvar: torch.Tensor | None = None


def to_image_range(images: torch.Tensor) -> torch.Tensor:
    """Clamp decoded images to [0, 1] (for display, saving and image metrics; training losses use the raw output)."""
    return images.clamp(0.0, 1.0)


class Tokenizer(nn.Module, abc.ABC):
    """Base of PAE and RAE: the frozen VFM, pixel (de)normalisation, freezing and the parameter split."""

    kind: str = ""
    stats_mode: str = ""

    def __init__(self, vfm: FrozenVFM, image_size: int, latent_shape: tuple[int, int, int], variant: str) -> None:
        super().__init__()
        self.vfm = vfm
        self.image_size = int(image_size)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.variant = variant
        self.vfm_dim = vfm.embed_dim
        self.mean = tuple(float(m) for m in vfm.spec.mean)
        self.std = tuple(float(s) for s in vfm.spec.std)
        self.latent_stats: Any = None  # LatentStats of a released run (create_tokenizer(latent_stats=...)) or None

    # -- modes and parameters ---------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> Tokenizer:
        super().train(mode)
        self.vfm.freeze()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the frozen VFM's (position tables are buffers, so never included)."""
        return [p for n, p in self.named_parameters() if not n.startswith("vfm.")]

    @property
    def last_decoder_layer(self) -> nn.Linear:
        """The decoder's final pixel projection (its weight drives the GAN's adaptive weight)."""
        return self.decoder.pred

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the weights (bf16 under the engine's ``train.precision=bf16`` compute copy, else fp32): the
        API casts images and latents to it on the way in (fixed tables are buffers and follow the activations)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    # -- pixels ------------------------------------------------------------------------------------------------------

    def check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.variant}: images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")

    def check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"{self.variant}: latents must be (B, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(z.shape)}")

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output (encoder-normalised space) -> [0, 1] pixel space, ``x * std + mean`` (no clamp)."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x * std + mean

    # -- the API -----------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def encode_features(self, images: torch.Tensor) -> TokenizerFeatures:
        """``(B, 3, S, S)`` images in [0, 1] -> the latent and the intermediate features (each tokenizer's own)."""

    @abc.abstractmethod
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, C, H, W)`` -> decoder output in the encoder-normalised pixel space (each tokenizer's own)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` images in [0, 1] -> latent ``(B, C, H, W)``."""
        return self.encode_features(images).z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, C, H, W)`` -> images ``(B, 3, S, S)``, nominally in [0, 1] (not clamped)."""
        self.check_latent(z)
        return self.denormalize(self.decode_tokens(z.to(self.compute_dtype)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(images))``."""
        return self.decode(self.encode(images))


def load_tokenizer_weights(
    tok: Tokenizer,
    pretrained: bool,
    weights: str | os.PathLike | None,
    vfm_weights: str | os.PathLike | None,
    latent_stats: str | os.PathLike | None = None,
    prefer: tuple[str, ...] = ("ema", "model"),
) -> Tokenizer:
    """Fill a freshly built tokenizer per the ``create_tokenizer`` contract (local or cached files only, strict).

    - ``vfm_weights``: an encoder file (timm or transformers layout) loaded into ``tok.vfm``.
    - ``weights``: a pae_fast tokenizer state dict (keys of ``tok.state_dict()``), the PAE authors' released
      checkpoint (``delta_encoder.`` keys) or RAE's released decoder (``decoder_layers.`` keys), the latter two
      converted by :mod:`pae_fast.models.pae_convert`; or a folder of released files (decoder, encoder, latent
      statistics: :func:`~pae_fast.models.pae_convert.split_release_folder`). When it has no encoder keys the
      encoder must come from ``vfm_weights``.
    - ``latent_stats``: the statistics the released run standardises with (RAE's ``stat.pt`` or a
      ``stats.safetensors``), kept as ``tok.latent_stats`` (:class:`~pae_fast.data.latent_stats.LatentStats`).
    - Any of these may be ``hf://<org>/<name>/<path-in-repo>`` (:func:`pae_fast.weights.resolve_hub_file`).
    - none: random initialisation, allowed only with ``pretrained=False`` and logged.

    ``prefer``: in a checkpoint folder or a torch file holding several state dicts, which to take
    (:func:`pae_fast.weights.read_state_dict`).
    """
    name = tok.variant
    if weights is not None and is_release_folder(weights):
        from pae_fast.models.pae_convert import split_release_folder

        files = split_release_folder(weights, what=f"tokenizer {name} weights")
        log.info("tokenizer %s: release folder %s: %s", name, weights,
                 ", ".join(f"{k}={v.name}" for k, v in files.items()))
        weights = files["weights"]
        vfm_weights = vfm_weights if vfm_weights is not None else files.get("vfm_weights")
        latent_stats = latent_stats if latent_stats is not None else files.get("latent_stats")
    if latent_stats is not None:
        tok.latent_stats = _tokenizer_stats(tok, latent_stats)
    if pretrained and weights is None and vfm_weights is None:
        raise WeightsError(f"tokenizer {name}: pretrained=True needs weights= and/or vfm_weights= (local files); "
                           "nothing is downloaded")
    if vfm_weights is not None:
        state, _ = read_state_dict(vfm_weights, key=f"tokenizer {name} vfm_weights")
        tok.vfm.load_encoder_state(state, what=f"vfm_weights={str(vfm_weights)!r}")
    if weights is None:  # the constructor built everything at random (silently: this is the one message)
        if vfm_weights is not None:
            log.warning("tokenizer %s: encoder weights loaded from %s; the rest is a random initialisation "
                        "(pretrained=%s, no weights file)", name, vfm_weights, pretrained)
        else:
            log.warning("tokenizer %s: random initialisation of every part, encoder included (pretrained=%s, no "
                        "weights file)", name, pretrained)
        return tok
    state, _ = read_state_dict(weights, prefer=prefer, key=f"tokenizer {name} weights")
    what = f"tokenizer {name} weights={str(weights)!r}"
    from pae_fast.models.pae_convert import load_authors_layout

    has_vfm = load_authors_layout(tok, state, what=what, need_vfm=vfm_weights is None)
    if has_vfm is None:  # our own layout
        has_vfm = any(k.startswith("vfm.") for k in state)
        if not has_vfm and vfm_weights is None:
            raise WeightsError(f"{what} holds no encoder (vfm.*) weights; pass vfm_weights= as well")
        load_into(tok, state, what=what, strict=True, skip=None if has_vfm else (lambda k: k.startswith("vfm.")))
    tok.vfm.freeze()
    if has_vfm and vfm_weights is not None:
        log.info("tokenizer %s: weights loaded from %s, encoder included (its weights replace those of "
                 "vfm_weights=%s)", name, weights, vfm_weights)
    else:
        log.info("tokenizer %s: weights loaded from %s, encoder %s", name, weights,
                 "included" if has_vfm else f"from {vfm_weights}")
    return tok


def _tokenizer_stats(tok: Tokenizer, path: str | os.PathLike) -> Any:
    """The latent statistics at ``path``, checked against the tokenizer's latent shape and statistics mode."""
    stats = read_latent_stats(path, key=f"tokenizer {tok.variant} latent_stats")
    if stats.mode != tok.stats_mode:
        raise WeightsError(f"tokenizer {tok.variant} latent_stats={str(path)!r}: {stats.mode!r} statistics, but "
                           f"{tok.variant} standardises per {tok.stats_mode!r}")
    try:
        stats.check_fits(torch.zeros(1, *tok.latent_shape), what=f"{tok.variant} latents")
    except ValueError as e:
        raise WeightsError(f"tokenizer {tok.variant} latent_stats={str(path)!r}: {e}") from e
    return stats


def register_tokenizer_variants(cls: type[Tokenizer], variants: Mapping[str, Mapping[str, Any]]) -> None:
    """Register every entry of a tokenizer family's variant table (name -> constructor defaults).

    Each name becomes ``create_tokenizer(name, pretrained=False, weights=None, vfm_weights=None, latent_stats=None,
    **overrides)``:
    ``cls(**defaults, **overrides, variant=name)`` filled by :func:`load_tokenizer_weights`.
    """
    for variant, defaults in variants.items():
        register_tokenizer(variant, _variant_builder(cls, variant, dict(defaults)))


def _variant_builder(cls: type[Tokenizer], variant: str, defaults: dict[str, Any]) -> Any:
    def make(pretrained: bool = False, weights: str | os.PathLike | None = None,
             vfm_weights: str | os.PathLike | None = None, latent_stats: str | os.PathLike | None = None,
             prefer: tuple[str, ...] = ("ema", "model"), **overrides: Any) -> Tokenizer:
        tok = cls(**{**defaults, **overrides, "variant": variant})
        return load_tokenizer_weights(tok, pretrained, weights, vfm_weights, latent_stats, prefer)

    make.__name__ = f"tokenizer_{variant}"
    return make


def describe_tokenizer(name: str, **overrides) -> str:
    """A few lines for ``python -m pae_fast info --tokenizer NAME``: parameters, latent shape, GMAC per image.

    Built on the meta device (no memory, no weights); MACs are counted like the generators'
    (:func:`pae_fast.models.profile.forward_gmacs`: matmuls, convolutions and attention products, reference ops).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from pae_fast.kernels import use_backend
    from pae_fast.registry import create_tokenizer

    quiet = logging.getLogger("pae_fast.models")  # a meta build is random by construction: no warning for it
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            tok = create_tokenizer(name, **overrides)
    finally:
        quiet.setLevel(level)
    frozen = sum(p.numel() for p in tok.vfm.parameters())
    trainable = sum(p.numel() for p in tok.trainable_parameters())
    x = torch.zeros(1, 3, tok.image_size, tok.image_size, device="meta")
    z = torch.zeros(1, *tok.latent_shape, device="meta")
    gmac = {}
    for what, fn, arg in (("encode", tok.encode, x), ("decode", tok.decode, z)):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), use_backend("torch"), counter:
            fn(arg)
        gmac[what] = counter.get_total_flops() / 2 / 1e9
    C, H, W = tok.latent_shape
    return "\n".join([
        f"{name} ({tok.kind.upper()}, encoder {tok.vfm.name}, {tok.vfm.input_size}px input, "
        f"patch {tok.vfm.patch_size})",
        f"  image               {tok.image_size}x{tok.image_size}",
        f"  latent              {C}x{H}x{W} ({C * H * W:,} values; statistics mode {tok.stats_mode!r})",
        f"  frozen parameters   {frozen:,} ({frozen / 1e6:.2f}M, the VFM)",
        f"  trainable params    {trainable:,} ({trainable / 1e6:.2f}M)",
        f"  encode GMAC/image   {gmac['encode']:.2f}",
        f"  decode GMAC/image   {gmac['decode']:.2f}",
    ])

"""RAE, the Representation AutoEncoder baseline (docs/method.md §RAE baseline).

The latent is the frozen VFM's own patch tokens (affine-free final LayerNorm, no compression) laid out as a map
``(B, D, g, g)``; a ViT decoder (XL by default) maps them back to pixels. ``encode`` returns the RAW tokens: the
per-(C, H, W) standardisation used for diffusion (eps 1e-5) lives in ``pae_fast.data.latent_stats`` (mode "chw"),
never in the model.

RAE's released files load by name (docs/method.md § RAE checkpoints): ``create_tokenizer("RAE-DINOv2-B",
weights=<RAE decoder model.pt>, vfm_weights=<HF dinov2-with-registers-base>, latent_stats=<stat.pt>)`` or one folder
holding the three; the decoder layout is converted by :func:`pae_fast.models.pae_convert.convert_authors_rae`, and
``stat.pt`` (``mean`` / ``var``, standardisation ``(z - mean) / sqrt(var + 1e-5)``) becomes ``tok.latent_stats``.
"""

from __future__ import annotations

from typing import Any

import torch

from pae_fast.models.decoder import decoder_for
from pae_fast.models.tokenizer import Tokenizer, TokenizerFeatures, register_tokenizer_variants
from pae_fast.models.vfm import build_vfm

__all__ = ["RAETokenizer", "RAE_VARIANTS"]


class RAETokenizer(Tokenizer):
    """Frozen encoder + ViT decoder; ``latent_shape = (D, g, g)``.

    Args:
        encoder: a registered encoder name.
        image_size: S of the images ``encode`` takes and ``decode`` returns.
        decoder: decoder size name (``"B" | "L" | "XL"``) or ``(hidden, depth, heads, mlp_hidden)``.
        variant: the registered name.
    """

    kind = "rae"
    stats_mode = "chw"

    def __init__(self, encoder: str, image_size: int = 256, decoder: str | tuple | list = "XL",
                 variant: str = "RAE") -> None:
        vfm = build_vfm(encoder, log_random=False)  # load_tokenizer_weights logs what it gets
        g = vfm.grid_size
        super().__init__(vfm, image_size, (vfm.embed_dim, g, g), variant)
        self.arch = dict(encoder=encoder, image_size=image_size, decoder=decoder, variant=variant)
        self.decoder = decoder_for(vfm, vfm.embed_dim, image_size, decoder)

    def encode_features(self, images: torch.Tensor) -> TokenizerFeatures:
        """``(B, 3, H, W)`` in [0, 1] -> z = raw VFM tokens as ``(B, D, g, g)``, the tokens ``(B, N, D)``, pixels."""
        self.check_images(images)
        pixels = self.vfm.preprocess(images.to(self.compute_dtype))
        u = self.vfm.tokens(pixels)  # (B, N, D)
        B, N, D = u.shape
        g = self.latent_shape[1]
        return TokenizerFeatures(u.transpose(1, 2).reshape(B, D, g, g), u, pixels, None)

    def decode_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, D, g, g)`` -> decoder output ``(B, 3, S, S)`` in the encoder's normalised pixel space."""
        return self.decoder(z.flatten(2).transpose(1, 2))


RAE_VARIANTS: dict[str, dict[str, Any]] = {
    "RAE-DINOv2-B": dict(encoder="DINOv2-B"),
    "RAE-SigLIP2-B": dict(encoder="SigLIP2-B"),
    "RAE-MAE-B": dict(encoder="MAE-B"),
    "RAE-tiny": dict(encoder="ViT-tiny", image_size=64, decoder=(128, 2, 4, 512)),
}


register_tokenizer_variants(RAETokenizer, RAE_VARIANTS)

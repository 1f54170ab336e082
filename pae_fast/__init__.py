"""pae_fast: Prior-Aligned Autoencoders for latent diffusion on fused Triton kernels.

Importing the package is cheap and side-effect free; models, kernels and torch load on first use.
"""

from pae_fast.registry import (
    create_encoder,
    create_generator,
    create_tokenizer,
    list_encoders,
    list_generators,
    list_tokenizers,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create_encoder",
    "create_generator",
    "create_tokenizer",
    "list_encoders",
    "list_generators",
    "list_tokenizers",
]

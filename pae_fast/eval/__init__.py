"""Evaluation: generation metrics, tokenizer metrics and latent diffusability (SPEC section 5)."""

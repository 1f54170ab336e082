"""Losses of the tokenizer and of prior refinement (docs/method.md §Tokenizer losses, §Refined priors).

One concept per module (import them directly; nothing is imported here):

- ``recon``: L1, LPIPS configuration (``lpips_weights: none`` = off);
- ``diffaug``: differentiable augmentation for the discriminator;
- ``gan``: hinge (D) / non-saturating (G) losses, adaptive weight, start steps;
- ``ssr`` / ``mcr`` / ``scr``: the three prior regularizers (fused Gram and sphere-perturbation kernels);
- ``noise_aug``: RAE noise-augmented decoding;
- ``total``: :class:`~pae_fast.losses.total.TokenizerLoss`, the whole generator / discriminator objective;
- ``refine``: the stage-0 refinement loss and the SSR / SCR targets (refined or raw priors).
"""

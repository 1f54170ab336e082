"""The effective strength of each prior regularizer: its gradient at the latent relative to the reconstruction's
(docs/method.md § Tokenizer training).

    share_k = || d(lambda_k L_k) / dz || / || d L_rec / dz ||      k in (ssr, mcr, scr),  L_rec = l1 L1 + l_lpips LPIPS

Norms are over the whole ``(B, C, h, w)`` latent of the batch (both losses are batch means, so the ratio does not
depend on the batch size). ``L_rec`` is the reconstruction term the GAN's adaptive weight balances against (the GAN
term is left out: it starts late and its weight adapts). Each share is one extra ``torch.autograd.grad`` w.r.t. z
only (no parameter gradients): SSR and SCR backpropagate through their loss heads only; ``L_rec`` and MCR through
the decoder (and LPIPS) once each. The tokenizer task computes them on logged steps only
(:func:`pae_fast.engine.runtime.is_log_step`), so they cost nothing on the other steps.
"""

from __future__ import annotations

import torch

__all__ = ["SHARED_TERMS", "gradient_shares"]

# the regularizers whose gradient share is logged, in the loss's term names (a new regularizer adds its name here)
SHARED_TERMS = ("ssr", "mcr", "scr")


def gradient_shares(z: torch.Tensor, reference: torch.Tensor, weighted: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:  # fmt: skip
    """``{"grad_share/<name>": ||d weighted[name] / dz|| / ||d reference / dz||}`` (0-dim fp32, detached).

    Args:
        z: ``(B, C, h, w)`` latent that requires grad (the graph of every loss below runs through it).
        reference: 0-dim reconstruction loss ``L_rec`` (weighted as in the objective).
        weighted: 0-dim weighted regularizer losses ``lambda_k L_k`` by name.
    Returns:
        one entry per name; a regularizer that does not depend on z has share 0. The graph is kept (the training
        step's backward still runs on it).
    """
    if not z.requires_grad:
        raise ValueError("gradient_shares: the latent z does not require grad (nothing trainable before it)")
    (g_ref,) = torch.autograd.grad(reference, z, retain_graph=True)
    ref_norm = g_ref.float().norm()
    out = {}
    for name, loss in weighted.items():
        (g,) = torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)
        norm = g.float().norm() if g is not None else ref_norm.new_zeros(())
        out[f"grad_share/{name}"] = (norm / ref_norm).detach()
    return out

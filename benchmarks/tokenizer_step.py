"""One full tokenizer training step, assembled as ``train-tokenizer`` assembles it, for the benchmarks.

:func:`build_step` builds the stage's own pieces (:class:`pae_fast.stages.tokenizer_task.TokenizerTrainModule`, the
discriminator loss of :func:`pae_fast.stages.tokenizer_task.disc_unit_loss_fn`, :class:`TokenizerLoss`) from a
preset, with RANDOM weights everywhere (timing and traffic only: LPIPS, the discriminator's frozen backbone and the
refined projector have the real shapes, not the real values), on any device including ``meta``. One step
(:func:`step_losses`) = generator side (frozen VFM forward, DAM, projector, the reconstruction + two MCR decoder
passes as one batch, LPIPS, the GAN generator term with its adaptive weight, SSR / MCR / SCR, refined targets)
+ backward, then the discriminator side (two passes) + backward. Optimizer and EMA steps are the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def preset_for(name: str) -> Path:
    """The preset whose recipe a tokenizer name is benchmarked with."""
    if "tiny" in name:
        return CONFIGS / "tokenizer_tiny_cpu.yaml"
    if name.startswith("RAE"):
        return CONFIGS / "rae_tokenizer_dinov2b.yaml"
    return CONFIGS / "pae_tokenizer_dinov2l_d32.yaml"


@dataclass
class StepParts:
    model: nn.Module  # TokenizerTrainModule (state dict = the tokenizer's)
    disc: nn.Module | None
    gen_loss: Any
    disc_loss: Any
    cfg: Any  # the TokenizerConfig used
    image_size: int

    def trainable_params(self) -> int:
        n = sum(p.numel() for p in self.model.tok.trainable_parameters())
        if self.disc is not None:
            n += sum(p.numel() for p in self.disc.trainable_parameters())
        return n


def build_step(name: str, device: torch.device | str = "cpu", lpips: bool = True, gan: bool = True,
               **tokenizer_overrides: Any) -> StepParts:
    """The stage's modules for tokenizer ``name`` with random weights (see the module docstring).

    Args:
        name: a registered tokenizer.
        device: where to build (``meta`` counts without memory).
        lpips: include the LPIPS term (random VGG-16 + heads).
        gan: include the GAN terms (random frozen discriminator features), both active from step 0.
        tokenizer_overrides: further ``tokenizer.*`` values (e.g. ``mcr=False``).
    """
    import dataclasses

    from pae_fast.config import load_config
    from pae_fast.engine.task import Shared
    from pae_fast.losses.lpips import LPIPS
    from pae_fast.losses.total import TokenizerLoss, term_on
    from pae_fast.models.discriminator import create_discriminator
    from pae_fast.models.refine import PriorProjector
    from pae_fast.registry import create_tokenizer
    from pae_fast.stages.tokenizer_task import TokenizerTrainModule, disc_unit_loss_fn, tokenizer_loss_fn

    t = load_config(preset_for(name)).tokenizer
    over = {"name": name, "gan_start_step": 0, "disc_start_step": 0, "disc_weights": "random",
            "lambda_gan": (t.lambda_gan or 0.5) if gan else 0.0, "lpips_weights": None if lpips else "none"}
    t = dataclasses.replace(t, **{**over, **tokenizer_overrides})
    dev = torch.device(device)
    with dev:
        tok = create_tokenizer(name)
        # the loss's copy as train-tokenizer makes it: channels-last, fp32 (autocast) or bf16 (the count converts it)
        lp = LPIPS("vgg").to_compute_dtype(torch.float32) if lpips else None
        disc = create_discriminator(t) if gan else None
        needs = term_on(t, "ssr") or term_on(t, "scr")
        projector = None
        if needs and tok.kind == "pae":
            projector = PriorProjector(tok.vfm_dim, tok.latent_shape[0], tok.vfm.num_heads).eval().requires_grad_(False)
            t = dataclasses.replace(t, priors="refined")
    loss = TokenizerLoss(t, lp, disc)
    shared = Shared(loss=loss, projector=projector, raw_projection=None, seed=0, recons=[],
                    has_disc=disc is not None, status={}, announced=True)
    model = TokenizerTrainModule(tok, shared).to(dev).train()
    return StepParts(model, disc, tokenizer_loss_fn(shared), disc_unit_loss_fn(shared) if gan else None, t,
                     tok.image_size)


def step_losses(parts: StepParts, images: torch.Tensor, step: int = 0, autocast: torch.dtype | None = None,
                model: nn.Module | None = None, disc: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Forward + backward of both sides of one step on ``images (B, 3, S, S)``; returns the loss terms.

    ``model`` / ``disc``: the modules the two units run (the engine's compute copies; default: ``parts``')."""
    import contextlib

    def amp() -> contextlib.AbstractContextManager:
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(images.device.type, dtype=autocast)

    with amp():
        loss, terms = parts.gen_loss(parts.model if model is None else model, (images,), step)
    loss.float().backward()
    if parts.disc is not None:
        with amp():
            d_loss, d_terms = parts.disc_loss(parts.disc if disc is None else disc, (images,), step)
        d_loss.float().backward()
        terms = {**terms, **{f"disc/{k}": v for k, v in d_terms.items()}, "disc/loss": d_loss.detach()}
    return terms

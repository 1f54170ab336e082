"""The tokenizer training task for the shared engine (docs/method.md § Tokenizer training).

- :class:`TokenizerTrainModule` is what the engine optimises, wraps (DDP) and averages (EMA): it registers the
  tokenizer's own sub-modules under their own names, so its ``state_dict`` IS the tokenizer's and every checkpoint's
  ``model`` / ``ema.safetensors`` loads with ``create_tokenizer(name, weights=<run folder>)``. Its ``forward`` runs
  the whole generator-side loss (frozen VFM, DAM, projector, the concatenated decoder passes, LPIPS, the GAN's
  generator term, SSR / MCR / SCR), so DDP sees one forward per micro-batch. The frozen helpers (loss modules,
  prior projector, raw projection) live in a :class:`~pae_fast.engine.task.Shared` holder: not in the
  state dict, not copied by the EMA. The MCR noise of each (step, rank) is seeded by
  :func:`~pae_fast.losses.mcr.mcr_step_seed` (distinct at any world size, the same again after a resume).
- The discriminator is the engine's ``extra_optimized["disc"]`` (own optimizer and schedule): its loss,
  :meth:`~pae_fast.losses.total.TokenizerLoss.discriminator_loss` (the only implementation), reads the detached
  reconstructions the generator pass of the same micro-batches left in the holder.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pae_fast.engine.task import Shared
from pae_fast.losses.mcr import mcr_step_seed

log = logging.getLogger("pae_fast.train.tokenizer")

__all__ = ["TokenizerTrainModule", "tokenizer_loss_fn", "disc_unit_loss_fn"]


class TokenizerTrainModule(nn.Module):
    """The trained tokenizer plus its loss, with the tokenizer's exact state-dict keys.

    Args:
        tok: the tokenizer (its VFM frozen).
        shared: holder with ``loss`` (:class:`~pae_fast.losses.total.TokenizerLoss`, which holds the tokenizer
            config), ``projector`` (frozen ``P_t`` or None), ``raw_projection`` (or None), ``seed`` (int),
            ``recons`` (list), optionally ``train`` (the TrainConfig whose logged steps get gradient shares).
    """

    def __init__(self, tok: nn.Module, shared: Shared) -> None:
        super().__init__()
        own = [n for n, _ in tok.named_parameters(recurse=False)] + [n for n, _ in tok.named_buffers(recurse=False)]
        if own:
            raise ValueError(f"TokenizerTrainModule: {type(tok).__name__} holds tensors outside sub-modules: {own}")
        for name, child in tok.named_children():
            self.add_module(name, child)
        self.__dict__["tok"] = tok  # not a registered child: the keys stay the tokenizer's
        self.shared = shared

    def train(self, mode: bool = True) -> TokenizerTrainModule:
        self.training = mode
        self.tok.train(mode)  # keeps the VFM frozen and in eval mode
        return self

    def forward(self, images: torch.Tensor, step: int, seed: int, grad_shares: bool = False
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:  # fmt: skip
        """Generator-side loss of ``images (B, 3, S, S)`` in [0, 1] (``grad_shares``: add the regularizers'
        gradient shares at z to the terms, docs/method.md § Tokenizer training).

        Returns:
            ``(total loss, {term: value}, reconstruction (B, 3, S, S) detached)``.
        """
        from pae_fast.losses.refine import build_prior_targets

        sh = self.shared
        feats = self.tok.encode_features(images)
        targets = None
        if sh.loss.needs_targets:
            targets = build_prior_targets(feats.vfm_tokens, sh.loss.cfg, sh.projector, sh.raw_projection)
        out = sh.loss.generator_loss(images, feats.z, self.tok.decode, step, seed=seed,
                                     last_layer=self.tok.last_decoder_layer.weight, targets=targets,
                                     logvar=feats.logvar, grad_shares=grad_shares)
        if sh.loss.diffusion_on:  # the denoiser unit of the same micro-batch trains on sg(z)
            sh.latents.append(feats.z.detach())
        return out.total, out.terms, out.recon.detach()


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """Images as floats in [0, 1] (uint8 items scaled; a floating dtype is kept, e.g. a bf16 roofline count)."""
    return images if images.is_floating_point() else images.float() / 255.0


def tokenizer_loss_fn(shared: Shared, rank: int = 0):
    """The engine's ``loss_fn`` of the tokenizer: the generator-side loss; stashes the reconstructions for the
    discriminator's step when there is one. On the logged steps of ``shared.train`` (the run's TrainConfig; a holder
    without it, e.g. a benchmark's, never logs them) with ``tokenizer.log_grad_shares`` on, the terms include the
    regularizers' gradient shares (docs/method.md § Tokenizer training), except under FSDP sharding: there the
    extra ``autograd.grad`` inside the sharded forward would reach parameters FSDP has already resharded."""
    from pae_fast.engine.parallel import is_sharded
    from pae_fast.engine.runtime import is_log_step

    def loss_fn(model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        train = getattr(shared, "train", None)
        want_shares = train is not None and shared.loss.cfg.log_grad_shares
        if not shared.announced:  # inside the engine: the lines reach its log.txt
            shared.announced = True
            for term, line in shared.status.items():
                log.info("loss %-9s %s", term, line)
            if want_shares and is_sharded(model):
                log.warning("tokenizer.log_grad_shares: not computed under train.distributed=fsdp (the extra "
                            "autograd.grad would reach resharded parameters); use ddp to see them")  # fmt: skip
        images = _as_float(batch[0])
        seed = mcr_step_seed(shared.seed, step, rank)  # MCR noise: new per (step, rank), replayed on resume
        shares = want_shares and is_log_step(step, train) and not is_sharded(model)
        total, terms, recon = model(images, step, seed, grad_shares=shares)
        if shared.has_disc:
            shared.recons.append(recon)
        return total, terms

    return loss_fn


def disc_unit_loss_fn(shared: Shared):
    """The engine's ``loss_fn`` of the discriminator unit: :meth:`TokenizerLoss.discriminator_loss` called with the
    engine's (possibly wrapped) discriminator on the detached reconstructions of the same micro-batch. Before
    ``tokenizer.disc_start_step`` it returns a zero loss that touches no parameter (AdamW skips them)."""

    def loss_fn(model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = _as_float(batch[0])
        recon = shared.recons.pop(0)
        d = shared.loss.discriminator_loss(images, recon, step, discriminator=model)
        if d is None:
            return torch.zeros((), device=images.device, requires_grad=True), {}
        return d["disc"], {"logits_real": d["logits_real"], "logits_fake": d["logits_fake"]}

    return loss_fn

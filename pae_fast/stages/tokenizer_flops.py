"""FLOPs per image of one tokenizer training step, for the engine's TFLOP/s and MFU (docs/method.md § Compute
accounting).

Each part of the step is run once per image on fake tensors (``FakeTensorMode``: no memory, no compute) with the
reference ops (``use_backend("torch")``; fused kernels change memory traffic, not FLOPs) under
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-accumulate of every matmul, convolution and
attention product; elementwise work such as norms, losses, DiffAug and the MCR perturbation is not counted, as in
the generators' count), forward and the backward the step really runs:

==========================  ==========================================================================================
encoder                     frozen VFM forward (no backward: nothing before it needs a gradient); DAM + projector
                            forward + backward (weight and input gradients)
prior targets (SSR / SCR)   the frozen ``P_t`` (or the raw projection) on the VFM tokens, forward only
decoder                     forward + backward, once per latent decoded (1 + the MCR perturbations, one batched pass)
LPIPS (when on)             the trunk once per image batch (docs/method.md § LPIPS fast path): the real images
                            (forward only), the reconstruction and each MCR reconstruction (forward + input-gradient
                            backward); the distances are elementwise (not counted)
GAN, generator term         from ``tokenizer.gan_start_step``: the frozen discriminator's forward + input-gradient
                            backward, and the adaptive weight's two extra backward passes (LPIPS and the
                            discriminator, down to the decoder's last layer)
discriminator step          from ``tokenizer.disc_start_step``: real and fake images, forward + the backward of its
                            trainable heads (the backbone is frozen and its input needs no gradient)
==========================  ==========================================================================================

The GAN starts later than step 0, so the task's ``flops_per_sample`` is a function of the step. Modules are counted
in eval mode (no spectral-norm iteration or batch-norm statistics update; the same FLOPs) and left as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["TokenizerStepFlops", "count_tokenizer_step", "tokenizer_flops_fn"]


@dataclass(frozen=True)
class TokenizerStepFlops:
    """FLOPs per image of each part of a tokenizer training step (forward + the backward it runs)."""

    encoder: float  # VFM forward + trainable encoder forward and backward
    targets: float
    decoder: float  # one latent
    decoder_passes: int
    lpips_forward: float  # one image through the LPIPS trunk
    lpips_backward: float  # one image's input-gradient backward through it
    lpips_batches: int  # image batches through the trunk: the real one (forward only) + every decoded one
    gan_generator: float  # frozen discriminator forward + input-gradient backward
    disc_backward: float  # of which the backward
    disc_step: float  # one image through the discriminator step (forward + heads' backward)
    gan_start_step: int | None  # None: no GAN
    disc_start_step: int | None

    def flops(self, step: int) -> float:
        """Training FLOPs per image of optimizer step ``step`` (0-based)."""
        total = self.encoder + self.targets + self.decoder_passes * self.decoder
        if self.lpips_batches:
            total += self.lpips_batches * self.lpips_forward + (self.lpips_batches - 1) * self.lpips_backward
        if self.gan_start_step is not None and step >= self.gan_start_step:
            total += self.gan_generator + self.lpips_backward + self.disc_backward  # + the adaptive weight's passes
        if self.disc_start_step is not None and step >= self.disc_start_step:
            total += 2 * self.disc_step  # real and fake
        return total


@contextlib.contextmanager
def _eval(*modules: nn.Module | None) -> Iterator[None]:
    mods = [m for m in modules if m is not None]
    modes = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(mods, modes):
            m.train(mode)
            for p in m.parameters():  # the backward left fake gradients on the (real) parameters
                p.grad = None


def _needs_grad(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` that carries a gradient, as a non-leaf (the output of an earlier op, as in the step)."""
    return x.detach().requires_grad_(True).clone()


def _flops(fn: Callable[[], torch.Tensor | None], backward: bool = True) -> tuple[float, float]:
    """(forward + backward, backward) FLOPs of ``fn()`` and ``fn().float().sum().backward()`` (no backward when
    nothing in ``fn`` needs a gradient)."""
    from pae_fast.kernels import use_backend

    fwd, both = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with use_backend("torch"):
        with fwd, torch.no_grad():
            fn()
        if not backward:
            return fwd.get_total_flops(), 0.0
        with both:
            out = fn()
            if out.requires_grad:  # an RAE's encoder trains nothing: forward only
                out.float().sum().backward()
    return both.get_total_flops(), both.get_total_flops() - fwd.get_total_flops()


def count_tokenizer_step(tok: nn.Module, loss: Any, cfg: Any, projector: nn.Module | None = None,
                         raw_projection: Any = None) -> TokenizerStepFlops:
    """Count each part of one training step of ``tok`` under ``loss`` (a ``TokenizerLoss``), per image.

    Args:
        tok: the tokenizer (any device; counted on fake tensors, its weights untouched).
        loss: its :class:`~pae_fast.losses.total.TokenizerLoss` (LPIPS, discriminator, MCR angles, switches).
        cfg: the ``TokenizerConfig`` (GAN start steps, prior targets).
        projector, raw_projection: the frozen prior-target helpers (SSR / SCR), if any.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    def device(m: nn.Module) -> torch.device:  # the helpers may already sit on the training device, tok not yet
        return next(m.parameters()).device

    dev = device(tok)
    S, (C, h, w) = tok.image_size, tok.latent_shape
    lp, disc = loss.lpips, loss.discriminator
    mcr = len(loss.mcr_angles) if loss.mcr_on else 0
    gan = disc is not None and float(cfg.lambda_gan) > 0
    with FakeTensorMode(allow_non_fake_inputs=True), _eval(tok, lp, disc, projector):
        images = torch.zeros(1, 3, S, S, device=dev)
        encoder, _ = _flops(lambda: tok.encode_features(images).z)
        decoder, _ = _flops(lambda: tok.decode(_needs_grad(torch.zeros(1, C, h, w, device=dev))))
        targets = 0.0
        if loss.needs_targets and cfg.priors == "refined" and projector is not None:
            tokens = tok.encode_features(images).vfm_tokens.detach().to(device(projector))
            targets, _ = _flops(lambda: projector(tokens), backward=False)
        elif loss.needs_targets and raw_projection is not None and loss.scr_on:  # one (N, D) @ (D, C) product
            targets = 2.0 * tok.vfm.grid_size ** 2 * raw_projection.weight.numel()
        lpips_fwd = lpips_bwd = 0.0
        if lp is not None:
            x = images.to(device(lp))
            lpips_fwd, _ = _flops(lambda: lp.features(x), backward=False)
            _, lpips_bwd = _flops(lambda: lp(_needs_grad(x), x))
        gen = disc_bwd = step = 0.0
        if gan:
            x = images.to(device(disc))
            with loss._frozen_discriminator():
                gen, disc_bwd = _flops(lambda: disc(_needs_grad(x)))
            step, _ = _flops(lambda: disc(x))
    return TokenizerStepFlops(
        encoder=encoder, targets=targets, decoder=decoder, decoder_passes=1 + mcr, lpips_forward=lpips_fwd,
        lpips_backward=lpips_bwd, lpips_batches=(2 + mcr) if lp is not None else 0, gan_generator=gen,
        disc_backward=disc_bwd, disc_step=step, gan_start_step=int(cfg.gan_start_step) if gan else None,
        disc_start_step=int(cfg.disc_start_step) if gan else None,
    )  # fmt: skip


def tokenizer_flops_fn(tok: nn.Module, loss: Any, cfg: Any, projector: nn.Module | None = None,
                       raw_projection: Any = None) -> Callable[[int], float]:
    """``step -> training FLOPs per image`` for ``TrainTask.flops_per_sample`` (the parts are counted once, here)."""
    return count_tokenizer_step(tok, loss, cfg, projector, raw_projection).flops

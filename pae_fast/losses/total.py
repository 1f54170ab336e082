"""The tokenizer's whole objective, generator side and discriminator side (docs/method.md §Tokenizer losses).

    L_G = l1 L1 + l_lpips LPIPS + l_gan lambda_adapt GAN_G + l_ssr SSR + l_mcr MCR + l_scr SCR
    L_D = hinge(D(aug(x)), D(aug(sg(x_hat))))

A term is computed only when it is on (its switch, its weight > 0, its start step); an off term is absent from the
loss dict and none of its work runs (no Gram kernel, no extra decoder pass, no LPIPS / discriminator forward).
Decoder passes for the reconstruction and the MCR perturbations run as one concatenated batch.

The stage wires it like this (per step)::

    z, vfm = tok.encode_features(images)                       # (B, C, h, w), (B, N, D)
    targets = build_prior_targets(vfm, cfg.tokenizer, projector=P_t)   # losses.refine; no grad
    out = loss.generator_loss(images, z, tok.decode, step, seed=mcr_step_seed(cfg.seed, step, rank),  # per (step, rank)
                              last_layer=tok.last_decoder_layer.weight, targets=targets)
    out.total.backward(); opt_g.step()
    d = loss.discriminator_loss(images, out.recon, step)       # None before disc_start_step / without GAN
    if d is not None: opt_d.zero_grad(); d["disc"].backward(); opt_d.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from pae_fast.losses.diffaug import diff_augment, parse_policy
from pae_fast.losses.gan import adaptive_weight, disc_active, gan_active, hinge_d_loss, vanilla_g_loss
from pae_fast.losses.grad_shares import SHARED_TERMS, gradient_shares
from pae_fast.losses.kl import kl_loss, reparameterize
from pae_fast.losses.latent_diffusion import LatentDenoiser, fixed_parameters, flow_matching_loss
from pae_fast.losses.mcr import decode_concat, mcr_angles_for, mcr_losses, mcr_perturb
from pae_fast.losses.noise_aug import noise_augment
from pae_fast.losses.recon import build_lpips, l1_loss, lpips_status
from pae_fast.losses.scr import scr_losses
from pae_fast.losses.ssr import ssr_loss

__all__ = ["PriorTargets", "GeneratorLossOutput", "TokenizerLoss", "term_on"]


def term_on(cfg: Any, name: str) -> bool:
    """Whether the regularizer ``name`` (``"ssr" | "mcr" | "scr"``) runs: its switch ``cfg.<name>`` is on AND its
    weight ``cfg.lambda_<name>`` is > 0 (docs/method.md § Tokenizer losses). The one home of this rule."""
    return bool(getattr(cfg, name)) and float(getattr(cfg, f"lambda_{name}")) > 0


@dataclass
class PriorTargets:
    """Targets of the prior regularizers for one batch (built without grad by :func:`pae_fast.losses.refine.
    build_prior_targets`).

    Attributes:
        structure: ``(B, N, C_s)`` SSR target tokens on the latent grid.
        semantic: ``(B, N, C)`` SCR target tokens with the latent's width C.
    """

    structure: torch.Tensor | None = None
    semantic: torch.Tensor | None = None


@dataclass
class GeneratorLossOutput:
    """Result of :meth:`TokenizerLoss.generator_loss`.

    Attributes:
        total: 0-dim weighted loss to backpropagate.
        terms: unweighted detached values by name (only terms that were computed), plus ``gan_weight``
            (lambda_adapt) when the GAN term is on.
        recon: ``(B, 3, H, W)`` reconstruction of the (noise-augmented) latent, with grad (feed it to
            :meth:`TokenizerLoss.discriminator_loss`, which detaches it).
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    recon: torch.Tensor


class TokenizerLoss(nn.Module):
    """Generator- and discriminator-side tokenizer losses from a :class:`~pae_fast.config.TokenizerConfig`.

    Args:
        cfg: the tokenizer config (weights, switches, MCR / SCR / noise-aug / GAN settings).
        lpips: the frozen LPIPS module, or None when the LPIPS term is off (see :meth:`from_config`); the loss calls its
            ``features`` and ``features_distance`` (docs/method.md § LPIPS fast path).
        discriminator: the :class:`~pae_fast.models.discriminator.DinoDiscriminator`, or None when ``lambda_gan``
            is 0.
        kernel_backend: backend of the Gram / sphere kernels (None: the scope default).
        latent_denoiser: the diffusion-loss regulariser's :class:`~pae_fast.losses.latent_diffusion.LatentDenoiser`
            (needed when ``lambda_diffusion > 0``).
    """

    def __init__(self, cfg: Any, lpips: nn.Module | None = None, discriminator: nn.Module | None = None,
                 kernel_backend: str | None = None, latent_denoiser: nn.Module | None = None) -> None:  # fmt: skip
        super().__init__()
        self.cfg = cfg
        self.lpips = lpips
        self.discriminator = discriminator
        self.latent_denoiser = latent_denoiser
        if self.diffusion_on and latent_denoiser is None:
            raise ValueError("tokenizer.lambda_diffusion > 0 needs a latent denoiser (TokenizerLoss(..., "
                             "latent_denoiser=...) or from_config(..., latent_channels=C))")
        self.kernel_backend = kernel_backend
        self.aug_policy = parse_policy(cfg.disc_aug)
        if float(cfg.lambda_gan) > 0 and discriminator is None:
            raise ValueError("tokenizer.lambda_gan > 0 needs a discriminator (TokenizerLoss(..., discriminator=...)); "
                             "set tokenizer.lambda_gan: 0 to train without the GAN term")  # fmt: skip
        self.mcr_angles = mcr_angles_for(cfg.mcr_angles, cfg.mcr_cascade) if self.mcr_on else ()

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device | str | None = None, allow_random_disc: bool = False,
                    kernel_backend: str | None = None, latent_channels: int | None = None,
                    **disc_overrides: Any) -> TokenizerLoss:  # fmt: skip
        """Build LPIPS (:func:`~pae_fast.losses.recon.build_lpips`) and the discriminator from their local files, and
        the diffusion-loss regulariser's denoiser (``latent_channels`` wide) when ``lambda_diffusion > 0``."""
        from pae_fast.models.discriminator import create_discriminator

        lpips = build_lpips(cfg, device)
        disc = None
        if float(cfg.lambda_gan) > 0:
            disc = create_discriminator(cfg, allow_random=allow_random_disc, **disc_overrides)
            if device is not None:
                disc = disc.to(device)
        den = None
        if float(cfg.lambda_diffusion) > 0:
            if latent_channels is None:
                raise ValueError("TokenizerLoss.from_config: lambda_diffusion > 0 needs latent_channels")
            den = LatentDenoiser(latent_channels, int(cfg.diffusion_hidden))
            den = den if device is None else den.to(device)
        return cls(cfg, lpips, disc, kernel_backend, den)

    # ------------------------------------------------------------------ switches
    @property
    def ssr_on(self) -> bool:
        return term_on(self.cfg, "ssr")

    @property
    def mcr_on(self) -> bool:
        return term_on(self.cfg, "mcr")

    @property
    def scr_on(self) -> bool:
        return term_on(self.cfg, "scr")

    # ablation regularisers of Table 3a (docs/method.md § KL and diffusion-loss regularisers): on when weighted
    @property
    def kl_on(self) -> bool:
        return float(self.cfg.lambda_kl) > 0

    @property
    def diffusion_on(self) -> bool:
        return float(self.cfg.lambda_diffusion) > 0

    @property
    def needs_targets(self) -> bool:
        """Whether :meth:`generator_loss` needs :class:`PriorTargets` (SSR or SCR on)."""
        return self.ssr_on or self.scr_on

    def status(self) -> dict[str, str]:
        """One line per term for the run log (what is on, from which files, random features flagged)."""
        c = self.cfg
        gan = "off (tokenizer.lambda_gan = 0)"
        if self.discriminator is not None:
            d = self.discriminator
            src = "RANDOM frozen features (no weights)" if d.random_features else d.weights_file
            gan = (f"on (D from step {c.disc_start_step}, G from step {c.gan_start_step}; {d.model_name} blocks "
                   f"{list(d.blocks)}: {src}; DiffAug {','.join(self.aug_policy) or 'none'})")  # fmt: skip
        onoff = lambda on, s: s if on else "off"  # noqa: E731
        extra = {}  # Table 3a's regularisers: listed only when on (the usual runs never use them)
        if self.kl_on:
            extra["kl"] = f"on (weight {c.lambda_kl})"
        if self.diffusion_on:
            extra["diffusion"] = f"on (weight {c.lambda_diffusion}, denoiser width {c.diffusion_hidden})"
        return extra | {
            "l1": onoff(float(c.lambda_l1) > 0, f"on (weight {c.lambda_l1})"),
            "lpips": lpips_status(c, self.lpips),
            "gan": gan,
            "ssr": onoff(self.ssr_on, f"on (weight {c.lambda_ssr}, {c.ssr_gram} Gram {c.ssr_reduction}, "
                                      f"priors {c.priors})"),
            "mcr": onoff(
                self.mcr_on, f"on (weight {c.lambda_mcr}, {c.mcr_cascade}, angles {self.mcr_angles}, {c.mcr_mode})"
            ),  # fmt: skip
            "scr": onoff(self.scr_on, f"on (weight {c.lambda_scr}, {c.scr_terms}, priors {c.priors})"),
            "noise_aug": onoff(float(c.noise_aug_tau) > 0, f"on (tau {c.noise_aug_tau}, {c.noise_aug_dist})"),
        }

    # ------------------------------------------------------------------ generator side
    @contextlib.contextmanager
    def _frozen_discriminator(self) -> Iterator[None]:
        """Discriminator as a fixed function for the generator pass: eval (no spectral-norm power iteration) and
        no grad on its heads (the G loss never writes D gradients)."""
        d = self.discriminator
        was_training = d.training
        flags = [p.requires_grad for p in d.heads.parameters()]
        d.eval()
        for p in d.heads.parameters():
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, f in zip(d.heads.parameters(), flags):
                p.requires_grad_(f)
            d.train(was_training)

    def generator_loss(
        self,
        images: torch.Tensor,
        z: torch.Tensor,
        decode: Callable[[torch.Tensor], torch.Tensor],
        step: int,
        seed: int | torch.Tensor = 0,
        last_layer: torch.Tensor | None = None,
        targets: PriorTargets | None = None,
        generator: torch.Generator | None = None,
        grad_shares: bool = False,
        logvar: torch.Tensor | None = None,
    ) -> GeneratorLossOutput:
        """Generator-side loss of one batch.

        Args:
            images: ``(B, 3, H, W)`` inputs in [0, 1].
            z: ``(B, C, h, w)`` latents from the encoder (gradients flow to the trainable encoder parts).
            decode: the tokenizer's decoder, ``(B', C, h, w) -> (B', 3, H, W)``.
            step: optimizer step (GAN start step).
            seed: Philox seed of the MCR noise; the stage passes :func:`~pae_fast.losses.mcr.mcr_step_seed` of
                (run seed, step, rank), distinct for every (step, rank) at any world size and the same on resume.
            last_layer: the decoder's last layer weight (``tok.last_decoder_layer.weight``); needed with the GAN term.
            targets: SSR / SCR targets (needed when either is on).
            generator: RNG for the noise augmentation and DiffAug (None: the global one).
            grad_shares: also return ``grad_share/<ssr|mcr|scr>`` terms, each regularizer's gradient norm at z over
                the reconstruction term's (:func:`~pae_fast.losses.grad_shares.gradient_shares`; extra backward
                passes: the stage asks on logged steps only).
            logvar: ``(B, C, h, w)`` the latent's log-variance (``*-kl`` tokenizers; needed when ``lambda_kl > 0``):
                the reconstruction then decodes ``reparameterize(z, logvar)``.

        Returns:
            :class:`GeneratorLossOutput`.
        """
        c = self.cfg
        if self.needs_targets and targets is None:
            raise ValueError("generator_loss: SSR / SCR are on but no PriorTargets were given")
        if self.kl_on and logvar is None:
            raise ValueError("generator_loss: tokenizer.lambda_kl > 0 needs logvar (a *-kl tokenizer variant)")
        z_dec = reparameterize(z, logvar, generator) if self.kl_on else z  # KL ablation: decode a sample
        z_in = noise_augment(z_dec, float(c.noise_aug_tau), c.noise_aug_dist, generator)
        latents = [z_in]
        if self.mcr_on:
            latents += list(mcr_perturb(z, self.mcr_angles, seed, c.mcr_mode, self.kernel_backend))
        decoded = decode_concat(decode, latents)
        recon = decoded[0]
        terms: dict[str, torch.Tensor] = {}
        weighted: list[torch.Tensor] = []

        rec = None
        if float(c.lambda_l1) > 0:
            terms["l1"] = l1_loss(recon, images)
            rec = c.lambda_l1 * terms["l1"]
        f_recon = None  # LPIPS features of recon, reused as the MCR anchor (docs/method.md § LPIPS fast path)
        if self.lpips is not None:
            with torch.no_grad():  # the real images need no gradient
                f_images = self.lpips.features(images)
            f_recon, d_recon = self.lpips.features_distance(recon, f_images)
            terms["lpips"] = d_recon.mean()
            rec = c.lambda_lpips * terms["lpips"] if rec is None else rec + c.lambda_lpips * terms["lpips"]
        if rec is not None:
            weighted.append(rec)
        if self.discriminator is not None and gan_active(step, float(c.lambda_gan), c.gan_start_step):
            with self._frozen_discriminator():
                logits = self.discriminator(diff_augment(recon, self.aug_policy, generator=generator))
            terms["gan"] = vanilla_g_loss(logits)
            if last_layer is None or rec is None or not torch.is_grad_enabled():
                raise ValueError("generator_loss: the GAN term needs grad enabled, a reconstruction loss and "
                                 "last_layer (tok.last_decoder_layer.weight) for its adaptive weight")  # fmt: skip
            terms["gan_weight"] = adaptive_weight(rec, terms["gan"], last_layer, c.adaptive_weight_max)
            weighted.append(c.lambda_gan * terms["gan_weight"] * terms["gan"])
        if self.ssr_on:
            if targets.structure is None:
                raise ValueError("generator_loss: SSR is on but targets.structure is None")
            terms["ssr"] = ssr_loss(z, targets.structure, self.kernel_backend, c.ssr_gram, c.ssr_reduction)
            weighted.append(c.lambda_ssr * terms["ssr"])
        if self.mcr_on:
            mcr = mcr_losses(recon, decoded[1:], c.mcr_cascade, self.lpips, recon_features=f_recon)
            terms.update(mcr)
            terms["mcr"] = sum(mcr.values())
            weighted.append(c.lambda_mcr * terms["mcr"])
        if self.scr_on:
            if targets.semantic is None:
                raise ValueError("generator_loss: SCR is on but targets.semantic is None")
            scr = scr_losses(z, targets.semantic, c.scr_terms)
            terms.update(scr)
            terms["scr"] = sum(scr.values())
            weighted.append(c.lambda_scr * terms["scr"])
        if self.kl_on:  # Table 3a ablations (docs/method.md § KL and diffusion-loss regularisers)
            terms["kl"] = kl_loss(z, logvar)
            weighted.append(c.lambda_kl * terms["kl"])
        if self.diffusion_on:
            with fixed_parameters(self.latent_denoiser):  # the encoder's pull; the denoiser trains in its own unit
                terms["diffusion"] = flow_matching_loss(self.latent_denoiser, z, generator)
            weighted.append(c.lambda_diffusion * terms["diffusion"])
        if grad_shares and rec is not None and z.requires_grad and torch.is_grad_enabled():
            regs = {k: getattr(c, f"lambda_{k}") * terms[k] for k in SHARED_TERMS if k in terms}
            terms.update(gradient_shares(z, rec, regs) if regs else {})
        if not weighted:
            raise ValueError("generator_loss: every term is off (check the tokenizer.lambda_* weights and switches)")
        total = torch.stack([w.float() for w in weighted]).sum()
        return GeneratorLossOutput(total, {k: v.detach() for k, v in terms.items()}, recon)

    # ------------------------------------------------------------------ discriminator side
    def discriminator_loss(
        self, images: torch.Tensor, recon: torch.Tensor, step: int, generator: torch.Generator | None = None,
        discriminator: nn.Module | None = None,
    ) -> dict[str, torch.Tensor] | None:
        """Hinge loss of the discriminator on real images vs detached reconstructions (the one implementation: the
        training stage calls it too).

        Args:
            images: ``(B, 3, H, W)`` real images in [0, 1].
            recon: ``(B, 3, H, W)`` reconstructions (detached here, cast to the images' dtype).
            step: optimizer step (``disc_start_step``).
            generator: RNG of the DiffAug draws (None: the global one).
            discriminator: the module to call, e.g. the engine's wrapped copy of :attr:`discriminator` (DDP, bf16
                compute weights); None: :attr:`discriminator` itself.
        Returns:
            ``{"disc": loss (with grad on the heads), "logits_real": mean, "logits_fake": mean}``, or None when
            the discriminator is not trained at this step (no GAN, or before its start step).
        """
        c = self.cfg
        if self.discriminator is None or not disc_active(step, float(c.lambda_gan), c.disc_start_step):
            return None
        # two passes (not one concatenated batch): the heads' BatchNorm statistics stay per source, as in the
        # generator pass, which sees reconstructions only
        d = self.discriminator if discriminator is None else discriminator
        real = d(diff_augment(images, self.aug_policy, generator=generator))
        fake = d(diff_augment(recon.detach().to(images.dtype), self.aug_policy, generator=generator))
        return {"disc": hinge_d_loss(real, fake), "logits_real": real.detach().float().mean(),
                "logits_fake": fake.detach().float().mean()}  # fmt: skip

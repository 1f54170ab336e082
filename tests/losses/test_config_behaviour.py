"""Every TokenizerConfig / RefineConfig field a preset sets changes what is built or trained.

``tests/test_config_fields.py`` checks that code names each field; here each field set by a preset is changed on its
own and the thing it configures must change with it (the generator or discriminator loss on identical inputs and
randomness, the built discriminator, the refinement loss or model, the held-out evaluation). Fields whose behaviour
has its own dedicated tests elsewhere are listed in ``ELSEWHERE`` with the test that pins them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from pae_fast.config import RefineConfig, TokenizerConfig
from pae_fast.losses.refine import refine_step_loss
from pae_fast.losses.total import PriorTargets, TokenizerLoss
from pae_fast.models.discriminator import create_discriminator
from pae_fast.models.refine import RefinedPriors

ROOT = Path(__file__).resolve().parents[2]
B, C, G = 2, 8, 2

# field -> a value different from BASE's that must change the generator (G) or discriminator (D) loss
LOSS_CHANGES = {
    "lambda_l1": 0.3, "lambda_lpips": 0.2, "lambda_gan": 0.9, "lambda_ssr": 0.7, "lambda_mcr": 0.05,
    "lambda_scr": 0.1, "ssr": False, "mcr": False, "scr": False, "mcr_angles": (30.0, 70.0), "mcr_mode": "geodesic",
    "mcr_cascade": "medium", "scr_terms": "patch", "noise_aug_tau": 0.0, "noise_aug_dist": "half_normal",
    "gan_start_step": 11, "disc_start_step": 11, "adaptive_weight_max": 1e-3, "disc_aug": "color",
    "ssr_gram": "raw", "ssr_reduction": "row_mean",
}  # fmt: skip
BASE = {"lpips_weights": "stand-in", "lambda_gan": 0.5, "noise_aug_tau": 0.4, "gan_start_step": 0,
        "disc_start_step": 0, "disc_aug": "color,translation,cutout"}  # fmt: skip
# fields tested where they act (the test that fails when the field stops doing its job)
ELSEWHERE = {
    "tokenizer.name": "tests/test_registry.py (create_tokenizer by name)",
    "tokenizer.vfm_weights": "tests/models/test_tokenizers.py (encoder weights loaded from the file)",
    "tokenizer.priors": "tests/losses/test_refine.py::test_build_prior_targets_modes",
    "tokenizer.priors_file": "tests/stages/test_tokenizer_cli.py (missing_priors) and test_refine_priors.py",
    "tokenizer.raw_prior_projection": "tests/stages/test_tokenizer_fields.py",
    "tokenizer.lpips_weights": "tests/losses/test_recon_gan.py (build_lpips: none / files / missing)",
    "tokenizer.lpips_backbone_weights": "tests/stages/test_tokenizer_fields.py",
    "tokenizer.heldout_items": "tests/stages/test_tokenizer_fields.py",
    "tokenizer.grid_items": "tests/stages/test_tokenizer_fields.py",
    "tokenizer.encode_weights": "tests/data/test_encode_weights.py (raw vs EMA weights encode, recorded and checked)",
    # ablation fields (docs/method.md § Ablation presets)
    "tokenizer.init_from_priors": "tests/stages/test_init_from_priors.py",
    "tokenizer.lambda_kl": "tests/losses/test_ablation_regularisers.py::test_kl_term_decodes_a_sample_and_adds_its_"
                           "weighted_kl",
    "tokenizer.lambda_diffusion": "tests/losses/test_ablation_regularisers.py::test_diffusion_term_pulls_the_latent_"
                                  "not_the_denoiser_and_the_unit_trains_it",
    "tokenizer.diffusion_hidden": "tests/losses/test_ablation_regularisers.py::test_from_config_builds_the_denoiser_"
                                  "only_when_weighted",
}
DISC_CHANGES = {"disc_model": "vit_small_patch8_224", "disc_blocks": (1,), "disc_input_size": 48}
REFINE_CHANGES = {"lambda_rep": 0.0, "lambda_gram": 0.0, "lowpass_strength": 0.9, "upsampler": "nearest_area",
                  "projector_heads": 4, "reconstructor_heads": 4, "reconstructor_depth": 1,
                  "reconstructor_hidden": 48}  # fmt: skip


def _preset_fields() -> set[str]:
    out = set()
    for f in (ROOT / "configs").glob("*.yaml"):
        d = yaml.safe_load(f.read_text()) or {}
        out |= {f"{s}.{k}" for s in ("tokenizer", "refine") for k in (d.get(s) or {})}
    return out


def test_every_preset_field_has_a_behavioural_check():
    covered = ({f"tokenizer.{k}" for k in LOSS_CHANGES} | {f"tokenizer.{k}" for k in DISC_CHANGES}
               | {"tokenizer.disc_weights"} | {f"refine.{k}" for k in REFINE_CHANGES} | set(ELSEWHERE))  # fmt: skip
    assert _preset_fields() - covered == set()


def _losses(parts, **kw):
    cfg = dataclasses.replace(TokenizerConfig(), **{**BASE, **kw})
    torch.manual_seed(0)  # same decoder, discriminator heads and inputs for every config
    dec = parts.TinyDecoder(channels=C)
    disc = parts.tiny_disc()
    loss = TokenizerLoss(cfg, lpips=parts.CountingLPIPS(), discriminator=disc if cfg.lambda_gan > 0 else None,
                         kernel_backend="torch")
    z = parts.rms1(B, G, G, C).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    images = torch.rand(B, 3, 4 * G, 4 * G)
    targets = PriorTargets(structure=torch.randn(B, G * G, 12), semantic=torch.randn(B, G * G, C))
    torch.manual_seed(1)  # noise augmentation and DiffAug draws
    out = loss.generator_loss(images, z, dec, 10, seed=7, last_layer=dec.last.weight, targets=targets)
    d = loss.discriminator_loss(images, out.recon, 10)
    return float(out.total.detach()), set(out.terms), None if d is None else float(d["disc"].detach())


@pytest.mark.parametrize("field", sorted(LOSS_CHANGES))
def test_each_loss_field_changes_the_loss(parts, field):
    base = _losses(parts)
    changed = _losses(parts, **{field: LOSS_CHANGES[field]})
    assert changed != base, f"tokenizer.{field}={LOSS_CHANGES[field]!r} left the losses unchanged"
    assert _losses(parts) == base  # the comparison itself is deterministic


def _disc(**kw):
    base = {"disc_model": "vit_tiny_patch16_224", "disc_blocks": (0, 1), "disc_input_size": 32,
            "disc_weights": "random"}
    cfg = dataclasses.replace(TokenizerConfig(), **{**base, **kw})
    return create_discriminator(cfg, backbone_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})


@pytest.mark.parametrize("field", sorted(DISC_CHANGES))
def test_each_discriminator_field_changes_the_built_discriminator(field):
    base, changed = _disc(), _disc(**{field: DISC_CHANGES[field]})
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    got = {"disc_model": (base.model_name, changed.model_name), "disc_blocks": (base.blocks, changed.blocks),
           "disc_input_size": (base.input_size, changed.input_size)}[field]  # fmt: skip
    assert got[1] == (tuple(DISC_CHANGES[field]) if field == "disc_blocks" else DISC_CHANGES[field]) != got[0]
    assert base(x).shape != changed(x).shape  # and what it computes: another token layout / number of heads


def test_disc_weights_selects_random_features_or_a_file(tmp_path):
    from safetensors.torch import save_file

    rnd = _disc()
    assert rnd.random_features and rnd.weights_file is None
    state = {k: v.clone() + 1.0 for k, v in rnd.backbone.state_dict().items()}
    save_file(state, str(tmp_path / "d.safetensors"))
    loaded = _disc(disc_weights=str(tmp_path / "d.safetensors"))
    assert not loaded.random_features and loaded.weights_file
    k = "patch_embed.proj.weight"
    torch.testing.assert_close(loaded.backbone.state_dict()[k], state[k])
    with pytest.raises(FileNotFoundError, match="tokenizer.disc_weights"):
        create_discriminator(dataclasses.replace(TokenizerConfig(), disc_weights=None))


def _refine(**kw):
    small = {"reconstructor_depth": 2, "reconstructor_hidden": 32, "projector_heads": 2, "reconstructor_heads": 2}
    cfg = dataclasses.replace(RefineConfig(), **{**small, **kw})
    torch.manual_seed(0)
    pri = RefinedPriors.from_config(cfg, dim=16, grid=4, latent_dim=8)
    torch.manual_seed(1)
    h = torch.randn(2, 16, 16)
    out = refine_step_loss(pri, h, cfg, image_size=16, backend="torch")
    shapes = sorted((n, tuple(p.shape)) for n, p in pri.named_parameters())
    return shapes, float(out["total"].detach()), set(out)


@pytest.mark.parametrize("field", sorted(REFINE_CHANGES))
def test_each_refine_field_changes_the_priors_or_their_loss(field):
    from pae_fast.models.refine import UPSAMPLERS, register_upsampler

    saved = dict(UPSAMPLERS)
    try:
        register_upsampler("nearest_area", lambda t, size: torch.nn.functional.interpolate(t, size=size))
        base, changed = _refine(), _refine(**{field: REFINE_CHANGES[field]})
    finally:
        UPSAMPLERS.clear()
        UPSAMPLERS.update(saved)
    assert changed != base, f"refine.{field}={REFINE_CHANGES[field]!r} changed nothing"

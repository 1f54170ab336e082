"""``tokenizer.init_from_priors`` (one initialisation policy per ablation table) and the Table 3a regularisers wired
through ``build_tokenizer_task`` (docs/method.md § Ablation presets)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pae_fast.config import ConfigError, TokenizerConfig, load_config
from pae_fast.io import load_safetensors
from pae_fast.stages.train_tokenizer import build_tokenizer_task, init_from_priors

from .test_refine_priors import PRESET, photos, priors  # noqa: F401 - module fixtures (one stage-0 run)

PARTS = ("projector.", "decompressor.")


@pytest.mark.parametrize(("init", "priors_", "ssr", "scr", "expect"), [
    (None, "refined", True, True, True), (None, "refined", False, True, True), (None, "refined", False, False, False),
    (None, "raw", True, True, False), (True, "raw", False, False, True), (False, "refined", True, True, False),
])  # fmt: skip
def test_policy_resolution(init, priors_, ssr, scr, expect):
    t = dataclasses.replace(TokenizerConfig(), init_from_priors=init, priors=priors_, ssr=ssr, scr=scr)
    assert init_from_priors(t) is expect


def _task(tmp_path, images, **over):
    cfg = load_config(PRESET, {"out_dir": str(tmp_path / "tok"), **{f"tokenizer.{k}": v for k, v in over.items()}})
    return build_tokenizer_task(cfg, images, None)[0]


def _from_file(tok, path) -> bool:
    tensors, _ = load_safetensors(path)
    return all(torch.equal(v, tensors[k]) for k, v in tok.state_dict().items() if k.startswith(PARTS))


def test_true_initialises_even_when_no_loss_reads_the_priors(tmp_path, photos, priors):  # noqa: F811
    task = _task(tmp_path, photos, ssr=False, mcr=False, scr=False, init_from_priors=True, priors_file=str(priors))
    assert _from_file(task.model.tok, priors)
    assert task.model.shared.projector is None  # no loss needs the targets
    auto = _task(tmp_path, photos, ssr=False, mcr=False, scr=False, priors_file=str(priors))
    assert not _from_file(auto.model.tok, priors)  # auto: today's rule, no targets -> no initialisation


def test_false_keeps_the_random_start_but_still_reads_the_targets(tmp_path, photos, priors):  # noqa: F811
    task = _task(tmp_path, photos, priors="refined", init_from_priors=False, priors_file=str(priors))
    assert not _from_file(task.model.tok, priors)
    assert task.model.shared.projector is not None


def test_true_without_a_priors_file_is_refused(tmp_path, photos):  # noqa: F811
    with pytest.raises(ConfigError, match="init_from_priors.*priors_file"):
        _task(tmp_path, photos, init_from_priors=True)


def test_kl_needs_the_kl_variant_and_then_trains_its_log_variance(tmp_path, photos):  # noqa: F811
    with pytest.raises(ConfigError, match="PAE-tiny-kl"):
        _task(tmp_path, photos, lambda_kl=0.01)
    task = _task(tmp_path, photos, name="PAE-tiny-kl", lambda_kl=0.01, ssr=False, scr=False)
    loss, terms = task.loss_fn(task.model, (photos.images[:2], photos.labels[:2]), 0)
    loss.backward()
    assert "kl" in terms and task.model.tok.latent_logvar.conv.weight.grad.abs().sum() > 0


def test_diffusion_loss_gets_its_own_engine_unit(tmp_path, photos):  # noqa: F811
    task = _task(tmp_path, photos, lambda_diffusion=0.1, diffusion_hidden=8, ssr=False, scr=False)
    den, unit_fn = task.extra_optimized["latent_denoiser"]
    batch = (photos.images[:2], photos.labels[:2])
    loss, terms = task.loss_fn(task.model, batch, 0)
    loss.backward()
    assert "diffusion" in terms and all(p.grad is None for p in den.parameters())
    d_loss, _ = unit_fn(den, batch, 0)
    d_loss.backward()
    assert all(p.grad is not None for p in den.parameters())
    assert task.model.shared.latents == []


def test_true_on_an_rae_is_refused():
    from types import SimpleNamespace

    from pae_fast.stages.train_tokenizer import _check_config

    t = dataclasses.replace(TokenizerConfig(), name="RAE-tiny", init_from_priors=True, priors_file="p.safetensors",
                            ssr=False, scr=False)
    with pytest.raises(ConfigError, match="RAE.*no projector"):
        _check_config(t, SimpleNamespace(kind="rae"))

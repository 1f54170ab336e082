"""Gradient shares: each regularizer's gradient norm at the latent over the reconstruction term's, against norms taken
by hand with torch.autograd.grad on single-term objectives; linear in lambda; only on logged steps; free otherwise."""

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch

from pae_fast.config import TrainConfig
from pae_fast.engine.task import Shared
from pae_fast.losses.total import PriorTargets, TokenizerLoss
from pae_fast.stages.tokenizer_task import tokenizer_loss_fn

B, C, G = 2, 8, 2
# single-term objectives (the LPIPS module stays: MCR measures its pairs with it; its weight 0 adds no gradient)
NO_REC = {"lambda_l1": 0.0, "lambda_lpips": 0.0}
ONLY = {"rec": {"ssr": False, "mcr": False, "scr": False},
        "ssr": {**NO_REC, "mcr": False, "scr": False},
        "mcr": {**NO_REC, "ssr": False, "scr": False},
        "scr": {**NO_REC, "ssr": False, "mcr": False}}  # fmt: skip


def _inputs(parts):
    g = torch.Generator().manual_seed(0)
    z = parts.rms1(B, G, G, C, generator=g).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    images = torch.rand(B, 3, 4 * G, 4 * G, generator=g)
    targets = PriorTargets(structure=torch.randn(B, G * G, 12, generator=g),
                           semantic=torch.randn(B, G * G, C, generator=g))  # fmt: skip
    return z, images, targets


def _loss(parts, dec, z, images, targets, grad_shares=False, **kw):
    cfg = parts.tok_cfg(**{"lpips_weights": "stand-in", "lambda_l1": 0.7, "lambda_lpips": 0.4, "lambda_ssr": 0.3,
                           "lambda_mcr": 0.6, "lambda_scr": 0.9, "ssr_gram": "raw", **kw})  # fmt: skip
    lp = parts.CountingLPIPS() if cfg.lpips_weights != "none" else None
    loss = TokenizerLoss(cfg, lpips=lp, kernel_backend="torch")
    return loss.generator_loss(images, z, dec, 10, seed=7, targets=targets, grad_shares=grad_shares)


def _hand_norms(parts, dec, z, images, targets, **kw) -> dict[str, float]:
    """||d(objective with only that term)/dz|| for the reconstruction and each regularizer, by hand."""
    out = {}
    for name, only in ONLY.items():
        total = _loss(parts, dec, z, images, targets, **{**kw, **only}).total
        (g,) = torch.autograd.grad(total, z)
        out[name] = float(g.double().norm())
    return out


def test_shares_equal_hand_computed_gradient_norms(parts):
    torch.manual_seed(0)
    dec = parts.TinyDecoder(channels=C)
    z, images, targets = _inputs(parts)
    out = _loss(parts, dec, z, images, targets, grad_shares=True)
    hand = _hand_norms(parts, dec, z, images, targets)
    for k in ("ssr", "mcr", "scr"):
        assert float(out.terms[f"grad_share/{k}"]) == pytest.approx(hand[k] / hand["rec"], rel=1e-5), k
    assert len({round(hand[k] / hand["rec"], 6) for k in ("ssr", "mcr", "scr")}) == 3  # three distinct shares
    assert not any(v.requires_grad for v in out.terms.values())


def test_shares_scale_linearly_with_lambda_and_ignore_the_reduction_of_other_terms(parts):
    torch.manual_seed(0)
    dec = parts.TinyDecoder(channels=C)
    z, images, targets = _inputs(parts)
    a = _loss(parts, dec, z, images, targets, grad_shares=True).terms
    b = _loss(parts, dec, z, images, targets, grad_shares=True, lambda_ssr=0.9, lambda_scr=0.45).terms
    assert float(b["grad_share/ssr"]) == pytest.approx(3 * float(a["grad_share/ssr"]), rel=1e-6)
    assert float(b["grad_share/scr"]) == pytest.approx(0.5 * float(a["grad_share/scr"]), rel=1e-6)
    assert float(b["grad_share/mcr"]) == pytest.approx(float(a["grad_share/mcr"]), rel=1e-6)
    # SSR's reduction is a scale: row_mean multiplies its share by N = G^2 = 4 (docs/method.md § SSR)
    c = _loss(parts, dec, z, images, targets, grad_shares=True, ssr_reduction="row_mean").terms
    assert float(c["grad_share/ssr"]) == pytest.approx(G * G * float(a["grad_share/ssr"]), rel=1e-6)


def test_shares_change_neither_the_loss_nor_any_gradient(parts):
    torch.manual_seed(0)
    dec = parts.TinyDecoder(channels=C)
    z, images, targets = _inputs(parts)
    grads = []
    for on in (False, True):
        dec.zero_grad()
        z.grad = None
        out = _loss(parts, dec, z, images, targets, grad_shares=on)
        out.total.backward()
        grads.append([z.grad.clone(), *(p.grad.clone() for p in dec.parameters())])
        assert ("grad_share/ssr" in out.terms) == on
        assert {k for k in out.terms if not k.startswith("grad_share/")} == {
            "l1", "lpips", "ssr", "mcr", "mcr_medium", "mcr_large", "scr", "scr_pooled", "scr_patch"}
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_only_terms_that_run_get_a_share(parts):
    torch.manual_seed(0)
    dec = parts.TinyDecoder(channels=C)
    z, images, targets = _inputs(parts)
    t = _loss(parts, dec, z, images, targets, grad_shares=True, mcr=False, lambda_scr=0.0).terms
    assert {k for k in t if k.startswith("grad_share/")} == {"grad_share/ssr"}
    # no reconstruction term to compare with: no shares
    t = _loss(parts, dec, z, images, targets, grad_shares=True, lambda_l1=0.0, lpips_weights="none").terms
    assert not any(k.startswith("grad_share/") for k in t)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_stage_asks_for_shares_on_logged_steps_only(enabled):
    asked = []

    class Model(torch.nn.Module):
        def forward(self, images, step, seed, grad_shares=False):
            asked.append(grad_shares)
            return images.sum(), {}, images

    cfg = SimpleNamespace(log_grad_shares=enabled)
    train = dataclasses.replace(TrainConfig(), log_every=4, steps=10)
    shared = Shared(loss=SimpleNamespace(cfg=cfg), seed=0, has_disc=False, announced=True, status={}, recons=[],
                    train=train)  # fmt: skip
    fn = tokenizer_loss_fn(shared)
    for step in range(10):
        fn(Model(), (torch.zeros(1, 3, 2, 2),), step)
    assert asked == [enabled and s in (3, 7, 9) for s in range(10)]
    # a holder without the run's TrainConfig (a benchmark timing plain steps) never asks
    asked.clear()
    del shared.train
    fn(Model(), (torch.zeros(1, 3, 2, 2),), 3)
    assert asked == [False]


def test_no_shares_under_fsdp_sharding(monkeypatch, caplog):
    """FSDP2 reshards parameters after each block's forward: the extra autograd.grad inside the sharded forward
    would reach them, so a sharded model is never asked (and the run log says why)."""
    import pae_fast.engine.parallel as parallel

    asked = []

    class Model(torch.nn.Module):
        def forward(self, images, step, seed, grad_shares=False):
            asked.append(grad_shares)
            return images.sum(), {}, images

    monkeypatch.setattr(parallel, "is_sharded", lambda m: True)
    train = dataclasses.replace(TrainConfig(), log_every=1, steps=3)
    shared = Shared(loss=SimpleNamespace(cfg=SimpleNamespace(log_grad_shares=True)), seed=0, has_disc=False,
                    announced=False, status={}, recons=[], train=train)  # fmt: skip
    logger = logging.getLogger("pae_fast.train.tokenizer")  # the engine's logger tree may not propagate to root
    logger.addHandler(caplog.handler)
    try:
        fn = tokenizer_loss_fn(shared)
        for step in range(3):
            fn(Model(), (torch.zeros(1, 3, 2, 2),), step)
    finally:
        logger.removeHandler(caplog.handler)
    assert asked == [False, False, False]
    assert "not computed under train.distributed=fsdp" in caplog.text

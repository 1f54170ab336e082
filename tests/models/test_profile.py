"""Parameter / MAC counts of the paper-size generators on the meta device, ``info --model``, and the presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pae_fast.models.profile import count_params, forward_gmacs, profile_generator
from pae_fast.registry import create_generator

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def xl1():
    with torch.device("meta"):
        return create_generator("LightningDiT-XL/1", in_channels=32)


@pytest.fixture(scope="module")
def ditdh_xl():
    with torch.device("meta"):
        return create_generator("DiTDH-XL", in_channels=768)


def test_lightningdit_xl1_parameter_count(xl1):
    # 28 blocks x 23,908,992 + embedders, final layer and the frozen 256 x 1152 sin-cos APE (counted, as in DiT)
    assert count_params(xl1) == 675_256_736
    assert round(count_params(xl1) / 1e6, 2) == 675.26
    assert count_params(xl1, trainable_only=True) == 675_256_736 - 256 * 1152
    assert all(p.device.type == "meta" for p in xl1.parameters())


def test_ditdh_xl_parameter_count(ditdh_xl):
    # trunk 28 x 23,908,992 + head 2 x 75,532,970 + final 9,968,384 + embedders/projector/APE/Fourier W 8,189,696
    assert count_params(ditdh_xl) == 838_675_796
    assert round(count_params(ditdh_xl) / 1e6) == 839


def test_lightningdit_xl1_gmacs(xl1):
    assert forward_gmacs(xl1) == pytest.approx(118.6, abs=0.05)
    x = torch.empty(4, 32, 16, 16, device="meta")
    t, y = torch.empty(4, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    assert forward_gmacs(xl1, (x, t, y)) == pytest.approx(4 * forward_gmacs(xl1), rel=1e-9)  # per batch


def test_ditdh_xl_gmacs_and_the_quoted_146_6(ditdh_xl):
    prof = profile_generator(ditdh_xl)
    head_adaln = prof.breakdown["head adaLN_modulation"] + prof.breakdown["final adaLN_modulation"]
    # per-token adaLN of the 2048-wide head: 256 tokens x (2 x 2048 x 12288 + 2048 x 4096) MACs
    assert head_adaln == pytest.approx(256 * (2 * 2048 * 12288 + 2048 * 4096) / 1e9, rel=1e-9)
    assert prof.gmacs == pytest.approx(161.58, abs=0.01)
    assert prof.gmacs - head_adaln == pytest.approx(146.6, abs=0.06)  # RAE's figure leaves those linears out
    assert sum(prof.breakdown.values()) == pytest.approx(prof.gmacs, rel=1e-9)


def test_gmacs_of_a_real_model_use_a_meta_twin(tiny):
    m = tiny("LightningDiT-B/2")
    g = forward_gmacs(m)
    assert g > 0 and all(p.device.type == "cpu" for p in m.parameters())
    N, D, hid = 16, 64, 170  # tokens, width, SwiGLU hidden int(2/3 * 256)
    per_block = N * (D * 3 * D + D * D + D * 2 * hid + hid * D) + 2 * N * N * D + 6 * D * D
    assert g * 1e9 >= 2 * per_block


def test_info_model_cli(capsys):
    from pae_fast.cli import main

    assert main(["info", "--model", "LightningDiT-XL/1"]) == 0
    out = capsys.readouterr().out
    assert "675,256,736" in out and "675.26M" in out and "118.63" in out
    assert main(["info", "--model", "LightningDiT-XL/7"]) == 2
    assert "Valid names" in capsys.readouterr().err


@pytest.mark.parametrize(
    "preset,params",
    [
        ("pae_lightningdit_xl1_80ep", 675_256_736),
        ("pae_lightningdit_xl1_800ep", 675_256_736 + 28 * 2 * 72),  # + q_norm / k_norm weights (head_dim 72)
        ("rae_ditdh_xl", 838_675_796),
    ],
)
def test_generator_presets(preset, params):
    from pae_fast.config import load_config
    from pae_fast.models.generator import generator_from_config

    cfg = load_config(CONFIGS / f"{preset}.yaml")
    assert count_params(generator_from_config(cfg.model, device="meta")) == params
    assert cfg.train.global_batch_size == 1024 and cfg.train.betas == (0.9, 0.95) and cfg.train.lr == 2e-4
    if preset.startswith("pae"):
        assert cfg.flow.shift == 0.7 and cfg.flow.cosine_loss and cfg.train.ema_decay == 0.9999
        assert (cfg.sample.steps, cfg.sample.shift, cfg.sample.guidance) == (249, 0.4, "cfg")  # 250 grid points
        expect = (2.5, 0.25, 100_000) if preset.endswith("_80ep") else (3.3, 0.3, 1_000_000)
        assert (cfg.sample.cfg_scale, cfg.sample.cfg_interval_start, cfg.train.steps) == expect
        assert cfg.model.use_qknorm == preset.endswith("_800ep")  # the authors' DiT800ep config; DiT80ep without
    else:
        assert cfg.flow.dimension_shift and not cfg.flow.cosine_loss  # alpha from the latent shape (test_path_time)
        assert (cfg.train.ema_decay, cfg.train.grad_clip, cfg.train.schedule) == (0.9995, 1.0, "linear")
        assert (cfg.sample.steps, cfg.sample.guidance, cfg.sample.autoguidance_scale) == (49, "autoguidance", 1.42)
        assert cfg.sample.dimension_shift


def test_meta_twin_rebuilds_both_generators_from_their_arch():
    from pae_fast.models.profile import meta_twin

    for name, kw in (("LightningDiT-B/1", {}), ("DiTDH-S", {"head_hidden_size": 64, "head_num_heads": 4})):
        m = create_generator(name, in_channels=4, input_size=4, num_classes=3, depth=1, hidden_size=32,
                             num_heads=4, **kw)
        twin = meta_twin(m)
        assert all(p.device.type == "meta" for p in twin.parameters())
        assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in m.parameters())

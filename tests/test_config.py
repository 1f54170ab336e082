"""Config round trip, overrides, bad keys and bad types."""

import pytest

from pae_fast.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
    parse_override_args,
    save_resolved,
)


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = Config()
    p = save_resolved(cfg, tmp_path)
    again = load_config(p)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


def test_preset_file_round_trip(tmp_path):
    cfg = load_config("configs/tiny_cpu.yaml")
    assert cfg.model.depth == 2 and cfg.train.precision == "fp32"
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(p) == cfg


def test_overrides_coerce_and_apply():
    cfg = load_config(None, parse_override_args(["--train.steps", "20", "--model.depth=2", "--train.lr", "1e-3"]))
    assert cfg.train.steps == 20 and cfg.model.depth == 2 and cfg.train.lr == pytest.approx(1e-3)
    cfg = apply_overrides(cfg, {"train.betas": [0.8, 0.9], "tokenizer.mcr_angles": [10, 20, 30]})
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.tokenizer.mcr_angles == (10.0, 20.0, 30.0)
    cfg = apply_overrides(cfg, {"model.depth": None})
    assert cfg.model.depth is None


def test_int_accepted_for_float_but_not_str_for_int():
    cfg = apply_overrides(Config(), {"train.lr": 1})
    assert isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got 'many'"):
        apply_overrides(Config(), {"train.steps": "many"})


@pytest.mark.parametrize(
    "data, match",
    [
        ({"train": {"stepz": 3}}, r"unknown config key 'train.stepz'.*Did you mean 'steps'.*Valid keys here:"),
        ({"bogus": 1}, r"unknown config key 'bogus'.*Valid keys here:.*train"),
        ({"train": {"precision": "fp8"}},
         r"train.precision: expected one of 'fp32' \| 'bf16' \| 'bf16-autocast' \| 'fp16', got 'fp8'"),
        ({"train": {"tf32": "yes"}}, r"train.tf32: expected bool"),
        ({"train": 5}, r"train: expected a mapping"),
        ({"train": {"betas": [0.9]}}, r"train.betas: expected a list of 2 items"),
        ({"flow": {"rae_alpha": -1.0}}, r"flow.rae_alpha must be > 0"),
    ],
)
def test_bad_keys_and_types_are_clear(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_bad_override_names_key_and_lists_valid():
    with pytest.raises(ConfigError, match=r"'model.deepth' \(command-line override\).*Did you mean 'depth'"):
        apply_overrides(Config(), {"model.deepth": 2})
    with pytest.raises(ConfigError, match=r"train is a section"):
        apply_overrides(Config(), {"train": 2})
    with pytest.raises(ConfigError, match=r"no value"):
        parse_override_args(["--train.steps"])
    with pytest.raises(ConfigError, match=r"unexpected argument"):
        parse_override_args(["train.steps", "3"])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml"):
        load_config(typo)


def test_rae_alpha_converts_to_shift_at_load():
    cfg = config_from_dict({"flow": {"rae_alpha": 4.0}})
    assert cfg.flow.shift == pytest.approx(0.25) and cfg.flow.rae_alpha is None


def test_sample_shift_is_the_authors_formula_and_tau_is_gone():
    import torch

    from pae_fast.flow.timesteps import shift_time

    cfg = config_from_dict({})
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = cfg.sample.shift  # PAE's 0.4 in t -> s t / (1 + (s - 1) t), no conversion
    torch.testing.assert_close(shift_time(t, s), s * t / (1 + (s - 1) * t))
    with pytest.raises(ConfigError, match="lightningdit_tau"):
        config_from_dict({"sample": {"lightningdit_tau": 0.4}})


def test_save_resolved_is_atomic_and_leaves_no_temp(tmp_path):
    save_resolved(Config(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]

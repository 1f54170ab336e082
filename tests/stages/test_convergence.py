"""The convergence stage (docs/method.md § Convergence): the speed-up arithmetic against naive formulas on synthetic
curves, the stage end to end on two tiny latent caches (2 seeds, tiny generator, FD on tiny VFM features), the
GPU-hours from a roofline table, and the command's error on bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pae_fast.cli import main
from pae_fast.errors import EXIT_DATA, EXIT_USAGE, ConfigError, DataError
from pae_fast.stages.convergence_math import crossing_step, gpu_hours, log_spaced_steps, speedup_summary

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


# ------------------------------------------------------------------------------------------------ the arithmetic


def power_law(a: float, b: float, steps: list[int]) -> list[float]:
    return [a * s ** (-b) for s in steps]


def test_log_spaced_steps_halve_from_the_last():
    assert log_spaced_steps(600, 6) == [19, 38, 75, 150, 300, 600]
    assert log_spaced_steps(8, 6) == [1, 2, 4, 8]  # duplicates and steps < 1 dropped
    with pytest.raises(ValueError):
        log_spaced_steps(0, 3)


@pytest.mark.parametrize("a,b,target", [(100.0, 0.5, 7.0), (30.0, 1.3, 0.05), (5.0, 0.2, 2.9)])
def test_crossing_of_a_power_law_is_exact(a, b, target):
    steps = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 10_000]
    vals = power_law(a, b, steps)
    naive = (a / target) ** (1 / b)  # a s^-b = target  <=>  s = (a / target)^(1/b)
    assert steps[0] < naive < steps[-1]
    assert crossing_step(steps, vals, target) == pytest.approx(naive, rel=1e-9)


def test_crossing_interpolates_log_log_between_the_bracketing_points():
    steps, vals = [10, 100, 1000], [50.0, 20.0, 4.0]
    target = 10.0
    f = (math.log(20) - math.log(10)) / (math.log(20) - math.log(4))  # between the 2nd and 3rd points
    naive = math.exp(math.log(100) + f * (math.log(1000) - math.log(100)))
    assert crossing_step(steps, vals, target) == pytest.approx(naive, rel=1e-12)
    # a linear (not log-log) interpolation would give another step: the rule is the log-log one
    assert abs(naive - (100 + (20 - 10) / (20 - 4) * 900)) > 50


def test_crossing_ties_never_and_first_point():
    steps, vals = [1, 10, 100], [9.0, 3.0, 1.0]
    assert crossing_step(steps, vals, 3.0) == 10.0  # a point exactly at the target: that step
    assert crossing_step(steps, vals, 1.0) == 100.0
    assert crossing_step(steps, vals, 0.5) is None  # never reached: never extrapolated
    assert crossing_step(steps, vals, 20.0) == 1.0  # reached at or before the first evaluation
    # the FIRST crossing counts, even when a later point rises above the target again
    assert crossing_step([1, 10, 100], [9.0, 2.0, 5.0], 3.0) == pytest.approx(
        math.exp(math.log(10) * (math.log(9) - math.log(3)) / (math.log(9) - math.log(2))))
    with pytest.raises(ValueError):
        crossing_step([1, 10], [1.0, -1.0], 0.5)  # log axes need positive values
    with pytest.raises(ValueError):
        crossing_step([10, 1], [2.0, 1.0], 1.5)


def test_speedup_summary_against_naive_power_laws():
    steps = [2 ** k for k in range(11)]  # 1 .. 1024
    # per seed: the baseline B = aB s^-0.5 and a faster space F = aF s^-0.8 (same exponent pairs, other scales)
    base = {0: (100.0, 0.5), 1: (120.0, 0.5)}
    fast = {0: (100.0, 0.8), 1: (90.0, 0.8)}
    curves = {"B": {s: (steps, power_law(a, b, steps)) for s, (a, b) in base.items()},
              "F": {s: (steps, power_law(a, b, steps)) for s, (a, b) in fast.items()},
              "N": {s: (steps, [1e6] * len(steps)) for s in base}}  # never reaches anything
    r = speedup_summary(curves, "B")
    for seed in (0, 1):
        a_b, b_b = base[seed]
        target = a_b * 1024 ** (-b_b)  # the baseline's final value
        assert r["target"][seed] == pytest.approx(target)
        naive_f = (fast[seed][0] / target) ** (1 / fast[seed][1])
        assert r["spaces"]["F"]["steps"][seed] == pytest.approx(naive_f, rel=1e-9)
        assert r["spaces"]["B"]["steps"][seed] == pytest.approx(1024)
        assert r["spaces"]["F"]["speedup"][seed] == pytest.approx(1024 / naive_f, rel=1e-9)
        assert r["spaces"]["B"]["speedup"][seed] == pytest.approx(1.0)
        assert r["spaces"]["N"]["steps"][seed] is None and r["spaces"]["N"]["speedup"][seed] is None
    x = [1024 / (fast[s][0] / (base[s][0] * 1024 ** -0.5)) ** (1 / 0.8) for s in (0, 1)]
    sp = r["spaces"]["F"]["speedup_spread"]
    assert sp["n"] == 2 and sp["mean"] == pytest.approx(sum(x) / 2)
    assert sp["std"] == pytest.approx(abs(x[0] - x[1]) / math.sqrt(2))  # sample std of two values
    assert sp["min"] == pytest.approx(min(x)) and sp["max"] == pytest.approx(max(x))
    assert r["spaces"]["N"]["never_reached"] == [0, 1] and r["spaces"]["N"]["speedup_spread"]["n"] == 0
    # swapping the roles changes the answer: F as the baseline, B never reaches F's (lower) final value
    r2 = speedup_summary(curves, "F")
    assert r2["spaces"]["B"]["never_reached"] == [0, 1]
    with pytest.raises(ValueError, match="baseline"):
        speedup_summary(curves, "X")


def test_gpu_hours_scale_with_steps_time_and_batch():
    assert gpu_hours(3600, 0.05, 32) == pytest.approx(0.05)
    assert gpu_hours(3600, 0.05, 1024) == pytest.approx(0.05 * 32)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_spaces(tmp_path_factory):
    """Two tiny latent caches (PAE-tiny 8x8x8 and RAE-tiny 128x8x8 shapes), random tokenizers saved as weights,
    a random ViT-tiny as the VFM, and reference images."""
    import pae_fast.models  # noqa: F401
    from pae_fast.data.latent_cache import write_latent_cache
    from pae_fast.io import save_safetensors
    from pae_fast.registry import create_encoder, create_tokenizer

    root = tmp_path_factory.mktemp("conv")
    g = torch.Generator().manual_seed(0)
    spaces = {}
    for name, tok, shape in (("PAE", "PAE-tiny", (8, 8, 8)), ("RAE", "RAE-tiny", (128, 8, 8))):
        torch.manual_seed(1)
        t = create_tokenizer(tok)
        w = root / f"{tok}.safetensors"
        save_safetensors({k: v.contiguous() for k, v in t.state_dict().items()}, w)
        labels = torch.arange(16) % 2
        z = torch.randn(16, *shape, generator=g) + labels.view(-1, 1, 1, 1).float()
        cache = write_latent_cache(root / f"cache_{name}", z, labels, shard_size=8, metadata={"tokenizer": tok})
        spaces[name] = (str(cache), str(w))
    vfm = create_encoder("ViT-tiny")
    vfm_w = root / "vfm.safetensors"
    save_safetensors({k: v.contiguous() for k, v in vfm.model.state_dict().items()}, vfm_w)  # timm key names
    reference = torch.rand(12, 3, 64, 64, generator=g)
    return root, spaces, str(vfm_w), reference


def _tiny_cfg(out: Path):
    from pae_fast.config import load_config

    return load_config(TINY, {"out_dir": str(out), "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2,
                              "train.steps": 8, "train.global_batch_size": 8, "train.log_every": 4,
                              "train.ckpt_every": 100, "train.progress": False, "data.batch_size": 8,
                              "sample.batch_size": 8})


def test_convergence_end_to_end_on_two_tiny_caches(tiny_spaces, tmp_path):
    from pae_fast.stages.convergence import POINTS_FILE, ConvergencePlan, LatentSpace, run_convergence

    root, spaces, vfm, reference = tiny_spaces
    roof = tmp_path / "roofline.json"
    roof.write_text(json.dumps({
        "assumptions": {"batch": 32, "precision": "bf16"},
        "models": {"LightningDiT-XL/1": {"fused": {"predicted": {"H100": {"step_s": 0.05}}},
                                         "reference": {"predicted": {"H100": {"step_s": 0.15}}}}}}))
    plan = ConvergencePlan(baseline="RAE", vfm_weights=vfm, seeds=(0, 1), points=3, per_class=2, sample_steps=2,
                           roofline=str(roof))
    out = tmp_path / "conv"
    r = run_convergence(_tiny_cfg(out), [LatentSpace("PAE", *spaces["PAE"]), LatentSpace("RAE", *spaces["RAE"])],
                        plan, reference)
    for f in ("convergence.json", "convergence.md", "convergence.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    j = json.loads((out / "convergence.json").read_text())
    assert j == json.loads(json.dumps(r))
    assert set(j["points"]) == {"PAE", "RAE"} and j["metrics"] == {"fd_vfm": "FD to the reference, VFM features"}
    for sp in ("PAE", "RAE"):
        assert set(j["points"][sp]) == {"0", "1"}
        for seed in ("0", "1"):
            pts = j["points"][sp][seed]
            assert sorted(int(s) for s in pts) == [2, 4, 8]
            assert all(math.isfinite(p["fd_vfm"]) and p["fd_vfm"] > 0 for p in pts.values())
            run = out / "runs" / sp / f"seed{seed}"
            assert json.loads((run / POINTS_FILE).read_text()) == pts
            assert (run / "checkpoints" / "0000008" / "ema.safetensors").is_file()
    # the two seeds are different runs
    assert j["points"]["PAE"]["0"]["8"] != j["points"]["PAE"]["1"]["8"]
    # the reported speed-ups are the pure function's, on the recorded points
    curves = {sp: {int(d): ([2, 4, 8], [j["points"][sp][d][str(s)]["fd_vfm"] for s in (2, 4, 8)]) for d in ("0", "1")}
              for sp in ("PAE", "RAE")}
    ref = speedup_summary(curves, "RAE")
    got = j["speedup"]["fd_vfm"]
    for sp in ("PAE", "RAE"):
        for d in (0, 1):
            assert got["spaces"][sp]["steps"][str(d)] == ref["spaces"][sp]["steps"][d]
    # hours: mean steps x step time x batch / 32 / 3600, from the roofline table
    rae_steps = ref["spaces"]["RAE"]["steps_spread"]["mean"]
    h = j["gpu_hours"]["fd_vfm"]["spaces"]["RAE"]
    assert h["reference"] == pytest.approx(rae_steps * 0.15 * 8 / 32 / 3600)
    assert h["pae_fast"] == pytest.approx(rae_steps * 0.05 * 8 / 32 / 3600)
    assert h["baseline_reference_over_this"] == pytest.approx(3.0)
    md = (out / "convergence.md").read_text()
    assert "convergence.png" in md and "Steps to reach RAE's final value" in md and "H100-hours" in md
    assert "nan" not in md.lower()

    # one point re-measured independently: the `sample` stage on the step-8 EMA checkpoint (same sampler, labels,
    # noise seed), decoded by the tokenizer into samples.npz, then the demo's image FD to the reference
    import dataclasses

    from pae_fast.stages.demo_measure import image_fd, load_npz_images, load_vfm
    from pae_fast.stages.sample import sample

    cfg = _tiny_cfg(tmp_path / "resample")
    sc = dataclasses.replace(cfg.sample, checkpoint=str(out / "runs" / "RAE" / "seed1"),
                             tokenizer_checkpoint=spaces["RAE"][1], output_dir=str(tmp_path / "resample"),
                             per_class=2, steps=2, guidance="none", seed=1, save_png=False, device="cpu")
    sample(dataclasses.replace(cfg, sample=sc, tokenizer=dataclasses.replace(cfg.tokenizer, name="RAE-tiny"),
                               data=dataclasses.replace(cfg.data, image_size=64)))
    images, _ = load_npz_images(tmp_path / "resample" / "samples.npz")
    fd = image_fd(load_vfm(vfm), images, reference)
    assert j["points"]["RAE"]["1"]["8"]["fd_vfm"] == pytest.approx(fd, rel=1e-4)


def test_convergence_reports_fid_with_inception_weights(tiny_spaces, tmp_path):
    """With Inception weights (random ones here, at the 75 px minimum input) every point also has an FID, and the
    summary a speed-up section for it."""
    from pae_fast.config import load_config
    from pae_fast.eval.inception import FIDInceptionV3
    from pae_fast.io import save_safetensors
    from pae_fast.stages.convergence import ConvergencePlan, LatentSpace, run_convergence

    root, spaces, vfm, reference = tiny_spaces
    torch.manual_seed(0)
    w = tmp_path / "inception.safetensors"
    save_safetensors({k: v.contiguous() for k, v in FIDInceptionV3(input_size=75).state_dict().items()}, w)
    out = tmp_path / "conv"
    cfg = load_config(TINY, {"out_dir": str(out), "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2,
                             "train.steps": 4, "train.global_batch_size": 8, "train.progress": False,
                             "data.batch_size": 8, "eval.inception_size": 75})
    plan = ConvergencePlan(baseline="PAE", vfm_weights=vfm, seeds=(3,), points=2, per_class=2, sample_steps=1,
                           inception_weights=str(w))
    r = run_convergence(cfg, [LatentSpace("PAE", *spaces["PAE"]), LatentSpace("RAE", *spaces["RAE"])], plan,
                        reference)
    assert set(r["metrics"]) == {"fd_vfm", "fid"} and set(r["speedup"]) == {"fd_vfm", "fid"}
    for sp in ("PAE", "RAE"):
        assert sorted(r["points"][sp]["3"]) == ["2", "4"]
        assert all(math.isfinite(p["fid"]) and p["fid"] >= 0 for p in r["points"][sp]["3"].values())
    assert "## FID (Inception)" in (out / "convergence.md").read_text()


def test_convergence_refuses_bad_input_before_writing(tiny_spaces, tmp_path):
    from pae_fast.stages.convergence import ConvergencePlan, LatentSpace, run_convergence

    root, spaces, vfm, reference = tiny_spaces
    cfg = _tiny_cfg(tmp_path / "bad")
    plan = ConvergencePlan(baseline="RAE", vfm_weights=vfm)
    with pytest.raises(ConfigError, match="two or more"):
        run_convergence(cfg, [LatentSpace("RAE", *spaces["RAE"])], plan, reference)
    with pytest.raises(ConfigError, match="baseline 'X'"):
        run_convergence(cfg, [LatentSpace("PAE", *spaces["PAE"]), LatentSpace("RAE", *spaces["RAE"])],
                        ConvergencePlan(baseline="X", vfm_weights=vfm), reference)
    with pytest.raises(DataError, match="roofline file"):  # checked before any training
        run_convergence(cfg, [LatentSpace("PAE", *spaces["PAE"]), LatentSpace("RAE", *spaces["RAE"])],
                        ConvergencePlan(baseline="RAE", vfm_weights=vfm, roofline=str(tmp_path / "none.json")),
                        reference)
    with pytest.raises(DataError, match="nowhere"):
        run_convergence(cfg, [LatentSpace("PAE", str(tmp_path / "nowhere"), spaces["PAE"][1]),
                              LatentSpace("RAE", *spaces["RAE"])], plan, reference)
    assert not (tmp_path / "bad").exists()


def test_cli_names_a_missing_cache_with_exit_code_3(tiny_spaces, tmp_path, capsys):
    root, spaces, vfm, _ = tiny_spaces
    missing = tmp_path / "no_such_cache"
    code = main(["convergence", "--config", str(TINY), "--out_dir", str(tmp_path / "out"),
                 "--space", "PAE", str(missing), spaces["PAE"][1], "--space", "RAE", *spaces["RAE"],
                 "--reference", str(root), "--vfm-weights", vfm])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_DATA
    assert len(err) == 1 and err[0].startswith("error: ") and str(missing) in err[0]
    assert not (tmp_path / "out").exists()
    code = main(["convergence", "--config", str(TINY), "--out_dir", str(tmp_path / "out"),
                 "--space", "PAE", *spaces["PAE"], "--space", "RAE", *spaces["RAE"], "--baseline", "nope",
                 "--reference", str(root), "--vfm-weights", vfm])
    assert code == EXIT_USAGE and "baseline 'nope'" in capsys.readouterr().err


def test_convergence_on_online_latents(tiny_spaces, tmp_path):
    """data.latents=online: each space is an image folder encoded on the fly by its tokenizer (the generator's
    latent shape read from the tokenizer)."""
    import numpy as np
    from PIL import Image

    from pae_fast.config import load_config
    from pae_fast.stages.convergence import ConvergencePlan, LatentSpace, run_convergence

    root, spaces, vfm, reference = tiny_spaces
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for k in range(2):
        (images / f"class{k}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"class{k}" / f"{i}.png")
    out = tmp_path / "conv"
    cfg = load_config(TINY, {"out_dir": str(out), "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2,
                             "train.steps": 2, "train.global_batch_size": 4, "train.progress": False,
                             "data.batch_size": 4, "data.latents": "online", "data.source": "folder",
                             "data.image_size": 64, "data.num_classes": 2, "data.loader": "pil"})
    plan = ConvergencePlan(baseline="RAE", vfm_weights=vfm, seeds=(0,), points=2, per_class=1, sample_steps=1)
    spaces_ = [LatentSpace("PAE", str(images), spaces["PAE"][1], "PAE-tiny"),
               LatentSpace("RAE", str(images), spaces["RAE"][1], "RAE-tiny")]
    r = run_convergence(cfg, spaces_, plan, reference)
    assert sorted(r["points"]["PAE"]["0"]) == ["1", "2"] and sorted(r["points"]["RAE"]["0"]) == ["1", "2"]
    from pae_fast.weights import read_metadata

    _, meta = read_metadata(out / "runs" / "PAE" / "seed0", True, "run")
    assert meta["latent_source"] == "online" and json.loads(meta["latent_shape"]) == [8, 8, 8]
    with pytest.raises(ConfigError, match="tokenizer's name"):
        run_convergence(cfg, [LatentSpace("PAE", str(images), spaces["PAE"][1]), spaces_[1]], plan, reference)

"""``python -m pae_fast demo --fast`` end to end on the real demo images (what ``make demo`` runs, scaled down).

Checks every section of ``summary.json`` for measured, finite values, the PNGs, and the direction any honest run
must show: the trained generator's image FD to held-out images is below the untrained one's, for PAE and the
RAE-style baseline. A second run with one sampling setting changed reuses every stage before sampling.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pae_fast.cli.demo import load_demo_config
from pae_fast.stages.demo_report import SECTIONS

ROOT = Path(__file__).resolve().parents[2]


def _numbers(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny ops: one thread each is fastest on a shared CPU
    return subprocess.run([sys.executable, "-m", "pae_fast", "demo", "--fast", "--out_dir", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    r = _demo(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_fast_demo_summary_has_every_section_measured_and_finite(demo_run):
    out, r = demo_run
    s = json.loads((out / "summary.json").read_text())
    for section in SECTIONS:
        nums = list(_numbers(s[section], section))
        assert nums, f"section {section} holds no numbers"
        bad = [(k, v) for k, v in nums if not math.isfinite(v)]
        assert not bad, bad
    for m in ("PAE", "RAE"):
        assert set(s["diffusability"][m]) >= {"viv", "lnc", "gsq", "sec", "lds", "cds", "erank"}
        assert s["reconstruction"][m]["psnr_heldout_db"] > 5.0
        g = s["generator"][m]
        assert g["val_loss_trained"] < g["val_loss_untrained"], (m, g)
        fd = s["image_fd"][m]
        assert fd["trained"] < fd["untrained"], (m, fd)  # the direction any honest run shows
    assert s["vfm"]["source"] == "mae" and s["vfm"]["final_loss"] < s["vfm"]["initial_loss"]
    assert s["losses"]["PAE"]["ssr"].startswith("on") and s["losses"]["RAE"]["ssr"] == "off"
    assert s["losses"]["PAE"]["lpips"].startswith("off") and s["losses"]["PAE"]["gan"].startswith("off")
    assert s["generator"]["PAE"]["steps"] == s["generator"]["RAE"]["steps"]
    shares = s["tokenizers"]["PAE"]["grad_shares"]  # the priors' gradient shares at z, from stats.jsonl
    assert "ssr" in shares["shares"] and set(shares["shares"]) <= {"ssr", "mcr", "scr"}
    assert all(0 < v < math.inf for v in shares["shares"].values()) and s["tokenizers"]["RAE"]["grad_shares"] == {}
    assert s["fast"] is True and s["stages_skipped"] == []
    for key, f in s["files"].items():  # named relative to the run folder, never by the machine's folders
        assert not Path(f).is_absolute() and (out / f).is_file() and (out / f).stat().st_size > 0, key
    md = (out / "summary.md").read_text()
    for heading in ("## Comparison", "## Losses and priors that ran", "pre-trained in this run", "image FD",
                    "Effective strength of each prior"):
        assert heading in md
    assert "nan" not in md.lower().replace("nans", "")
    assert "image FD trained (untrained)" in r.stdout


def test_fast_demo_measures_convergence_over_two_seeds(demo_run):
    """The convergence stage: 2 seeds x (PAE, RAE), image FD at the log-spaced steps of demo_fast (300 -> 4 points),
    the speed-up read off those points by the pure function, and the plot in the summary."""
    from pae_fast.stages.convergence_math import speedup_summary

    out, _ = demo_run
    s = json.loads((out / "summary.json").read_text())
    c = s["convergence"]
    assert c["baseline"] == "RAE" and c["seeds"] == [0, 1]
    for sp in ("PAE", "RAE"):
        for seed in ("0", "1"):
            assert sorted(int(k) for k in c["image_fd"][sp][seed]) == [38, 75, 150, 300]
    curves = {sp: {int(d): ([38, 75, 150, 300], [c["image_fd"][sp][d][str(k)]["fd_vfm"] for k in (38, 75, 150, 300)])
                   for d in ("0", "1")} for sp in ("PAE", "RAE")}
    want = speedup_summary(curves, "RAE")
    for sp in ("PAE", "RAE"):
        assert [c["spaces"][sp]["steps"][d] for d in ("0", "1")] == [want["spaces"][sp]["steps"][d] for d in (0, 1)]
    # the generator stages measure the convergence runs of the demo's seed (no second training)
    g = json.loads((out / "generator_pae" / "stage.json").read_text())["result"]
    conv = json.loads((out / "convergence" / "convergence.json").read_text())
    assert g["run"] == conv["runs"]["PAE"]["0"]
    assert s["files"]["convergence"] == "convergence/convergence.png" and (out / s["files"]["convergence"]).is_file()
    md = (out / "summary.md").read_text()
    assert "## Convergence" in md and "convergence/convergence.png" in md and "speed-up" in md


def test_rerun_skips_finished_stages_and_reruns_what_changed(demo_run):
    out, _ = demo_run
    r = _demo(out, "--sample.steps", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert "generator_pae" in s["stages_skipped"] and "tokenizer_rae" in s["stages_skipped"]
    assert "samples_pae" not in s["stages_skipped"] and "samples_rae" not in s["stages_skipped"]
    assert json.loads((out / "samples_pae" / "stage.json").read_text())["status"] == "done"


def test_fast_preset_scales_the_demo_down_and_dry_run_prints_it(tmp_path):
    full, fast = load_demo_config(None, False, []), load_demo_config(None, True, ["--train.steps", "7"])
    assert fast.demo.tokenizer_steps < full.demo.tokenizer_steps and fast.demo.mae_steps < full.demo.mae_steps
    assert fast.train.steps == 7 and fast.tokenizer.name == full.tokenizer.name == "PAE-tiny"
    r = subprocess.run([sys.executable, "-m", "pae_fast", "demo", "--fast", "--dry-run"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tokenizer_steps: 40" in r.stdout and "out_dir: runs/demo_fast" in r.stdout


def test_a_bad_demo_setting_is_one_line_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "pae_fast", "demo", "--fast", "--out_dir", str(out),
                        "--demo.tokenizer_steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.strip().splitlines() == ["error: demo.tokenizer_steps=0 is out of range: expected >= 1"]


def test_summary_paths_are_relative_to_the_run_folder(tmp_path):
    from pae_fast.stages.demo_report import run_relative

    out = tmp_path / "run"
    assert run_relative(out / "grids" / "a.png", out) == "grids/a.png"
    assert run_relative(str(out / "priors" / "priors.safetensors"), out) == "priors/priors.safetensors"
    elsewhere = tmp_path / "weights" / "vgg.pth"  # a file the user passed stays as given
    assert run_relative(elsewhere, out) == str(elsewhere)


def test_grad_shares_come_from_the_last_record_that_has_them(tmp_path):
    from pae_fast.stages.demo_report import grad_shares

    stats = tmp_path / "stats.jsonl"
    recs = [{"step": 5, "loss": 1.0, "grad_share/ssr": 0.5, "grad_share/scr": 2.0}, {"step": 10, "loss": 0.9,
            "grad_share/ssr": 0.25, "grad_share/mcr": 1.5}, {"step": 12, "loss": 0.8}]  # fmt: skip
    stats.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert grad_shares(str(stats)) == {"step": 10, "shares": {"ssr": 0.25, "mcr": 1.5}}
    assert grad_shares(str(tmp_path / "missing.jsonl")) == {}

"""train-tokenizer: a tiny PAE and a tiny RAE learn on real photographs (loss falls, held-out PSNR rises), resume is
bitwise exact with the GAN on, no gradient reaches the VFM or the prior targets, each regularizer off removes its term,
the saved weights load with create_tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pae_fast.config import ConfigError, load_config
from pae_fast.data.demo_images import build_demo_images
from pae_fast.io import load_safetensors
from pae_fast.registry import create_tokenizer
from pae_fast.stages.image_data import TensorImageDataset
from pae_fast.stages.train_tokenizer import build_tokenizer_task, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "tokenizer_tiny_cpu.yaml"
# a random-feature discriminator is allowed in tests only (explicitly: disc_weights=random)
GAN = {"tokenizer.lambda_gan": 0.5, "tokenizer.disc_weights": "random", "tokenizer.gan_start_step": 2,
       "tokenizer.disc_start_step": 1}


@pytest.fixture(scope="module")
def photos() -> tuple[TensorImageDataset, TensorImageDataset]:
    d = build_demo_images(train_per_class=4, heldout_per_class=2, num_classes=4, image_size=64, seed=0)
    return (TensorImageDataset(d.train.images, d.train.labels, "demo train"),
            TensorImageDataset(d.heldout.images, d.heldout.labels, "demo held-out"))


def tiny_cfg(out: Path, **overrides):
    base = {"out_dir": str(out), "train.progress": False, "train.log_every": 5, "train.global_batch_size": 8,
            "eval.batch_size": 8, "tokenizer.grid_items": 4}
    return load_config(PRESET, {**base, **overrides})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_learns(run: Path, min_gain_db: float) -> None:
    stats = [r for r in rows(run / "stats.jsonl") if "loss" in r]
    assert stats[-1]["loss"] < 0.8 * stats[0]["loss"], (stats[0]["loss"], stats[-1]["loss"])
    ev = rows(run / "eval.jsonl")
    assert ev[0]["step"] == 0 and ev[-1]["step"] > 0
    assert ev[-1]["psnr"] > ev[0]["psnr"] + min_gain_db, [(r["step"], r["psnr"]) for r in ev]
    assert (run / "grids" / f"step_{ev[-1]['step']:07d}.png").is_file()


def test_tiny_pae_learns_on_photographs(tmp_path, photos):
    out = tmp_path / "pae"
    cfg = tiny_cfg(out, **{"train.steps": 24, "train.ckpt_every": 12, "train.lr": 2e-3, "train.ema_decay": 0.5})
    assert train_tokenizer(cfg, photos[0], photos[1]) == out
    assert_learns(out, 1.0)
    keys = set(rows(out / "stats.jsonl")[-1])
    assert {"l1", "ssr", "mcr", "mcr_medium", "mcr_large", "scr", "scr_pooled", "scr_patch"} <= keys
    # every record has each regularizer's gradient share at z (computed on the logged steps only)
    shares = [[r[f"grad_share/{k}"] for k in ("ssr", "mcr", "scr")] for r in rows(out / "stats.jsonl")]
    assert len(shares) == 5 and all(0 < v < float("inf") for row in shares for v in row)
    # the run folder loads strictly with create_tokenizer (the newest checkpoint's EMA = the tokenizer's state dict)
    tok = create_tokenizer("PAE-tiny", weights=out)
    ema, meta = load_safetensors(out / "checkpoints" / "0000024" / "ema.safetensors")
    assert set(ema) == set(tok.state_dict())
    assert torch.equal(tok.decoder.pred.weight, ema["decoder.pred.weight"])
    assert json.loads(meta["losses"])["lpips"].startswith("off")
    assert meta["tokenizer"] == "PAE-tiny" and meta["kind"] == "pae"


def test_tiny_rae_learns_with_noise_augmentation(tmp_path, photos):
    out = tmp_path / "rae"
    cfg = tiny_cfg(out, **{"tokenizer.name": "RAE-tiny", "tokenizer.ssr": False, "tokenizer.scr": False,
                           "tokenizer.mcr": False, "tokenizer.noise_aug_tau": 0.8, "train.steps": 24,
                           "train.ckpt_every": 12, "train.lr": 2e-3, "train.ema_decay": 0.5})
    train_tokenizer(cfg, photos[0], photos[1])
    assert_learns(out, 1.0)
    assert set(rows(out / "stats.jsonl")[-1]) & {"ssr", "mcr", "scr"} == set()
    assert not any(k.startswith("grad_share/") for r in rows(out / "stats.jsonl") for k in r)
    tok = create_tokenizer("RAE-tiny", weights=out)
    assert tok.kind == "rae"


def _tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    return load_safetensors(ckpt / f"{name}.safetensors")[0]


def test_resume_is_bitwise_exact_with_the_gan(tmp_path, photos):
    over = {**GAN, "train.ckpt_every": 2, "train.lr": 1e-3, "train.ema_decay": 0.9}
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_tokenizer(tiny_cfg(straight, **over, **{"train.steps": 4}), photos[0], photos[1])
    train_tokenizer(tiny_cfg(split, **over, **{"train.steps": 2}), photos[0], photos[1])
    train_tokenizer(tiny_cfg(split, **over, **{"train.steps": 4}), photos[0], photos[1])  # resumes from step 2
    a, b = straight / "checkpoints" / "0000004", split / "checkpoints" / "0000004"
    for name in ("model", "ema", "disc"):
        ta, tb = _tensors(a, name), _tensors(b, name)
        assert set(ta) == set(tb)
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    last = rows(straight / "stats.jsonl")[-1]
    assert {"gan", "gan_weight", "disc/loss", "disc/logits_real"} <= set(last)  # the GAN phase ran
    assert last["tflops"] > 0 and last["mfu"] is None  # FLOPs counted (MFU needs a GPU's peak)
    # the EMA shares the frozen VFM with the model (no copy, no update) and its file still holds it
    ema, model = _tensors(a, "ema"), _tensors(a, "model")
    vfm = [k for k in ema if k.startswith("vfm.")]
    assert vfm and all(torch.equal(ema[k], model[k]) for k in vfm)


def test_flops_per_sample_match_a_counted_step(tmp_path, photos):
    """The task's FLOPs per image (parts counted on fake tensors) against FlopCounterMode over one real step, before
    the GAN starts and with it (generator loss + backward, then the discriminator's step)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pae_fast.kernels import use_backend

    task, _ = build_tokenizer_task(tiny_cfg(tmp_path / "f", **GAN), photos[0], photos[1])
    disc, disc_loss = task.extra_optimized["disc"]
    batch = (photos[0].images[:2], photos[0].labels[:2])
    rae_over = {"tokenizer.name": "RAE-tiny", "tokenizer.ssr": False, "tokenizer.scr": False, "tokenizer.mcr": False}
    rae, _ = build_tokenizer_task(tiny_cfg(tmp_path / "r", **rae_over),
                                  photos[0], photos[1])  # fmt: skip
    counter = FlopCounterMode(display=False)
    with use_backend("torch"), counter:  # the RAE's encoder trains nothing: its backward stops at the decoder
        rae.loss_fn(rae.model, batch, 0)[0].backward()
    assert rae.flops_per_sample(0) == pytest.approx(counter.get_total_flops() / 2, rel=0.02)
    for step in (0, 5):  # GAN from step 2, discriminator from step 1
        counter = FlopCounterMode(display=False)
        with use_backend("torch"), counter:
            task.loss_fn(task.model, batch, step)[0].backward()
            disc_loss(disc, batch, step)[0].backward()
        assert task.flops_per_sample(step) == pytest.approx(counter.get_total_flops() / 2, rel=0.02), step
    assert task.flops_per_sample(5) > 1.5 * task.flops_per_sample(0)


def test_flops_per_sample_count_lpips_batches(tmp_path, photos):
    """With LPIPS on (random AlexNet LPIPS), the reconstruction and both cascaded MCR pairs (the trunk on 4 image
    batches): the parts' count against FlopCounterMode over one real step."""
    from torch.utils.flop_counter import FlopCounterMode

    from pae_fast.kernels import use_backend
    from pae_fast.losses.lpips import LPIPS
    from pae_fast.stages.tokenizer_flops import count_tokenizer_step

    cfg = tiny_cfg(tmp_path / "l", **{"tokenizer.lambda_lpips": 1.0})
    task, _ = build_tokenizer_task(cfg, photos[0], photos[1])
    sh = task.model.shared
    sh.loss.lpips = LPIPS("alex", None, None)  # random weights: FLOPs only
    parts = count_tokenizer_step(task.model.tok, sh.loss, cfg.tokenizer, sh.projector, sh.raw_projection)
    assert parts.lpips_batches == 4 and parts.lpips_forward > 0 and parts.lpips_backward > 0  # real, recon, 2 MCR
    counter = FlopCounterMode(display=False)
    with use_backend("torch"), counter:
        task.loss_fn(task.model, (photos[0].images[:2], photos[0].labels[:2]), 0)[0].backward()
    assert parts.flops(0) == pytest.approx(counter.get_total_flops() / 2, rel=0.02)


@pytest.mark.parametrize("precision, train_dtype", [("bf16", torch.bfloat16), ("bf16-autocast", torch.float32)])
def test_lpips_trunk_follows_the_compute_dtype_and_heldout_lpips_stays_fp32(tmp_path, photos, precision, train_dtype):
    """``train.precision=bf16``: the loss's LPIPS keeps one bf16 channels-last trunk (no per-step weight cast), the
    held-out evaluator its own fp32 one (eval.jsonl values do not depend on the training precision); other modes: an
    fp32 channels-last training copy."""
    from safetensors.torch import save_file

    from pae_fast.losses.lpips import LPIPS

    torch.manual_seed(0)
    save_file(LPIPS("vgg").state_dict(), str(tmp_path / "lpips.safetensors"))
    cfg = tiny_cfg(tmp_path / "run", **{"train.precision": precision, "tokenizer.lambda_lpips": 1.0,
                                        "tokenizer.lpips_weights": str(tmp_path / "lpips.safetensors")})
    task, evaluator = build_tokenizer_task(cfg, photos[0], photos[1])
    train_lp = task.model.shared.loss.lpips
    assert train_lp.compute_dtype == train_dtype and evaluator.lpips.compute_dtype == torch.float32
    assert train_lp.channels_last and not evaluator.lpips.channels_last
    assert all(lin.weight.dtype == torch.float32 for lin in train_lp.lins)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = task.loss_fn(task.model, (photos[0].images[:2], photos[0].labels[:2]), 0)
    assert terms["lpips"].dtype == torch.float32 and math.isfinite(float(terms["lpips"]))
    loss.backward()


def _one_step(cfg, photos, disc_step: int | None = None):
    task, _ = build_tokenizer_task(cfg, photos[0], photos[1])
    batch = (photos[0].images[:4], photos[0].labels[:4])
    loss, terms = task.loss_fn(task.model, batch, 5)
    loss.backward()
    return task, terms


def test_no_gradient_reaches_the_vfm_or_the_targets(tmp_path, photos):
    cfg = tiny_cfg(tmp_path / "g", **GAN)
    task, terms = _one_step(cfg, photos)
    tok = task.model.tok
    assert all(p.grad is None for p in tok.vfm.parameters())
    assert all(not p.requires_grad for p in tok.vfm.parameters())
    sh = task.model.shared
    assert sh.raw_projection is not None and not any(b.requires_grad for b in sh.raw_projection.buffers())
    disc = task.extra_optimized["disc"][0]
    assert all(p.grad is None for p in disc.parameters())  # the generator's GAN term writes no D gradient
    assert tok.dam.fusion_proj.weight.grad is not None and tok.decoder.pred.weight.grad is not None
    assert "gan" in terms and "ssr" in terms


@pytest.mark.parametrize("switch,gone", [
    ("ssr", {"ssr"}),
    ("mcr", {"mcr", "mcr_medium", "mcr_large"}),
    ("scr", {"scr", "scr_pooled", "scr_patch"}),
])
def test_each_regularizer_off_removes_its_term(tmp_path, photos, switch, gone):
    on = _one_step(tiny_cfg(tmp_path / "on"), photos)[1]
    off = _one_step(tiny_cfg(tmp_path / "off", **{f"tokenizer.{switch}": False}), photos)[1]
    assert gone <= set(on)
    assert not gone & set(off)
    assert set(on) - gone == set(off)


def test_rae_with_ssr_is_refused_before_anything_is_written(tmp_path, photos):
    out = tmp_path / "bad"
    cfg = tiny_cfg(out, **{"tokenizer.name": "RAE-tiny"})
    with pytest.raises(ConfigError, match="tokenizer.ssr"):
        train_tokenizer(cfg, photos[0], photos[1])
    assert not out.exists()


def test_gan_with_gradient_accumulation_pairs_each_micro_batch(tmp_path, photos):
    """The discriminator's loss reads the reconstructions of the same micro-batches, in order (grad_accum 2)."""
    out = tmp_path / "accum"
    cfg = tiny_cfg(out, **{**GAN, "train.steps": 2, "train.ckpt_every": 2, "train.grad_accum": 2,
                           "tokenizer.gan_start_step": 0, "tokenizer.disc_start_step": 0, "tokenizer.mcr": False})
    task, _ = build_tokenizer_task(cfg, photos[0], photos[1])
    seen = []
    disc_fn = task.extra_optimized["disc"][1]
    recons = task.model.shared.recons

    def spy(model, batch, step):
        seen.append(recons[0].shape[0] if recons else 0)
        return disc_fn(model, batch, step)

    task.extra_optimized["disc"] = (task.extra_optimized["disc"][0], spy)
    from pae_fast.engine import train

    train(task, cfg.train, out, seed=cfg.seed)
    assert seen == [4, 4, 4, 4] and not recons  # 2 steps x 2 micro-batches of 4, nothing left behind
    assert "disc/loss" in rows(out / "stats.jsonl")[-1]


def test_heldout_metrics_add_lpips_and_rfid_when_their_networks_are_given(tmp_path):
    from pae_fast.eval.inception import FIDInceptionV3
    from pae_fast.losses.lpips import LPIPS
    from pae_fast.stages.tokenizer_eval import HeldoutEvaluator

    tok = create_tokenizer("PAE-tiny")
    g = torch.Generator().manual_seed(0)
    ds = TensorImageDataset(torch.rand(4, 3, 64, 64, generator=g), torch.zeros(4, dtype=torch.long))
    plain = HeldoutEvaluator(ds, 4, 2).evaluate(tok, 0, tmp_path, weights="raw")
    full = HeldoutEvaluator(ds, 4, 2, LPIPS("vgg"), FIDInceptionV3(input_size=75).eval()).evaluate(tok, 3, tmp_path,
                                                                                                   weights="ema")
    assert set(plain) == {"step", "weights", "psnr", "ssim", "num_images"}
    assert {"lpips", "rfid"} <= set(full) and full["psnr"] == pytest.approx(plain["psnr"])
    assert [r["step"] for r in rows(tmp_path / "eval.jsonl")] == [0, 3]
    assert (tmp_path / "grids" / "step_0000003.png").is_file()


def test_bf16_compute_weights_train_the_tokenizer_with_the_gan(tmp_path, photos):
    """``train.precision=bf16`` (the paper preset's): the tokenizer runs on its bf16 compute copy (images and latents
    cast on the way in, fixed position tables following the activations), the discriminator gets no compute copy
    (``use_compute_dtype``: its heads train in fp32), the masters and checkpoints stay fp32, and the loss is finite
    and falls."""
    from pae_fast.engine.precision import compute_weights
    from pae_fast.models.discriminator import create_discriminator

    out = tmp_path / "bf16"
    cfg = tiny_cfg(out, **{**GAN, "train.precision": "bf16", "train.steps": 6, "train.ckpt_every": 6,
                           "train.log_every": 3, "train.lr": 2e-3, "tokenizer.gan_start_step": 0,
                           "tokenizer.disc_start_step": 0})
    train_tokenizer(cfg, photos[0], photos[1])
    stats = [r for r in rows(out / "stats.jsonl") if "loss" in r]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["disc/loss"]) for r in stats)
    assert stats[-1]["l1"] < stats[0]["l1"]
    model = _tensors(out / "checkpoints" / "0000006", "model")
    assert all(t.dtype == torch.float32 for t in model.values() if t.is_floating_point())
    disc = create_discriminator(cfg.tokenizer, allow_random=True)
    assert compute_weights(disc, "bf16") is None and disc.compute_dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in _tensors(out / "checkpoints" / "0000006", "disc").values())
    tok = create_tokenizer("PAE-tiny").to(torch.bfloat16)
    assert tok.compute_dtype == torch.bfloat16
    x = torch.rand(2, 3, tok.image_size, tok.image_size)  # fp32 images into bf16 weights
    assert tok.decode(tok.encode(x)).dtype == torch.bfloat16
    assert tok.decode(torch.randn(2, *tok.latent_shape)).dtype == torch.bfloat16  # fp32 latents (a sampler's)


def test_bf16_discriminator_backbone_is_one_bf16_copy_through_the_engine(tmp_path, photos):
    """``train.precision=bf16`` through the engine: the discriminator unit trains the module itself (no copy), its
    frozen backbone is bf16 in the same storage at every step (cast once, never per step), the generator's GAN term
    sees that same module, the heads and their spectral-norm ``u`` stay fp32 and the logits are fp32."""
    from pae_fast.engine import train

    out = tmp_path / "bf16d"
    cfg = tiny_cfg(out, **{**GAN, "train.precision": "bf16", "train.steps": 2, "train.ckpt_every": 2,
                           "tokenizer.gan_start_step": 0, "tokenizer.disc_start_step": 0, "tokenizer.mcr": False})
    task, _ = build_tokenizer_task(cfg, photos[0], photos[1])
    disc, disc_fn = task.extra_optimized["disc"]
    assert task.model.shared.loss.discriminator is disc  # the generator pass and the unit share one module
    seen: list[dict] = []
    logits: list[torch.dtype] = []
    disc.register_forward_hook(lambda m, args, out_: logits.append(out_.dtype))

    def spy(model, batch, step):
        sn = [m.parametrizations.weight[0] for m in model.heads.modules() if hasattr(m, "parametrizations")]
        seen.append({"same": model is disc,
                     "ptrs": [p.data_ptr() for p in model.backbone.parameters()],
                     "backbone": {p.dtype for p in model.backbone.parameters()},
                     "heads": {p.dtype for p in model.heads.parameters()} | {s._u.dtype for s in sn}})
        return disc_fn(model, batch, step)

    task.extra_optimized["disc"] = (disc, spy)
    train(task, cfg.train, out, seed=cfg.seed)
    assert len(seen) == 2 and all(s["same"] for s in seen)
    assert seen[0]["ptrs"] == seen[1]["ptrs"]
    assert all(s["backbone"] == {torch.bfloat16} and s["heads"] == {torch.float32} for s in seen)
    assert len(logits) == 6 and set(logits) == {torch.float32}  # per step: the G term, then real + fake

"""Engine building blocks: LR schedules, EMA math, deterministic batching, batch-size checks, checkpoint files."""

import json
import math

import pytest
import torch
from torch import nn

from pae_fast.config import TrainConfig
from pae_fast.engine.checkpoint import CheckpointError, latest_checkpoint, validate_checkpoint, write_checkpoint
from pae_fast.engine.data import DataPosition, StepBatchSampler, epoch_permutation
from pae_fast.engine.loop import micro_batch_size
from pae_fast.engine.optim import build_optimizer, build_scheduler, ema_update, lr_factor, make_ema


def _lrs(schedule, steps=10, lr=1.0, min_lr=0.1, warmup=0, decay_start=0):
    return [lr * lr_factor(s, schedule=schedule, steps=steps, lr=lr, min_lr=min_lr, warmup_steps=warmup,
                           decay_start=decay_start) for s in range(steps)]


def test_lr_schedules_values():
    assert _lrs("constant") == [1.0] * 10
    # warm-up: (s + 1) / warmup for s < warmup, then constant
    assert _lrs("warmup", warmup=4) == pytest.approx([0.25, 0.5, 0.75, 1.0] + [1.0] * 6)
    # linear (DiT^DH): constant until decay_start, then linear to min_lr reached at `steps`
    lin = _lrs("linear", steps=10, decay_start=6)
    assert lin[:7] == pytest.approx([1.0] * 7)
    assert lin[7:] == pytest.approx([1.0 - 0.9 * 1 / 4, 1.0 - 0.9 * 2 / 4, 1.0 - 0.9 * 3 / 4])
    assert lr_factor(10, schedule="linear", steps=10, lr=1.0, min_lr=0.1, decay_start=6) == pytest.approx(0.1)
    # cosine: lr at the warm-up end, (lr + min_lr) / 2 half-way, min_lr at the end
    cos = _lrs("cosine", steps=12, warmup=2)
    assert cos[:2] == pytest.approx([0.5, 1.0])
    assert cos[2] == pytest.approx(1.0)
    assert cos[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lr_factor(12, schedule="cosine", steps=12, lr=1.0, min_lr=0.1, warmup_steps=2) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[2:], cos[3:]))
    with pytest.raises(ValueError, match="train.schedule='step'"):
        lr_factor(0, schedule="step", steps=1, lr=1.0, min_lr=0.0)


def test_scheduler_drives_optimizer_lr():
    cfg = TrainConfig(lr=2.0, min_lr=0.2, schedule="cosine", warmup_steps=3, steps=20, device="cpu")
    model = nn.Linear(3, 3)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2.0 * lr_factor(s, schedule="cosine", steps=20, lr=2.0, min_lr=0.2, warmup_steps=3) for s in range(20)]
    assert seen == pytest.approx(expected)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if g["params"][0].ndim < 2)


def test_ema_math():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = make_ema(model)
    assert not any(p.requires_grad for p in ema.parameters())
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.fill_(3.0)
        model[1].num_batches_tracked.fill_(7)
    ema_update(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)  # buffers are copied
    assert int(ema[1].num_batches_tracked) == 7
    # a masked (skipped) update changes nothing; decay 0 copies
    snap = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, 0.5, ok=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), snap))
    ema_update(ema, model, 0.0, ok=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters()))
    with pytest.raises(ValueError, match="ema_decay"):
        ema_update(ema, model, 1.5)


def test_ema_shares_frozen_parameters_and_skips_them():
    """A frozen part (a tokenizer's VFM) is the same tensor in the EMA: no copy, no update, still in its state dict;
    the trainable part is averaged as before. share_frozen=False (FSDP) copies everything."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    model[0].requires_grad_(False)
    ema = make_ema(model)
    assert ema[0].weight is model[0].weight and ema[0].bias is model[0].bias
    assert ema[1].weight is not model[1].weight and ema[1].weight.data_ptr() != model[1].weight.data_ptr()
    assert set(ema.state_dict()) == set(model.state_dict())
    assert model[1].weight.requires_grad  # the model's trainable parameters are untouched
    before = ema[1].weight.clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema_update(ema, model, 0.75)
    torch.testing.assert_close(ema[1].weight, 0.75 * before + 0.25 * model[1].weight)
    copied = make_ema(model, share_frozen=False)
    assert copied[0].weight is not model[0].weight and torch.equal(copied[0].weight, model[0].weight)


def test_micro_batch_size_errors_name_the_values():
    assert micro_batch_size(32, 2, 4) == 4
    with pytest.raises(ValueError, match=r"global_batch_size=30.*world_size=4.*grad_accum=2"):
        micro_batch_size(30, 4, 2)


def test_sampler_covers_each_global_batch_once_and_resumes():
    n, g = 23, 8  # 2 steps per epoch (drop_last), 7 samples unused per epoch
    full = StepBatchSampler(n, g, world_size=1, rank=0, grad_accum=1, seed=5)
    it = iter(full)
    steps = [next(it) for _ in range(6)]
    # ranks x accum split one global batch into disjoint micro-batches whose union is the single-process batch
    for rank_world, accum in ((2, 2), (4, 1), (1, 4)):
        parts = [iter(StepBatchSampler(n, g, rank_world, r, accum, seed=5)) for r in range(rank_world)]
        for s in range(6):
            micro = [next(p) for _ in range(accum) for p in parts]
            flat = sorted(i for m in micro for i in m)
            assert flat == sorted(steps[s]) and len(set(flat)) == g
    # epochs are permutations from (seed, epoch) only; the position after 3 steps is epoch 1, offset 8
    assert steps[0] + steps[1] == epoch_permutation(n, 5, 0)[:16].tolist()
    pos = DataPosition()
    for _ in range(3):
        pos = pos.advance(n, g)
    assert (pos.epoch, pos.offset) == (1, 8)
    resumed = iter(StepBatchSampler(n, g, 1, 0, 1, seed=5, start=pos))
    assert [next(resumed) for _ in range(3)] == steps[3:]
    with pytest.raises(ValueError, match="fewer than train.global_batch_size=8"):
        StepBatchSampler(5, 8, 1, 0, 1, seed=0)


def test_checkpoint_write_validate_and_damage(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        write_checkpoint(root, step, {"a.bin": lambda p, s=step: p.write_bytes(b"x" * (10 + s))}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["0000002", "0000003"]  # pruned, no temp folders left
    man = validate_checkpoint(root / "0000003")
    assert man["step"] == 3 and man["files"] == {"a.bin": 13}
    (root / "0000003" / "a.bin").write_bytes(b"x")  # truncated
    with pytest.raises(CheckpointError, match=r"0000003/a\.bin is damaged"):
        validate_checkpoint(root / "0000003")
    assert latest_checkpoint(tmp_path) == root / "0000002"
    (root / "0000002" / "COMPLETE").write_text("{not json")
    with pytest.raises(CheckpointError, match="COMPLETE is damaged"):
        validate_checkpoint(root / "0000002")
    assert latest_checkpoint(tmp_path) is None
    # a folder without a manifest (an interrupted write) is never picked
    (root / "0000009").mkdir()
    assert latest_checkpoint(root) is None
    assert json.loads((root / "0000003" / "COMPLETE").read_text())["step"] == 3


def test_apex_optimizer_missing_is_a_clear_error():
    cfg = TrainConfig(optimizer="apex_fused_adam", device="cpu")
    with pytest.raises(ImportError, match="NVIDIA apex"):
        build_optimizer(nn.Linear(2, 2), cfg, torch.device("cpu"))

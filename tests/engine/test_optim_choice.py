"""``train.optimizer: auto``: the default, the resolution table (a pure function: no GPU needed), the log line and
config record of a run, and resuming a checkpoint across ``adamw`` and ``fused_adamw_ema`` (same AdamW state)."""

from __future__ import annotations

import pytest
import torch

from pae_fast.config import Config, TrainConfig, dump_yaml
from pae_fast.engine import train
from pae_fast.engine.fused_optim import FusedAdamWEMA
from pae_fast.engine.optim import build_optimizer, load_optimizer_state_dict
from pae_fast.engine.optim_choice import choose_optimizer, record_optimizer, resolve_optimizer

H100 = dict(device_type="cuda", kernel_backend="auto", triton_reason=None, distributed="ddp", world_size=1,
            precision="bf16")  # fmt: skip


def test_auto_is_the_default():
    assert TrainConfig().optimizer == "auto"


@pytest.mark.parametrize("facts, name, reason", [
    ({}, "fused_adamw_ema", "one kernel"),
    ({"world_size": 8}, "fused_adamw_ema", "DDP on 8 ranks"),
    ({"kernel_backend": "triton", "precision": "fp32"}, "fused_adamw_ema", "precision fp32"),
    ({"precision": "bf16-autocast"}, "fused_adamw_ema", "bf16-autocast"),
    ({"distributed": "fsdp"}, "fused_adamw_ema", "one device"),  # FSDP on one rank does not shard
    ({"device_type": "cpu"}, "adamw", "training on cpu"),
    ({"kernel_backend": "torch"}, "adamw", "kernel_backend=torch"),
    ({"triton_reason": "the triton package is not installed"}, "adamw", "triton package is not installed"),
    ({"distributed": "fsdp", "world_size": 2}, "adamw", "fsdp shards the parameters"),
    ({"precision": "fp16"}, "adamw", "fp16"),
])  # fmt: skip
def test_auto_resolution_table(facts, name, reason):
    choice = choose_optimizer("auto", **{**H100, **facts})
    assert (choice.requested, choice.name) == ("auto", name)
    assert reason in choice.reason
    assert choice.log_text() == f"train.optimizer auto -> {name} ({choice.reason})"


def test_explicit_names_are_kept_and_unknown_ones_refused():
    for name in ("adamw", "fused_adamw_ema", "apex_fused_adam"):
        c = choose_optimizer(name, **{**H100, "device_type": "cpu"})
        assert c.name == name and c.reason == "set explicitly"
    with pytest.raises(ValueError, match="train.optimizer='sgd'"):
        choose_optimizer("sgd", **H100)


def test_resolve_and_build_on_this_cpu():
    cfg = TrainConfig()
    assert resolve_optimizer(cfg, torch.device("cpu"), 1).name == "adamw"
    opt = build_optimizer(torch.nn.Linear(3, 2), cfg, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    assert isinstance(build_optimizer(torch.nn.Linear(3, 2), cfg, torch.device("cpu"), name="fused_adamw_ema"),
                      FusedAdamWEMA)


def test_record_optimizer_rewrites_only_auto():
    yaml_text = dump_yaml(Config())
    choice = choose_optimizer("auto", **H100)
    out = record_optimizer(yaml_text, choice)
    assert "optimizer: fused_adamw_ema" in out and "optimizer: auto" not in out
    assert out.replace("fused_adamw_ema", "auto") == yaml_text  # nothing else changes
    explicit = choose_optimizer("adamw", **H100)
    assert record_optimizer(yaml_text, explicit) is yaml_text and record_optimizer(None, choice) is None


def test_run_logs_the_choice_once_and_records_it(tiny, tmp_path):
    cfg = tiny.tiny_cfg(steps=4, optimizer="auto")
    train(tiny.make_task(), cfg, tmp_path / "run", config_yaml=dump_yaml(Config(train=cfg)))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count("train.optimizer auto -> adamw (training on cpu") == 1, log
    assert "optimizer: adamw" in (tmp_path / "run" / "config.yaml").read_text()


def _close(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(q, p, atol=atol, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("first, second, precision", [
    ("adamw", "fused_adamw_ema", "fp32"), ("fused_adamw_ema", "adamw", "fp32"), ("adamw", "fused_adamw_ema", "bf16"),
])  # fmt: skip
def test_checkpoint_resumes_across_the_two_optimizers(tiny, tmp_path, first, second, precision):
    """4 steps with one optimizer, 4 more resumed with the other == 8 steps with one (AdamW with decoupled weight
    decay throughout, large enough to show; fused_adamw_ema runs its PyTorch path on CPU; bf16: with the compute
    copy, whose gradients reach the two optimizers in fp32 and bf16, hence the looser tolerance)."""
    kw = dict(weight_decay=0.5, lr=3e-2, log_every=4, ckpt_every=4, precision=precision)
    atol = 1e-6 if precision == "fp32" else 1e-5
    ref = train(tiny.make_task(), tiny.tiny_cfg(steps=8, optimizer=second, **kw), tmp_path / "ref", seed=2)
    train(tiny.make_task(), tiny.tiny_cfg(steps=4, optimizer=first, **kw), tmp_path / "run", seed=2)
    done = train(tiny.make_task(seed=7), tiny.tiny_cfg(steps=8, optimizer=second, **kw), tmp_path / "run", seed=2)
    assert done.step == 8
    _close(ref.model, done.model, atol)
    _close(ref.ema, done.ema, atol)


def test_loaded_groups_keep_this_optimizers_implementation():
    """A FusedAdamWEMA state dict loaded into torch AdamW: hyper-parameters from the checkpoint, AdamW's own
    implementation keys kept (torch alone would reset ``foreach``/``fused`` to None: on CUDA the engine's ``found_inf``
    skip flag then fails in the foreach path); the other way round, no torch-only keys are left behind."""
    lin = torch.nn.Linear(3, 2)
    fused = FusedAdamWEMA(lin.parameters(), lr=0.5, weight_decay=0.1)
    lin(torch.randn(4, 3)).sum().backward()
    fused.step()
    adamw = torch.optim.AdamW(lin.parameters(), lr=1e-3, weight_decay=0.2, foreach=True)
    load_optimizer_state_dict(adamw, lambda: adamw.load_state_dict(fused.state_dict()))
    g = adamw.param_groups[0]
    assert g["decoupled_weight_decay"] is True and g["foreach"] is True and g["fused"] is None
    assert (g["lr"], g["weight_decay"]) == (0.5, 0.1)
    st = adamw.state[lin.weight]
    assert st["step"].device.type == "cpu" and float(st["step"]) == 1.0
    back = FusedAdamWEMA(lin.parameters(), lr=1e-3)
    load_optimizer_state_dict(back, lambda: back.load_state_dict(adamw.state_dict()))
    assert set(back.param_groups[0]) == {"params", "lr", "betas", "eps", "weight_decay"}
    assert back.param_groups[0]["weight_decay"] == 0.1
    assert torch.equal(back.state[lin.weight]["exp_avg"], st["exp_avg"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_clipping_inside_fused_adamw_ema_matches_torch_clip_grad_norm(tiny, tmp_path, precision):
    """train.grad_clip with fused_adamw_ema (norm in one read of the gradients where they lie, the coefficient applied
    in the kernel) == torch AdamW after ``clip_grad_norm_`` on the fp32 masters; a clip small enough to act on every
    step (the unclipped run differs), a logged norm equal on both sides."""
    kw = dict(weight_decay=0.1, lr=3e-2, log_every=1, ckpt_every=6, precision=precision, steps=6)
    atol = 1e-6 if precision == "fp32" else 1e-5
    runs = {name: train(tiny.make_task(), tiny.tiny_cfg(optimizer=name, grad_clip=0.05, **kw), tmp_path / name, seed=3)
            for name in ("adamw", "fused_adamw_ema")}  # fmt: skip
    free = train(tiny.make_task(), tiny.tiny_cfg(optimizer="adamw", **kw), tmp_path / "free", seed=3)
    _close(runs["adamw"].model, runs["fused_adamw_ema"].model, atol)
    _close(runs["adamw"].ema, runs["fused_adamw_ema"].ema, atol)
    with pytest.raises(AssertionError):
        _close(free.model, runs["adamw"].model, atol)


def test_fused_clip_rule_is_torchs():
    """FusedAdamWEMA.clip_grad_norm_: the returned norm is the global 2-norm, and the update equals AdamW on gradients
    scaled by min(1, max_norm / (norm + 1e-6)) — clipped when the norm is large, untouched when it is small."""
    for scale, max_norm in ((10.0, 1.0), (1e-3, 1.0)):
        torch.manual_seed(0)
        a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
        b.load_state_dict(a.state_dict())
        grads = [torch.randn_like(p) * scale for p in a.parameters()]
        fused = FusedAdamWEMA(a.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
        ref = torch.optim.AdamW(b.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
        for p, q, g in zip(a.parameters(), b.parameters(), grads):
            p.grad, q.grad = g.clone(), g.clone()
        norm = fused.clip_grad_norm_(max_norm)
        expect = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        torch.testing.assert_close(norm.double(), expect, rtol=1e-6, atol=0)
        coef = min(1.0, max_norm / (float(expect) + 1e-6))
        for q in b.parameters():
            q.grad.mul_(coef)
        fused.step()
        ref.step()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        assert (coef < 1.0) == (scale > 1.0)

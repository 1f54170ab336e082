"""Precision policies: bf16 compute weights with fp32 masters (``train.precision=bf16``) against fp32 weights under
bf16 autocast (``bf16-autocast``)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pae_fast.engine import train
from pae_fast.engine.precision import PRECISIONS, ComputeWeights, autocast_dtype, compute_weights


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.frozen = nn.Linear(3, 3).requires_grad_(False)
        self.register_buffer("table", torch.linspace(0, 1, 3))

    def forward(self, x):
        return self.frozen(self.lin(x)) + self.table


def test_policy_names_and_autocast_dtypes():
    assert set(PRECISIONS) == {"fp32", "bf16", "bf16-autocast", "fp16"}
    assert autocast_dtype("bf16") == autocast_dtype("bf16-autocast") == torch.bfloat16
    assert autocast_dtype("fp16") == torch.float16 and autocast_dtype("fp32") is None
    with pytest.raises(ValueError, match="train.precision='fp8'"):
        autocast_dtype("fp8")
    net = _Net()
    assert compute_weights(net, "bf16-autocast") is None and compute_weights(net, "fp32") is None
    with pytest.raises(ValueError, match="fsdp"):
        compute_weights(net, "bf16", distributed="fsdp", world_size=2)


def test_compute_copy_grads_and_refresh():
    torch.manual_seed(0)
    net = _Net()
    cw = compute_weights(net, "bf16")
    assert isinstance(cw, ComputeWeights) and cw.module is not net
    assert cw.module.lin.weight.dtype == torch.bfloat16 and net.lin.weight.dtype == torch.float32
    assert cw.module.table.dtype == torch.float32  # buffers keep their precision
    assert [m for m, _ in cw.pairs] == [net.lin.weight, net.lin.bias]  # trainable parameters only
    x = torch.randn(4, 6)
    for _ in range(2):  # two micro-batches accumulate in the copy, then move to the masters once
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cw.module(x).float().sum().backward()
    cw.grads_to_master()
    assert net.lin.weight.grad.dtype == torch.float32 and cw.module.lin.weight.grad is None
    expected = 8 * cw.module.frozen.weight.float().sum(0)  # d sum / d bias: 4 rows x 2 passes through `frozen`
    torch.testing.assert_close(net.lin.bias.grad, expected, atol=0.05, rtol=0.02)
    opt = torch.optim.AdamW([net.lin.weight, net.lin.bias], lr=0.1)
    cw.attach(opt)
    opt.step()  # the step writes the bf16 copy
    assert torch.equal(cw.module.lin.weight, net.lin.weight.detach().to(torch.bfloat16))
    assert not torch.equal(cw.module.lin.weight.float(), net.lin.weight.detach())  # masters keep fp32 precision


def _generator_task(seed: int = 0):
    from pae_fast import create_generator
    from pae_fast.config import FlowConfig
    from pae_fast.engine import TrainTask
    from pae_fast.flow.loss import FlowLoss

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(64, 4, 4, 4, generator=g) * 0.5 + torch.linspace(-1, 1, 4).view(1, 4, 1, 1)
    labels = torch.randint(0, 10, (64,), generator=g)
    model = create_generator("LightningDiT-B/1", depth=2, hidden_size=64, num_heads=2, input_size=4, in_channels=4,
                             num_classes=10)  # fmt: skip
    data = torch.utils.data.TensorDataset(latents, labels)
    return TrainTask(name="gen", model=model, loss_fn=FlowLoss.from_config(FlowConfig()), dataset=data)


def _losses(path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if "loss" in json.loads(line)]


def test_bf16_compute_weights_follow_the_autocast_loss_curve(tiny, tmp_path):
    """Same seed, data and model: 40 steps of a small LightningDiT under each policy. Every logged mean loss (5-step
    windows) agrees within 1 % relative (measured: 0.2 %), and both curves fall (the model learns either way)."""
    curves = {}
    for prec in ("bf16-autocast", "bf16"):
        cfg = tiny.tiny_cfg(steps=40, global_batch_size=16, lr=2e-3, min_lr=2e-3, precision=prec, log_every=5,
                            ckpt_every=40, ema_decay=0.99)  # fmt: skip
        res = train(_generator_task(), cfg, tmp_path / prec, seed=0)
        assert res.step == 40 and all(p.dtype == torch.float32 for p in res.model.parameters())  # fp32 masters
        assert all(p.dtype == torch.float32 for p in res.ema.parameters())
        curves[prec] = _losses(res.stats_path)
    a, b = curves["bf16-autocast"], curves["bf16"]
    assert len(a) == len(b) == 8
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    assert max(rel) < 0.01, (a, b)
    assert a[-1] < 0.8 * a[0] and b[-1] < 0.8 * b[0], (a, b)


def test_bf16_compute_weights_resume_exactly(tiny, tmp_path):
    """The checkpoint holds the fp32 masters; the compute copy is rebuilt from them: 4 + 4 steps == 8 steps."""
    cfg = tiny.tiny_cfg(steps=8, precision="bf16", log_every=4, ckpt_every=4, grad_clip=1.0)
    ref = train(tiny.make_task(random_terms=True), cfg, tmp_path / "ref", seed=3)
    half = train(tiny.make_task(random_terms=True), tiny.tiny_cfg(**{**cfg.__dict__, "steps": 4}), tmp_path / "run",
                 seed=3)  # fmt: skip
    assert half.step == 4
    done = train(tiny.make_task(seed=9, random_terms=True), cfg, tmp_path / "run", seed=3)
    assert done.step == 8
    assert _equal(tiny.state_of(done.model), tiny.state_of(ref.model))
    assert _equal(tiny.state_of(done.ema), tiny.state_of(ref.ema))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_adamw_ema_optimizer_matches_adamw(tiny, tmp_path, precision):
    """train.optimizer=fused_adamw_ema (one kernel: AdamW + EMA + compute copy) against torch AdamW + foreach EMA:
    same weights and EMA after 8 steps, with a skipped (non-finite) step in the middle; the Triton kernel itself under
    the interpreter when it is on (fp32: the interpreter has no bf16 for the compute copy), torch's fused AdamW
    reference otherwise."""
    from pae_fast.kernels import interpreter_enabled

    backend = "triton" if interpreter_enabled() and precision == "fp32" else "auto"
    out = {}
    for opt in ("adamw", "fused_adamw_ema"):
        cfg = tiny.tiny_cfg(steps=8, precision=precision, optimizer=opt, weight_decay=0.05, kernel_backend=backend,
                            log_every=4, ckpt_every=8)  # fmt: skip
        out[opt] = train(tiny.make_task(nan_at=(3,)), cfg, tmp_path / opt, seed=1)
        assert out[opt].skipped_steps == 1
    a, b = out["adamw"], out["fused_adamw_ema"]
    for x, y in ((a.model, b.model), (a.ema, b.ema)):
        for (n, p), q in zip(x.state_dict().items(), y.state_dict().values()):
            torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    sa = torch.load(a.checkpoint_dir / "state.pt", weights_only=True)["optimizer"]["state"]
    sb = torch.load(b.checkpoint_dir / "state.pt", weights_only=True)["optimizer"]["state"]
    assert {int(v["step"]) for v in sb.values()} == {int(v["step"]) for v in sa.values()} == {7}


def test_fused_adamw_ema_resumes_exactly(tiny, tmp_path):
    cfg = tiny.tiny_cfg(steps=8, precision="bf16", optimizer="fused_adamw_ema", log_every=4, ckpt_every=4)
    ref = train(tiny.make_task(), cfg, tmp_path / "ref", seed=3)
    train(tiny.make_task(), tiny.tiny_cfg(**{**cfg.__dict__, "steps": 4}), tmp_path / "run", seed=3)
    done = train(tiny.make_task(seed=5), cfg, tmp_path / "run", seed=3)
    assert done.step == 8
    assert _equal(tiny.state_of(done.model), tiny.state_of(ref.model))
    assert _equal(tiny.state_of(done.ema), tiny.state_of(ref.ema))


def test_fused_optimizer_reads_the_bf16_gradients_in_place():
    """With fused_adamw_ema and nothing reading master gradients, the bf16 gradients stay on the compute copy and
    the optimizer consumes them: the same update as after the fp32 cast."""
    from pae_fast.engine.fused_optim import FusedAdamWEMA

    torch.manual_seed(0)
    nets = [_Net(), _Net()]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(4, 6)
    for needed, net in zip((True, False), nets):
        cw = compute_weights(net, "bf16")
        opt = FusedAdamWEMA([net.lin.weight, net.lin.bias], lr=0.1)
        cw.attach(opt)
        assert cw.direct_grads
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cw.module(x).float().sum().backward()
        cw.grads_to_master(needed=needed)
        assert (net.lin.weight.grad is not None) == needed and (cw.module.lin.weight.grad is None) == needed
        opt.step()
        assert cw.module.lin.weight.grad is None  # consumed
        assert torch.equal(cw.module.lin.weight, net.lin.weight.detach().to(torch.bfloat16))
    assert _equal(nets[0].state_dict(), nets[1].state_dict())


@pytest.mark.slow
def test_bf16_policy_with_fused_optimizer_under_ddp(tiny, tiny_script, tmp_path):
    """Two gloo ranks (DDP wraps the bf16 compute copy; its bf16 gradients are all-reduced) follow one process with the
    same global batch, within bf16 rounding of the gradient average."""
    import subprocess
    import sys

    from pae_fast.engine import latest_checkpoint
    from pae_fast.engine.checkpoint import load_weights_file

    overrides = dict(steps=4, ckpt_every=4, log_every=2, global_batch_size=8, precision="bf16",
                     optimizer="fused_adamw_ema", distributed="ddp")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tiny_script),
           "--out", str(tmp_path / "ddp"), "--cfg", json.dumps(overrides), "--init-seed-by-rank"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    single = train(tiny.make_task(), tiny.tiny_cfg(**overrides), tmp_path / "one")
    for which, ref in (("model", single.model), ("ema", single.ema)):
        got = tiny.TinyMLP()
        got.load_state_dict(load_weights_file(latest_checkpoint(tmp_path / "ddp") / f"{which}.safetensors")[0])
        for k, v in tiny.state_of(ref).items():
            torch.testing.assert_close(tiny.state_of(got)[k], v, rtol=2e-2, atol=2e-2, msg=f"{which}.{k}")


class _OwnPrecision(_Net):
    """A module that sets its own mixed precision (``use_compute_dtype``), as the tokenizer's discriminator does."""

    def __init__(self):
        super().__init__()
        self.calls: list[torch.dtype] = []

    def use_compute_dtype(self, dtype: torch.dtype) -> None:
        self.calls.append(dtype)
        self.frozen.weight.data = self.frozen.weight.data.to(dtype)


def test_a_module_with_use_compute_dtype_gets_no_copy_and_is_called_once_under_bf16():
    """The one exception to the compute copy: ``use_compute_dtype(bf16)`` is called once under ``bf16`` only, no copy
    is made, the trainable weights stay the fp32 tensors the optimizer holds."""
    net = _OwnPrecision()
    lin = net.lin.weight
    for precision in ("fp32", "bf16-autocast", "fp16"):
        assert compute_weights(net, precision) is None
    assert net.calls == []
    assert compute_weights(net, "bf16") is None
    assert net.calls == [torch.bfloat16]
    assert net.lin.weight is lin and lin.dtype == torch.float32 and net.frozen.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fsdp"):  # the FSDP refusal comes first, for every module
        compute_weights(_OwnPrecision(), "bf16", distributed="fsdp", world_size=2)
    plain = compute_weights(_Net(), "bf16")  # without the method: the usual bf16 copy of every floating parameter
    assert isinstance(plain, ComputeWeights) and plain.module.lin.weight.dtype == torch.bfloat16

"""A tiny MLP regression task for the engine tests; also a script (``python tiny_task.py --out DIR ...``) so tests
can train in a subprocess (SIGTERM) or under torchrun (DDP)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from pae_fast.config import TrainConfig
from pae_fast.engine import TrainTask, train


class RandomRegression(torch.utils.data.Dataset):
    """``n`` fixed random inputs with targets from a fixed random linear map (plus fixed noise)."""

    def __init__(self, n: int = 64, dim: int = 8, seed: int = 123):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, 4, generator=g)
        self.y = self.x @ w + 0.1 * torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class TinyMLP(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(dim, hidden), nn.GELU()),
                                     nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 4))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


def make_loss(random_terms: bool = False, nan_at: tuple[int, ...] = (), sleep_s: float = 0.0):
    """loss_fn(model, batch, step): MSE; optional RNG use (torch and numpy), NaN at given steps and a sleep per
    step (so a signal test can catch the run mid-way)."""

    def loss_fn(model: nn.Module, batch, step: int):
        x, y = batch
        if random_terms:
            x = x + 0.01 * torch.randn_like(x) + 0.01 * float(np.random.rand())
        mse = (model(x) - y).pow(2).mean()
        loss = mse
        if step in nan_at:
            loss = loss * float("nan")
        if sleep_s:
            time.sleep(sleep_s)
        return loss, {"mse": mse.detach()}

    return loss_fn


def make_task(seed: int = 0, n: int = 64, dropout: float = 0.0, **loss_kw) -> TrainTask:
    torch.manual_seed(seed)
    return TrainTask(name="tiny", model=TinyMLP(dropout=dropout), loss_fn=make_loss(**loss_kw),
                     dataset=RandomRegression(n), metadata={"kind": "tiny"})


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(steps=12, global_batch_size=8, lr=1e-2, min_lr=1e-3, precision="fp32", log_every=4, ckpt_every=4,
                keep_last=0, ema_decay=0.9, device="cpu", progress=False, tf32=False)
    base.update(kw)
    return TrainConfig(**base)


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cfg", default="{}", help="JSON TrainConfig overrides")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--random-terms", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--init-seed-by-rank", action="store_true", help="different initial weights on each rank")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = tiny_cfg(**json.loads(a.cfg))
    init_seed = int(os.environ.get("RANK", "0")) if a.init_seed_by_rank else 0
    task = make_task(seed=init_seed, dropout=a.dropout, random_terms=a.random_terms, sleep_s=a.sleep)
    res = train(task, cfg, a.out, seed=0, config_yaml="train: tiny\n")
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {"step": res.step, "interrupted": res.interrupted, "checkpoint": str(res.checkpoint_dir),
                   "cfg": dataclasses.asdict(cfg)["steps"]}
        print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

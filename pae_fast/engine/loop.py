"""The training loop shared by prior refinement, tokenizer and generator training: :func:`train`.

One optimizer step = ``grad_accum`` micro-batches per rank of ``global_batch_size / (world_size * grad_accum)``
samples; the micro-batch losses are averaged (``loss / grad_accum``) and DDP/FSDP average over ranks, so any
(world, accum) split of the same global batch computes the same gradient. Per step, on the device only (no host
sync): bf16/fp16 autocast, backward, non-finite check (the step is skipped with a device flag, so the optimizer,
and the EMA leave the weights untouched), gradient clipping, the optimizer step, the LR schedule, the EMA update and
the loss sums. The host reads the sums every ``log_every`` steps.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pae_fast.engine import distributed as D
from pae_fast.engine import parallel as P
from pae_fast.engine.data import DataPosition, StepBatchSampler, make_loader, to_device
from pae_fast.engine.lock import RunLock
from pae_fast.engine.monitor import Preemption, StatsWriter, close_logger, setup_logger
from pae_fast.engine.optim import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    ema_update,
    make_ema,
    master_grads_read,
    supports_found_inf,
)
from pae_fast.engine.optim_choice import record_optimizer, resolve_optimizer
from pae_fast.engine.outputs import TrainerOutputs
from pae_fast.engine.precision import ComputeWeights, autocast_dtype, compute_weights
from pae_fast.engine.runtime import (
    NonFiniteLossError,
    TrainResult,
    check_loss_output,
    check_train_config,
    is_log_step,
    kernel_scope,
    micro_batch_size,
    precision_flags,
)
from pae_fast.engine.state import (
    ResumeBundle,
    find_resume,
    restore_trainer,
    seed_all,
)
from pae_fast.engine.task import LossFn, TrainTask
from pae_fast.errors import PreemptedError, record_preemption
from pae_fast.io import atomic_write_text
from pae_fast.progress import is_terminal
from pae_fast.weights import load_into

__all__ = ["train", "TrainResult", "NonFiniteLossError", "micro_batch_size", "check_train_config"]


def _trained(raw: nn.Module, compute: ComputeWeights | None) -> nn.Module:
    """The module forward/backward run on: the bf16 compute copy (``train.precision=bf16``) or ``raw``."""
    return compute.module if compute is not None else raw


@dataclass
class _Unit:
    """One optimised module: the main model, or an ``extra_optimized`` one (e.g. a discriminator)."""

    name: str
    raw: nn.Module
    wrapped: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    forward: Callable[[Any, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]

    def trainable(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]


class _Trainer(TrainerOutputs):
    def __init__(self, task: TrainTask, cfg, out: Path, seed: int, config_yaml: str | None, device: torch.device,
                 log: logging.Logger):
        self.task, self.cfg, self.out, self.seed, self.config_yaml = task, cfg, out, seed, config_yaml
        self.device, self.log = device, log
        self.rank, self.world = D.get_rank(), D.get_world_size()
        self.main = self.rank == 0
        self.micro = micro_batch_size(cfg.global_batch_size, self.world, cfg.grad_accum)
        self.ckpt_root = out / "checkpoints"
        self.stats = StatsWriter(out / "stats.jsonl", self.main, out / "tensorboard" if cfg.tensorboard else None)
        self.step = 0
        self.pos = DataPosition()
        self.last_ckpt: Path | None = None
        self.autocast_dtype = autocast_dtype(cfg.precision)
        self.compute: dict[str, ComputeWeights | None] = {}  # per unit: the bf16 compute copy (train.precision=bf16)
        mode = {"off": None, "default": "default", "max-autotune": "max-autotune"}.get(cfg.compile, cfg.compile)
        if mode == "reduce-overhead" and device.type != "cuda":
            log.warning("train.compile=reduce-overhead (CUDA graphs) needs CUDA; compiling with mode=default on %s",
                        device)
            mode = "default"
        self.compile_mode = mode
        # train.optimizer auto: decided once (inside the run's kernel scope), logged, and recorded in config.yaml
        self.optimizer_choice = resolve_optimizer(cfg, device, self.world)
        if cfg.optimizer == "auto":
            log.info("%s", self.optimizer_choice.log_text())
        self.config_yaml = record_optimizer(config_yaml, self.optimizer_choice)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        task, cfg, dev = self.task, self.cfg, self.device
        try:
            num_samples = len(task.dataset)
        except TypeError as e:
            raise TypeError(f"TrainTask.dataset must be a map-style dataset with __len__ ({e})") from e
        self.num_samples = num_samples
        bundle: ResumeBundle | None = find_resume(cfg.resume, self.out, list(task.extra_optimized), self.log)

        raw = task.model.to(dev)
        if bundle is not None:
            load_into(raw, bundle.model, what=str(bundle.path / "model.safetensors"))
        P.broadcast_module(raw)  # every rank starts from rank 0's weights
        self.template = copy.deepcopy(raw).to("meta") if cfg.distributed == "fsdp" and self.world > 1 else None
        ema = make_ema(raw, share_frozen=self.template is None)  # frozen parameters (a VFM) shared, not averaged
        if bundle is not None:
            load_into(ema, bundle.ema, what=str(bundle.path / "ema.safetensors"))
        self.compute["model"] = compute_weights(raw, cfg.precision, cfg.distributed, self.world)
        wrapped = P.wrap_model(_trained(raw, self.compute["model"]), cfg.distributed, dev, cfg.find_unused_parameters)
        self.ema = P.shard_like(ema, raw)
        self.units = [self._unit("model", raw, wrapped, task.loss_fn)]
        for name, (module, loss_fn) in task.extra_optimized.items():
            module = module.to(dev)
            if bundle is not None:
                load_into(module, bundle.extras[name], what=str(bundle.path / f"{name}.safetensors"))
            P.broadcast_module(module)
            self.compute[name] = cw = compute_weights(module, cfg.precision, cfg.distributed, self.world)
            wrapped_x = P.wrap_model(_trained(module, cw), cfg.distributed, dev, cfg.find_unused_parameters)
            self.units.append(self._unit(name, module, wrapped_x, loss_fn))
        self._compile_blocks()

        seed_all(self.seed + self.rank)
        self.skipped_total = torch.zeros((), dtype=torch.int64, device=dev)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
        self.streak = torch.zeros((), dtype=torch.int64, device=dev)  # consecutive skipped steps so far
        self.worst_streak = torch.zeros((), dtype=torch.int64, device=dev)  # longest streak (device: no host sync)
        self.worst_streak_end = torch.full((), -1, dtype=torch.int64, device=dev)
        if bundle is not None:
            restore_trainer(self, bundle)
        if self.main:
            self.stats.rewind(self.step)
        self._reset_meters()

    def _unit(self, name: str, raw: nn.Module, wrapped: nn.Module, loss_fn: LossFn) -> _Unit:
        opt = build_optimizer(raw, self.cfg, self.device, name=self.optimizer_choice.name)
        if self.compute.get(name) is not None:
            self.compute[name].attach(opt)  # the optimizer step writes the bf16 compute copy
        if name == "model" and hasattr(opt, "set_ema"):  # fused_adamw_ema updates the EMA in its kernel
            opt.set_ema(self.ema, raw, self.cfg.ema_decay)
        sched = build_scheduler(opt, self.cfg)
        scaler = torch.amp.GradScaler(self.device.type) if self.cfg.precision == "fp16" else None

        def forward(batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return loss_fn(wrapped, batch, step)

        if self.compile_mode is not None and self.cfg.compile_scope == "step":
            forward = torch.compile(forward, mode=None if self.compile_mode == "default" else self.compile_mode)
        return _Unit(name, raw, wrapped, loss_fn, opt, sched, scaler, forward)

    def _compile_blocks(self) -> None:
        if self.compile_mode is None or self.cfg.compile_scope != "block":
            return
        for unit in self.units:
            blocks = P.find_blocks(_trained(unit.raw, self.compute.get(unit.name)))
            if not blocks:
                raise ValueError(
                    f"train.compile_scope=block but {type(unit.raw).__name__} ({unit.name}) has no `blocks` or "
                    "`layers` ModuleList to compile; use train.compile_scope=step"
                )
            for blk in blocks:
                blk.compile(mode=None if self.compile_mode == "default" else self.compile_mode)

    # ------------------------------------------------------------------------------------------------ step
    def _reset_meters(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}  # per term: the ok steps that reported it (some only on log steps)
        self.n_bad = torch.zeros((), dtype=torch.float32, device=self.device)
        self.t_last = time.perf_counter()
        self.step_last = self.step

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _no_sync(self, unit: _Unit, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        w = unit.wrapped
        if P.is_sharded(w):
            w.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if not last and hasattr(w, "no_sync"):
            return w.no_sync()
        return contextlib.nullcontext()

    def _phase(self, unit: _Unit, batches: Iterator[Any], step: int, want_norm: bool) -> tuple[torch.Tensor, Any]:
        """Forward/backward over ``grad_accum`` micro-batches, then the (masked) optimizer step of ``unit``."""
        accum = self.cfg.grad_accum
        unit.optimizer.zero_grad(set_to_none=True)
        loss_sum: torch.Tensor | None = None
        terms_sum: dict[str, torch.Tensor] = {}
        for k, batch in enumerate(batches):
            with self._no_sync(unit, k == accum - 1):
                if self.compile_mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                with self._autocast():
                    loss, terms = unit.forward(batch, step)
                if step == self.start_step and k == 0:
                    check_loss_output(unit.name, loss, terms)
                loss = loss.float()
                scaled = loss / accum
                (unit.scaler.scale(scaled) if unit.scaler is not None else scaled).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            for name, v in terms.items():
                v = v.detach().float() / accum
                terms_sum[name] = terms_sum[name] + v if name in terms_sum else v
        assert loss_sum is not None
        if self.compute.get(unit.name) is not None:
            # bf16 gradients -> the fp32 masters' .grad (left in place for fused_adamw_ema when nothing reads them)
            self.compute[unit.name].grads_to_master(
                needed=master_grads_read(unit.optimizer, self.cfg.grad_clip, want_norm))
        loss_mean = loss_sum / accum
        bad = ~torch.isfinite(loss_mean)
        if self.world > 1:  # every rank must take (or skip) the same step; a device collective, no host sync
            bad_i = bad.to(torch.int32)
            torch.distributed.all_reduce(bad_i, op=torch.distributed.ReduceOp.MAX)
            bad = bad_i.bool()
        params = unit.trainable()
        if unit.scaler is not None:  # poison the grads of a non-finite loss so the scaler's inf check skips it
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, torch.where(bad, float("nan"), 1.0).to(grads[0].dtype))
            unit.scaler.unscale_(unit.optimizer)
        norm = clip_gradients(unit.optimizer, params, self.cfg.grad_clip, want_norm)
        if norm is not None:
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            if unit.scaler is None:
                bad = bad | ~torch.isfinite(norm)
        ok = ~bad
        self._optimizer_step(unit, ok)
        with warnings.catch_warnings():  # a skipped first step would warn that the scheduler stepped first
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            unit.scheduler.step()
        prefix = "" if unit.name == "model" else f"{unit.name}/"
        okf = ok.float()
        for name, v in {"loss": loss_mean, **terms_sum}.items():
            key = prefix + name
            v = torch.where(ok, v, 0.0)
            self.sums[key] = self.sums[key] + v if key in self.sums else v
            self.counts[key] = self.counts[key] + okf if key in self.counts else okf
        if unit.name == "model":
            self.n_bad += 1.0 - okf
        return ok, norm

    def _optimizer_step(self, unit: _Unit, ok: torch.Tensor) -> None:
        opt = unit.optimizer
        if unit.scaler is not None:
            unit.scaler.step(opt)
            unit.scaler.update()
        elif supports_found_inf(opt):  # torch's fused AdamW skips on a device flag: no host sync
            opt.grad_scale = None
            opt.found_inf = (~ok).float()
            opt.step()
        elif bool(ok):  # foreach AdamW on CPU (a sync costs nothing there) and apex FusedAdam
            opt.step()

    def _train_step(self, it: Iterator[Any], step: int, want_norm: bool) -> Any:
        main = self.units[0]
        keep = len(self.units) > 1
        kept: list[Any] = []

        def batches() -> Iterator[Any]:
            for _ in range(self.cfg.grad_accum):
                b = to_device(next(it), self.device)
                if keep:
                    kept.append(b)
                yield b

        self.lr_used = main.optimizer.param_groups[0]["lr"]
        ok, norm = self._phase(main, batches(), step, want_norm)
        ema_update(self.ema, main.raw, self.cfg.ema_decay, ok, params=not getattr(main.optimizer, "updates_ema", False))
        bad = ~ok
        self.skipped_total += bad.to(torch.int64)
        for unit in self.units[1:]:  # extras: their non-finite steps are skipped too and feed nonfinite=stop
            bad = bad | ~self._phase(unit, iter(kept), step, False)[0]
        self.first_bad = torch.where((self.first_bad < 0) & bad, step, self.first_bad)
        self.streak = torch.where(bad, self.streak + 1, 0)
        longer = self.streak > self.worst_streak
        self.worst_streak = torch.where(longer, self.streak, self.worst_streak)
        self.worst_streak_end = torch.where(longer, step, self.worst_streak_end)
        return norm

    # ------------------------------------------------------------------------------------------------ run
    def run(self, preempt: Preemption) -> TrainResult:
        cfg = self.cfg
        self.start_step = self.step
        sampler = StepBatchSampler(self.num_samples, cfg.global_batch_size, self.world, self.rank, cfg.grad_accum,
                                   self.seed, self.pos)
        loader = make_loader(self.task.dataset, sampler, num_workers=self.task.num_workers,
                             collate_fn=self.task.collate_fn, pin_memory=self.device.type == "cuda",
                             seed=self.seed * 1_000_003 + self.rank * 7919 + self.step)
        self.log.info(
            "training %s: %d steps from %d, global batch %d = %d ranks x %d accum x %d, %d samples, device %s, "
            "precision %s, compile %s", self.task.name, cfg.steps, self.step, cfg.global_batch_size, self.world,
            cfg.grad_accum, self.micro, self.num_samples, self.device, cfg.precision, cfg.compile,
        )
        interrupted = False
        self.pbar = None
        if self.main and cfg.progress and self.step < cfg.steps and is_terminal():  # else: the log_every lines
            from tqdm import tqdm

            self.pbar = tqdm(total=cfg.steps, initial=self.step, desc=self.task.name, dynamic_ncols=True)
        for unit in self.units:
            unit.raw.train()
        it = iter(loader)
        try:
            while self.step < cfg.steps:
                want_norm = is_log_step(self.step, cfg)
                norm = self._train_step(it, self.step, want_norm)
                self.step += 1
                self.pos = self.pos.advance(self.num_samples, cfg.global_batch_size)
                if self.pbar is not None:
                    self.pbar.update(1)
                stop = D.all_reduce_flag(preempt.requested is not None)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or stop:
                    self._check_stop_policy()
                    self._log(norm)
                if (self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stop
                        or self.step in self.task.checkpoint_steps):
                    self._checkpoint()
                if stop:
                    self.log.warning("stopped at step %d on a signal; resume with train.resume=auto", self.step)
                    interrupted = True
                    if self.main:
                        record_preemption(PreemptedError(
                            f"{self.task.name} run {self.out} stopped at step {self.step}/{cfg.steps} by a signal "
                            f"after writing checkpoint {self.last_ckpt}; run the same command again to resume"))
                    break
        finally:
            if self.pbar is not None:
                self.pbar.close()
            del it
            self.stats.close()
        self._check_stop_policy()
        model, ema = self.units[0].raw, self.ema
        if self.template is not None:
            model, ema = (P.unsharded_copy(self.template, P.full_model_state(m, all_ranks=True), self.device)
                          for m in (model, ema))
        return TrainResult(step=self.step, model=model, ema=ema, out_dir=self.out, stats_path=self.stats.path,
                           checkpoint_dir=self.last_ckpt, interrupted=interrupted,
                           skipped_steps=int(self.skipped_total.item()))


def train(task: TrainTask, cfg, out_dir: str | Path, seed: int = 0, config_yaml: str | None = None) -> TrainResult:
    """Train ``task`` with the engine settings ``cfg``; single process or under ``torchrun`` (DDP / FSDP2).

    Args:
        task: what to train (model, loss, dataset, extras); see :class:`~pae_fast.engine.task.TrainTask`.
        cfg: a :class:`~pae_fast.config.TrainConfig`.
        out_dir: the run folder: ``log.txt``, ``stats.jsonl``, ``config.yaml``, ``checkpoints/<step:07d>/``.
        seed: base seed (rank ``r`` uses ``seed + r``; the data order depends on ``seed`` only).
        config_yaml: the resolved run config; written to ``<out_dir>/config.yaml`` and into the weights metadata
            (``train.optimizer: auto`` replaced by the optimizer it resolved to).

    Returns:
        A :class:`TrainResult`. On SIGTERM/SIGINT the current step finishes, a checkpoint is written and the result
        has ``interrupted=True``; ``train.resume=auto`` continues from it exactly.

    Raises:
        NonFiniteLossError: ``train.nonfinite=stop`` and a step had a non-finite loss (the message names the step).
        CheckpointError: the checkpoint to resume from is damaged (names the file).
        NonFiniteLossError: ``train.max_skipped_steps`` consecutive steps were skipped (``nonfinite: skip``).
        RunLockedError: another process holds the lock of ``out_dir`` (rank 0 takes it for the whole run).

    A run stopped by a signal also records a :class:`~pae_fast.errors.PreemptedError` for the command line
    (:func:`pae_fast.errors.raise_if_preempted`), which then exits with code 4.
    """
    check_train_config(cfg)
    out = Path(out_dir)
    device = D.default_device(cfg.device)
    owns_group = D.init_from_env(device)
    main = D.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, enabled=main)
    handlers: list = []
    try:
        lock.acquire()  # before the log file: a folder another process writes is left untouched
        log, handlers = setup_logger(out, main)
        micro_batch_size(cfg.global_batch_size, D.get_world_size(), cfg.grad_accum)
        with precision_flags(cfg.tf32), kernel_scope(cfg.kernel_backend), Preemption() as preempt:
            trainer = _Trainer(task, cfg, out, seed, config_yaml, device, log)
            trainer.setup()  # finds and loads the checkpoint to resume: a failure leaves config.yaml as it was
            if main and trainer.config_yaml is not None:  # with train.optimizer as resolved
                atomic_write_text(out / "config.yaml", trainer.config_yaml)
            return trainer.run(preempt)
    finally:
        close_logger(handlers)
        lock.release()
        if owns_group:
            D.cleanup()

"""What the trainer writes between steps: the interval's log line and stats record, checkpoints (with the
checkpoint callback), and the non-finite stop policy checked before both.

:class:`TrainerOutputs` is a mixin of :class:`pae_fast.engine.loop._Trainer`; its methods read the trainer's state
(``cfg``, ``task``, ``units``, ``ema``, ``stats``, the device-side meters and non-finite counters, ``step``, ``pos``,
``out``, ``ckpt_root``, ``template``, ``pbar``) and write no state beyond ``last_ckpt`` and the meters (reset through
the trainer's ``_reset_meters`` after each log line).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pae_fast.engine import checkpoint as ck
from pae_fast.engine import distributed as D
from pae_fast.engine import parallel as P
from pae_fast.engine.monitor import peak_flops, peak_memory_gb
from pae_fast.engine.runtime import NonFiniteLossError, flops_text
from pae_fast.engine.state import fork_rng, gather_rng_states, train_state

__all__ = ["TrainerOutputs"]


class TrainerOutputs:
    """The trainer's logging, checkpoint writing and non-finite stop policy (a mixin: see the module docstring)."""

    # set by the trainer (pae_fast.engine.loop._Trainer); listed here as the contract these methods read
    task: Any
    cfg: Any
    out: Path
    ckpt_root: Path
    device: torch.device
    units: list[Any]
    ema: nn.Module
    template: nn.Module | None
    last_ckpt: Path | None

    def _check_stop_policy(self) -> None:
        if self.cfg.nonfinite == "stop":
            first = int(self.first_bad.item())
            if first >= 0:
                raise NonFiniteLossError(
                    f"non-finite loss or gradient norm at step {first} (train.nonfinite=stop; that step's update was "
                    f"not applied; detected at step {self.step}). Use train.nonfinite=skip to skip such steps"
                )
        worst = int(self.worst_streak.item())
        if self.cfg.nonfinite == "skip" and worst >= self.cfg.max_skipped_steps:
            end = int(self.worst_streak_end.item())
            raise NonFiniteLossError(
                f"{worst} consecutive optimizer steps (steps {end - worst + 1}..{end}) had a non-finite loss or "
                f"gradient norm and were skipped (train.max_skipped_steps={self.cfg.max_skipped_steps}); stopped "
                f"without writing a checkpoint of this stretch (last checkpoint: {self.last_ckpt or 'none'}). Check "
                "the data for NaN/Inf and lower train.lr"
            )

    def _log(self, norm: Any) -> None:
        keys = list(self.sums)
        vec = torch.stack([self.n_bad, self.skipped_total.float()] + [self.sums[k] for k in keys]
                          + [self.counts[k] for k in keys])  # fmt: skip
        if self.world > 1:
            torch.distributed.all_reduce(vec)
            vec[:2] /= self.world
        vals = vec.tolist()  # the one host sync of the interval
        n_bad, skipped_total = vals[0], vals[1]
        sums, counts = vals[2:2 + len(keys)], vals[2 + len(keys):]
        elapsed = max(time.perf_counter() - self.t_last, 1e-9)
        steps = self.step - self.step_last
        ips = steps * self.cfg.global_batch_size / elapsed
        rec: dict[str, Any] = {"step": self.step, "epoch": self.pos.epoch}
        for k, s, c in zip(keys, sums, counts):  # each term's mean over the ok steps (all ranks) that reported it
            rec[k] = s / c if c > 0 else float("nan")
        rec["lr"] = self.lr_used  # the learning rate of the last step
        rec["grad_norm"] = float(norm.item()) if norm is not None else None
        rec["images_per_s"] = ips
        rec["sec_per_step"] = elapsed / max(steps, 1)
        rec["peak_mem_gb"] = peak_memory_gb(self.device)
        fps = self.task.flops_per_sample
        fps = fps(self.step - 1) if callable(fps) else fps  # a per-step count: the interval's last step
        if fps:  # achieved TFLOP/s per device; MFU against the device's peak (null on CPU)
            rec["tflops"] = fps * ips / self.world / 1e12
            peak = peak_flops(self.device)
            rec["mfu"] = rec["tflops"] * 1e12 / peak if peak else None
        rec["skipped"] = int(round(n_bad))
        rec["skipped_total"] = int(round(skipped_total))
        rec.update(self._counters())
        self.stats.write(rec)
        terms = " ".join(f"{k}={v:.4g}" for k, v in rec.items() if k in keys)
        self.log.info(
            "step %d/%d %s lr=%.3g gnorm=%s %.1f img/s mem=%.2fGB%s skipped=%d", self.step, self.cfg.steps, terms,
            rec["lr"], "n/a" if rec["grad_norm"] is None else f"{rec['grad_norm']:.3g}", ips, rec["peak_mem_gb"],
            flops_text(rec), rec["skipped_total"],
        )
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4g}", refresh=False)
        self._reset_meters()

    def _counters(self) -> dict[str, int]:
        """The task's running counters (``TrainTask.counters``), summed over ranks."""
        if self.task.counters is None:
            return {}
        counts = self.task.counters()
        if self.world > 1 and counts:
            t = torch.tensor([float(v) for v in counts.values()], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            counts = dict(zip(counts, t.tolist()))
        return {k: int(v) for k, v in counts.items()}

    def _checkpoint(self) -> Path | None:
        self._check_stop_policy()
        task, step = self.task, self.step
        model_sd = P.full_model_state(self.units[0].raw)
        ema_sd = P.full_model_state(self.ema)
        extra_sd = {u.name: P.full_model_state(u.raw) for u in self.units[1:]}
        opt_sd = {u.name: P.optimizer_state(u.wrapped, u.optimizer) for u in self.units}
        rng = gather_rng_states(self.device)
        skipped = int(self.skipped_total.item())
        path = None
        if self.main:
            state = train_state(self, opt_sd, rng, skipped)
            meta = {**{str(k): str(v) for k, v in task.metadata.items()}, "task": task.name, "step": str(step)}
            if self.config_yaml is not None:
                meta["config"] = self.config_yaml
            writers = {
                "model.safetensors": ck.save_weights(model_sd, {**meta, "weights": "model"}),
                "ema.safetensors": ck.save_weights(ema_sd, {**meta, "weights": "ema"}),
                **{f"{n}.safetensors": ck.save_weights(sd, {**meta, "weights": n}) for n, sd in extra_sd.items()},
                "state.pt": ck.save_torch(state),
            }
            clean = _all_finite(model_sd) and _all_finite(ema_sd)
            if not clean:
                self.log.warning("step %d: the weights hold NaN/Inf; the checkpoint is marked unclean", step)
            path = ck.write_checkpoint(self.ckpt_root, step, writers, self.cfg.keep_last, clean=clean,
                                       info={"skipped_steps": skipped})
            self.log.info("checkpoint %s", path)
            if task.on_checkpoint is not None:
                model, ema = self._plain_modules(model_sd, ema_sd)
                with fork_rng(self.device), torch.no_grad():  # sampling must not shift the training RNG streams
                    task.on_checkpoint(step, model, ema, str(self.out))
                self.units[0].raw.train()  # the callback may have switched it to eval
        D.barrier()
        self.last_ckpt = path if path is not None else self.ckpt_root / f"{step:07d}"
        return path

    def _plain_modules(self, model_sd: dict | None, ema_sd: dict | None) -> tuple[nn.Module, nn.Module]:
        if self.template is None:
            return self.units[0].raw, self.ema
        return (P.unsharded_copy(self.template, model_sd, self.device),
                P.unsharded_copy(self.template, ema_sd, self.device))


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    """Whether every floating tensor of ``state`` is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in state.values() if t.is_floating_point()]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True

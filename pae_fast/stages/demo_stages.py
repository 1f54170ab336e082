"""The demo's stage bookkeeping: config hashes, skipping finished stages, progress with an ETA.

Every stage of ``python -m pae_fast demo`` writes into its own folder under the demo's ``out_dir`` and records
``stage.json`` there: the stage's name, its **config hash** (a SHA-256 of the settings that stage reads, chained
with the hashes of the stages it consumes), its status and what it produced. On a re-run:

- a stage whose ``stage.json`` says ``done`` with the same hash is skipped and its recorded result returned;
- a changed hash (its own settings, or any upstream stage's) reruns it from scratch: its folder is removed first,
  and since hashes chain, every stage after it reruns too;
- a stage recorded as ``running`` with the same hash (an interrupted run) is resumed in place (the training
  engine resumes from its last checkpoint).

A folder without a ``stage.json`` is never removed (it is not ours): that is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pae_fast.errors import ConfigError
from pae_fast.io import atomic_write_text

__all__ = ["STAGE_FILE", "config_hash", "StagePlan", "StageRunner"]

log = logging.getLogger("pae_fast.demo")

STAGE_FILE = "stage.json"


def config_hash(settings: Any, upstream: tuple[str, ...] = ()) -> str:
    """16 hex digits of SHA-256 over ``settings`` (JSON, sorted keys; non-JSON values by ``str``) and the upstream
    stage hashes, in order."""
    blob = json.dumps({"settings": settings, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StagePlan:
    """The stages a run will go through, with a relative cost each (CPU seconds estimated from the settings), so
    progress lines can give an ETA before any stage has been timed."""

    costs: dict[str, float]
    done: dict[str, float] = field(default_factory=dict)  # stage -> measured seconds (0 for skipped stages)

    def eta(self, elapsed: float) -> float | None:
        """Seconds left: the remaining estimated cost scaled by measured/estimated of the stages run so far."""
        ran = [s for s, sec in self.done.items() if sec > 0]
        left = sum(c for s, c in self.costs.items() if s not in self.done)
        if not ran:
            return left if left > 0 else 0.0
        scale = sum(self.done[s] for s in ran) / max(1e-9, sum(self.costs[s] for s in ran))
        return left * scale


class StageRunner:
    """Runs named stages under ``root`` with hash-based skipping (see the module docstring).

    Args:
        root: the demo's output folder.
        plan: the stage costs for progress lines (stages missing from it count as cost 0).
    """

    def __init__(self, root: str | os.PathLike, plan: StagePlan | None = None) -> None:
        self.root = Path(root)
        self.plan = plan or StagePlan({})
        self.t0 = time.perf_counter()
        self.hashes: dict[str, str] = {}
        self.records: dict[str, dict[str, Any]] = {}

    def folder(self, name: str) -> Path:
        return self.root / name

    def _read(self, name: str) -> dict[str, Any] | None:
        path = self.folder(name) / STAGE_FILE
        if not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {"status": "damaged"}
        return rec if isinstance(rec, dict) else {"status": "damaged"}

    def _write(self, name: str, rec: dict[str, Any]) -> None:
        atomic_write_text(self.folder(name) / STAGE_FILE, json.dumps(rec, indent=1, sort_keys=True) + "\n")

    def _prepare(self, name: str, digest: str) -> dict[str, Any] | None:
        """The finished record to reuse, or None after making the folder ready for a (re)run."""
        folder = self.folder(name)
        rec = self._read(name)
        if rec is not None and rec.get("hash") == digest and rec.get("status") == "done":
            return rec
        if rec is None and folder.exists() and any(folder.iterdir()):
            raise ConfigError(f"{folder} exists but holds no {STAGE_FILE}: it was not written by the demo; choose "
                              "another out_dir or remove it")
        if rec is not None and not (rec.get("hash") == digest and rec.get("status") == "running"):
            log.info("stage %s: settings changed (hash %s -> %s); rerunning it", name, rec.get("hash"), digest)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._write(name, {"stage": name, "hash": digest, "status": "running"})
        return None

    def run(self, name: str, settings: Any, fn: Callable[[Path], dict[str, Any]],
            upstream: tuple[str, ...] = ()) -> dict[str, Any]:
        """Run ``fn(folder) -> result`` (JSON-serialisable) unless the stage is already done with these settings.

        Args:
            name: the stage (its folder under ``root``).
            settings: what the stage reads (hashed).
            fn: the work; it writes into ``folder`` and returns what later stages and the summary need.
            upstream: stages whose outputs it consumes (their hashes are chained into this one's).
        Returns:
            the stage's result (recorded or fresh), with ``"skipped"`` and ``"seconds"`` added.
        """
        missing = [u for u in upstream if u not in self.hashes]
        if missing:
            raise RuntimeError(f"stage {name} depends on stages that have not run: {missing}")
        digest = config_hash(settings, tuple(self.hashes[u] for u in upstream))
        self.hashes[name] = digest
        index = list(self.plan.costs).index(name) + 1 if name in self.plan.costs else len(self.plan.done) + 1
        total = max(len(self.plan.costs), index)
        rec = self._prepare(name, digest)
        if rec is not None:
            log.info("[%d/%d] %s: already done with these settings (hash %s); skipped", index, total, name, digest)
            self.plan.done[name] = 0.0
            result = {**rec["result"], "skipped": True, "seconds": rec.get("seconds", 0.0)}
            self.records[name] = result
            return result
        eta = self.plan.eta(time.perf_counter() - self.t0)
        log.info("[%d/%d] %s: running (hash %s); elapsed %.0f s, ETA of the whole demo %s", index, total, name,
                 digest, time.perf_counter() - self.t0, "?" if eta is None else f"{eta:.0f} s")
        t = time.perf_counter()
        result = fn(self.folder(name))
        seconds = time.perf_counter() - t
        self.plan.done[name] = max(seconds, 1e-3)
        self._write(name, {"stage": name, "hash": digest, "status": "done", "seconds": seconds,
                           "result": result})
        log.info("[%d/%d] %s: done in %.0f s", index, total, name, seconds)
        result = {**json.loads(json.dumps(result)), "skipped": False, "seconds": seconds}
        self.records[name] = result
        return result

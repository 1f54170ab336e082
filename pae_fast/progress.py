"""Progress reporting: a tqdm bar on a terminal, one log line every N steps otherwise (no carriage returns in
log files)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["is_terminal", "progress"]

T = TypeVar("T")
log = logging.getLogger("pae_fast.progress")


def is_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default ``sys.stdout``) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def progress(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    every: int | None = None,
    enabled: bool = True,
    unit: str = "it",
) -> Iterator[T]:
    """Iterate ``items``, reporting progress.

    On a terminal a tqdm bar is drawn; otherwise an INFO line ``"<desc>: i/total <unit>"`` is logged every
    ``every`` items (default: about 10 lines per run) and at the end.

    Args:
        items: what to iterate.
        desc: the label of the bar / log lines.
        total: number of items (default ``len(items)`` when it has one).
        every: log interval off a terminal.
        enabled: False iterates silently.
        unit: the item unit shown.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not enabled:
        yield from items
        return
    if is_terminal():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True)
        return
    every = every or max(1, (total or 100) // 10)
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        if i % every == 0 and i != total:
            log.info("%s: %d/%s %s", desc, i, total if total is not None else "?", unit)
    log.info("%s: %d/%s %s done", desc, i, total if total is not None else "?", unit)

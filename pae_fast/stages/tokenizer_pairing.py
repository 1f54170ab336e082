"""Which tokenizer a generator's latents came from, recorded in its checkpoints and checked where it is decoded.

A generator learns the latent space of one tokenizer (its weights, EMA or raw) standardised by one set of latent
statistics; decoding its samples with another tokenizer gives wrong images without any error. ``train-dit`` writes
:func:`tokenizer_record` into every weights file's metadata (key :data:`RECORD_KEY`): the tokenizer's name, the
hash that identifies its weights (the latent cache's ``weights_hash``: the SHA-256 of the weights file, combined
with the encoder file's when one was given; ``random-init:...`` for a random tokenizer), which weights made the
latents (the cache's ``tokenizer_weights``: ``"ema"`` / ``"raw"``, ``"unknown"`` when the cache predates the key)
and the SHA-256 of the latent statistics. ``sample`` calls :func:`check_decoder` before it samples: a decoder
whose name or weights differ is refused (exit code 3) unless ``--allow-tokenizer-mismatch``
(docs/method.md § Reliability).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from pae_fast.errors import DataError

__all__ = ["RECORD_KEY", "TokenizerMismatchError", "stats_sha256", "tokenizer_record", "read_record",
           "check_decoder"]

log = logging.getLogger("pae_fast.sample")

RECORD_KEY = "tokenizer_record"


class TokenizerMismatchError(DataError):
    """The decoder given to ``sample`` is not the tokenizer whose latents the generator learned."""


def stats_sha256(stats: Any) -> str:
    """SHA-256 of latent statistics (:class:`~pae_fast.data.latent_stats.LatentStats`: mode, mean, std)."""
    return hashlib.sha256(json.dumps(stats.to_metadata(), sort_keys=True).encode()).hexdigest()


def tokenizer_record(metadata: dict[str, Any] | None, stats: Any) -> dict[str, str] | None:
    """The record of the tokenizer behind latent data, from the data's metadata (a latent cache's index
    ``metadata``, or online encoding's), or None when the data names no tokenizer (synthetic latents)."""
    md = metadata or {}
    name = md.get("tokenizer")
    if not name:
        return None
    return {
        "name": str(name),
        "weights_hash": str(md.get("weights_hash") or md.get("tokenizer_weights_hash") or "unknown"),
        "weights": str(md.get("tokenizer_weights") or "unknown"),
        "latent_stats_sha256": stats_sha256(stats),
    }


def read_record(meta: dict[str, str]) -> dict[str, str] | None:
    """The record in a generator weights file's metadata (None: written before records, or synthetic data)."""
    raw = meta.get(RECORD_KEY)
    if not raw:
        return None
    try:
        rec = json.loads(raw)
    except ValueError as e:
        raise DataError(f"generator metadata {RECORD_KEY!r} is not valid JSON ({e})") from e
    return rec if isinstance(rec, dict) else None


def check_decoder(meta: dict[str, str], generator_file: str | os.PathLike, name: str, weights: str | os.PathLike,
                  *, prefer_ema: bool = True, vfm_weights: str | os.PathLike | None = None,
                  allow_mismatch: bool = False, key: str = "sample.tokenizer_checkpoint") -> Path:
    """The decoder weights file to load, checked against the tokenizer recorded in a generator's metadata.

    Args:
        meta: the generator weights file's metadata.
        generator_file: that file (named in the message).
        name: the decoder's registered name (``tokenizer.name``).
        weights: the decoder's weights: a file, or a checkpoint / run folder; in a folder the weights the generator
            learned (EMA or raw, whichever file's hash matches the record) are chosen, else the ``prefer_ema`` one.
        prefer_ema: the folder's file to take when nothing is recorded (``sample.use_ema``).
        vfm_weights: the encoder file the cache's hash may combine with the weights file's.
        allow_mismatch: log a mismatch as a warning instead of refusing it.

    Returns:
        The weights file to load.
    Raises:
        TokenizerMismatchError: the names or weights differ (one line naming both sides).
    """
    from pae_fast.engine.checkpoint import file_sha256
    from pae_fast.weights import resolve_weights_file

    preferred = resolve_weights_file(weights, prefer_ema=prefer_ema, key=key)
    rec = read_record(meta)
    if rec is None:
        log.warning("%s records no tokenizer (trained on synthetic latents, or before pae_fast recorded it): the "
                    "decoder %s cannot be checked against it", generator_file, name)
        return preferred
    known = rec.get("weights_hash") not in (None, "", "unknown")
    if not known and rec.get("name") == name:  # a cache that named its tokenizer but not its weights
        log.warning("%s records tokenizer %s but not its weights: only the name of the decoder is checked",
                    generator_file, name)
        return preferred
    other = resolve_weights_file(weights, prefer_ema=not prefer_ema, key=key)
    vfm_digest = file_sha256(vfm_weights) if vfm_weights is not None else None
    digests: dict[Path, str] = {}
    weights_match = not known  # unknown weights: only the name can differ
    for file in dict.fromkeys((preferred, other)):  # the preferred file first; the other one in a folder
        digest = digests[file] = file_sha256(file)
        accepted = {digest}
        if vfm_digest is not None:  # cache-latents combines the encoder file's hash with the weights file's
            accepted.add(hashlib.sha256(f"{digest}+{vfm_digest}".encode()).hexdigest())
        if rec.get("weights_hash") in accepted:
            if rec.get("name") == name:
                return file
            weights_match = True
    problems = []
    if rec.get("name") != name:
        problems.append(f"tokenizer {name!r}, the generator learned {rec.get('name')!r}")
    if not weights_match:
        shown = ", ".join(f"{f} (sha256 {h[:12]})" for f, h in digests.items())
        problems.append(f"weights {shown}, the generator learned latents of weights "
                        f"{str(rec.get('weights_hash'))[:24]} ({rec.get('weights', 'unknown')})")
    what = (f"{key}: the decoder is not the tokenizer whose latents {Path(generator_file)} was trained on: "
            f"{'; '.join(problems)}")
    if allow_mismatch:
        log.warning("%s (allowed by --allow-tokenizer-mismatch)", what)
        return preferred
    raise TokenizerMismatchError(f"{what}; decode with that tokenizer, or pass --allow-tokenizer-mismatch for an "
                                 "experiment")

"""A frozen tokenizer for encoding images into latents (``cache-latents``, ``train-dit`` with ``data.latents:
online``), and the hash that identifies its weights.

Random weights are never used silently: without a weights file the caller must say ``random_init=True`` (the
``--random-init`` flag of ``cache-latents``, ``tokenizer.random_init`` in a config), which is meant for pipeline
checks only. A random tokenizer is built under ``torch.manual_seed(seed)`` so that a re-run (a resumed cache, a
resumed training run) builds the same one, and its weights hash is computed from its tensors.

Which weights encode: the trained (non-EMA) weights by default, as the PAE authors' ``extract_latents.py`` does
("don't use ema ckpt"); the EMA weights on request (``tokenizer.encode_weights``, docs/method.md § Building a cache).
The choice is recorded as ``tokenizer_weights`` (``"raw"`` / ``"ema"``) in the cache and checkpoint metadata.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from torch import nn

from pae_fast.errors import ConfigError

__all__ = ["state_sha256", "load_frozen_tokenizer", "ENCODE_WEIGHTS"]

# tokenizer.encode_weights -> the engine's name of those weights (checkpoint file stem, torch-file key, the
# "weights" metadata of a saved file)
ENCODE_WEIGHTS: dict[str, str] = {"raw": "model", "ema": "ema"}

log = logging.getLogger("pae_fast.tokenizer")


def state_sha256(module: nn.Module) -> str:
    """Hex SHA-256 over a module's state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_frozen_tokenizer(name: str, weights: str | os.PathLike | None, *, vfm_weights: str | os.PathLike | None = None,
                          random_init: bool = False, seed: int = 0, key: str = "--weights",
                          name_key: str = "--tokenizer", which: str = "raw",
                          which_key: str = "tokenizer.encode_weights") -> tuple[nn.Module, str]:
    """Build a registered tokenizer, load its weights, freeze it (eval, no grad) on the CPU.

    Args:
        name: a registered tokenizer (``pae_fast.registry.TOKENIZERS``).
        weights: its weights (a pae_fast tokenizer file, checkpoint or run folder, or the PAE authors' checkpoint;
            ``pae_fast.weights`` rules), or None together with ``random_init``.
        vfm_weights: the encoder's own weights file, when ``weights`` holds none.
        random_init: allow random weights when ``weights`` is None (pipeline checks only).
        seed: seeds the random initialisation.
        key, name_key: the argument / config keys named in errors.
        which: ``"raw"`` (the trained, non-EMA weights: ``model.safetensors`` of a checkpoint folder, the ``"model"``
            state dict of a torch file) or ``"ema"`` (``ema.safetensors``, ``"ema"``); a file that says it holds the
            other (its ``weights`` metadata, or a torch file without that key) is refused.
        which_key: the config key of ``which``, named in errors.

    Returns:
        ``(tokenizer, weights_hash)``: the hash is the SHA-256 of the weights file (combined with the encoder file's
        when ``vfm_weights`` is given), or ``"random-init:<sha256 of the tensors>"``.

    Raises:
        ConfigError: unknown name; neither weights nor ``random_init``; ``which`` unknown or not what the file holds.
        WeightsError: a missing, damaged or non-fitting weights file (the message names it; exit code 3).
    """
    from pae_fast.engine.checkpoint import file_sha256
    from pae_fast.registry import TOKENIZERS, create_tokenizer
    from pae_fast.weights import read_metadata, resolve_weights_file

    if name not in TOKENIZERS:
        try:
            TOKENIZERS.get(name)
        except KeyError as e:
            raise ConfigError(f"{name_key}={name!r}: {e.args[0]}") from None
    if which not in ENCODE_WEIGHTS:
        raise ConfigError(f"{which_key}={which!r}: expected one of {', '.join(ENCODE_WEIGHTS)}")
    if weights is None and not random_init:
        raise ConfigError(f"{key} is not set: the tokenizer {name} needs its trained weights; random weights only "
                          "with --random-init (cache-latents) / tokenizer.random_init=true (pipeline checks only)")
    if weights is None:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            tok = create_tokenizer(name, pretrained=False, vfm_weights=vfm_weights)
        finally:
            torch.random.set_rng_state(state)  # the caller's RNG stream is left as it was
        digest = "random-init:" + state_sha256(tok)
        log.warning("tokenizer %s has RANDOM weights (explicitly allowed; seed %d): its latents are meaningless "
                    "beyond pipeline checks", name, seed)
    else:
        wanted = ENCODE_WEIGHTS[which]
        file = resolve_weights_file(weights, prefer_ema=which == "ema", key=key)
        held = read_metadata(file, key=key)[1].get("weights")  # engine-written files say which (torch files: none)
        if held in ENCODE_WEIGHTS.values() and held != wanted:
            other = next(k for k, v in ENCODE_WEIGHTS.items() if v == held)
            raise ConfigError(f"{key}={str(weights)!r}: {file} holds the {held} weights ({other}) but "
                              f"{which_key}={which}; pass the checkpoint folder holding {wanted}.safetensors, or set "
                              f"{which_key}={other}")
        # a torch file holding several state dicts ({"model": ..., "ema": ...}) gives only the wanted one (a file
        # without it is refused, naming its keys); a safetensors file is one state dict, checked above
        pick = {"prefer": (wanted,)} if file.suffix != ".safetensors" else {}
        tok = create_tokenizer(name, pretrained=True, weights=file, vfm_weights=vfm_weights, **pick)
        digest = file_sha256(file)
        if vfm_weights is not None:
            vfm_file = resolve_weights_file(vfm_weights, key="tokenizer.vfm_weights")  # a path or hf://...
            digest = hashlib.sha256(f"{digest}+{file_sha256(vfm_file)}".encode()).hexdigest()
    return tok.eval().requires_grad_(False), digest

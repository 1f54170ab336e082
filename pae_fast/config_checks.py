"""Range checks of every numeric config value and device string, run when a config is loaded.

:data:`RULES` is one table of ``(key, predicate, allowed range)``; :func:`check_ranges` applies it (and a finiteness
check to every float) so that a bad value fails as a :class:`~pae_fast.errors.ConfigError` naming the key and the
allowed range before a command opens data, builds a model or writes a file. ``None`` (an optional value left
unset) is always allowed. A test checks that every int / float field of :class:`~pae_fast.config.Config` has a rule.

Devices: the syntax of ``train.device`` / ``sample.device`` / ``eval.device`` is checked at load; whether the
device is present is checked per command (:func:`check_command_devices`), since a config may name CUDA for
training and still be printed or sampled on a CPU machine.

Guidance scales: ``sample.cfg_scale`` and ``sample.autoguidance_scale`` are ``w`` in ``v_u + w (v_c - v_u)``:
``w = 1`` is no guidance, ``0 <= w < 1`` moves toward the unconditional (guide) model, ``w > 1`` guides;
``w < 0`` is refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

from pae_fast.errors import ConfigError

__all__ = ["Rule", "RULES", "DEVICE_KEYS", "COMMAND_DEVICE_KEYS", "check_ranges", "check_device",
           "check_device_available", "check_command_devices", "numeric_keys"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """``key`` (dotted) must satisfy ``ok(value)``; ``allowed`` is the range as written in the error message."""

    key: str
    ok: Callable[[Any], bool]
    allowed: str


def _ge(lo: float) -> Callable[[Any], bool]:
    return lambda v: v >= lo


def _gt(lo: float) -> Callable[[Any], bool]:
    return lambda v: v > lo


def _closed(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: lo <= v <= hi


def _half_open(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: lo <= v < hi


def _rules(keys: str, ok: Callable[[Any], bool], allowed: str) -> list[Rule]:
    return [Rule(k, ok, allowed) for k in keys.split()]


_POS = ">= 1"
_NONNEG = ">= 0"
_PROB = "in [0, 1]"

RULES: tuple[Rule, ...] = tuple(
    _rules("seed", _ge(0), _NONNEG)
    # data
    + _rules("data.image_size data.num_classes data.batch_size data.synthetic_size data.latent_channels "
             "data.latent_size data.dali_threads data.prefetch data.stats_items", _ge(1), _POS)
    + _rules("data.num_workers", _ge(0), _NONNEG)
    # tokenizer
    + _rules("tokenizer.lambda_l1 tokenizer.lambda_lpips tokenizer.lambda_gan tokenizer.lambda_ssr "
             "tokenizer.lambda_mcr tokenizer.lambda_scr tokenizer.noise_aug_tau tokenizer.gan_start_step "
             "tokenizer.disc_start_step",
             _ge(0), _NONNEG)
    + _rules("tokenizer.mcr_angles", lambda v: 0 < v <= 180, "each in (0, 180] degrees")
    + _rules("tokenizer.adaptive_weight_max", _gt(0), "> 0")
    + _rules("tokenizer.disc_input_size", _ge(1), _POS)
    + _rules("tokenizer.disc_blocks", _ge(0), "each >= 0 (a block index of the discriminator's backbone)")
    + _rules("tokenizer.heldout_items tokenizer.grid_items", _ge(0), _NONNEG)
    + _rules("tokenizer.lambda_kl tokenizer.lambda_diffusion", _ge(0), _NONNEG)
    + _rules("tokenizer.diffusion_hidden", _ge(1), _POS)
    # refine
    + _rules("refine.reconstructor_depth refine.reconstructor_hidden refine.projector_heads "
             "refine.reconstructor_heads", _ge(1), _POS)
    + _rules("refine.lambda_rep refine.lambda_gram", _ge(0), _NONNEG)
    + _rules("refine.lowpass_strength", _closed(0, 1), _PROB)
    # generator
    + _rules("model.in_channels model.input_size model.num_classes model.depth model.hidden_size model.num_heads "
             "model.patch_size model.head_depth model.head_hidden_size model.head_num_heads", _ge(1), _POS)
    + _rules("model.class_dropout", _half_open(0, 1), "in [0, 1)")
    # flow
    + _rules("flow.logit_std flow.shift", _gt(0), "> 0")
    + _rules("flow.logit_mean", lambda v: True, "a finite number")
    + _rules("flow.rae_alpha", _gt(0), "> 0")
    # train
    + _rules("train.steps train.global_batch_size train.grad_accum train.log_every train.ckpt_every "
             "train.max_skipped_steps", _ge(1), _POS)
    + _rules("train.lr", _gt(0), "> 0")
    + _rules("train.min_lr train.weight_decay train.warmup_steps train.decay_start train.grad_clip", _ge(0),
             _NONNEG + " (grad_clip: 0 = off)")
    + _rules("train.keep_last", _ge(0), ">= 0 (0 keeps every checkpoint)")
    + _rules("train.betas", _half_open(0, 1), "each in [0, 1)")
    + _rules("train.ema_decay", _half_open(0, 1), "in [0, 1)")
    # sample
    + _rules("sample.num_samples sample.batch_size sample.steps sample.per_class sample.grid_max", _ge(1), _POS)
    + _rules("sample.shift", _gt(0), "> 0")
    + _rules("sample.cfg_scale sample.autoguidance_scale", _ge(0),
             ">= 0 (w in v_u + w (v_c - v_u): 1 = no guidance, > 1 guides)")
    + _rules("sample.cfg_interval_start sample.t_start sample.t_end", _closed(0, 1), "in [0, 1] (t = 1 is data)")
    + _rules("sample.seed", _ge(0), _NONNEG)
    + _rules("sample.sde_noise_scale", _ge(0), _NONNEG)
    # eval
    + _rules("eval.batch_size eval.knn_k eval.lnc_k eval.viv_iters eval.max_per_class eval.inception_size "
             "eval.is_splits", _ge(1), _POS)
    + _rules("eval.sec_rho", _closed(0, 1), _PROB)
    # demo
    + _rules("demo.train_per_class demo.heldout_per_class", _ge(2), ">= 2")
    + _rules("demo.mae_steps demo.mae_batch_size demo.refine_steps demo.refine_batch_size demo.tokenizer_steps "
             "demo.tokenizer_batch_size demo.val_draws demo.convergence_seeds demo.convergence_points "
             "demo.convergence_per_class demo.convergence_sample_steps", _ge(1), _POS)
    + _rules("demo.tokenizer_lr", _gt(0), "> 0")
    + _rules("eval.ssc_sigma", _gt(0), "> 0")
)

DEVICE_KEYS: tuple[str, ...] = ("train.device", "sample.device", "eval.device")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# The device key each command runs on; checked for presence before the command does anything.
COMMAND_DEVICE_KEYS: dict[str, str] = {
    "train-dit": "train.device",
    "demo": "train.device",
    "train-tokenizer": "train.device",
    "refine-priors": "train.device",
    "cache-latents": "train.device",
    "sample": "sample.device",
    "evaluate": "eval.device",
    "diffusability": "eval.device",
}


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def numeric_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every field of ``cfg`` whose annotation holds ``int`` or ``float`` (tuples included)."""
    import typing

    out = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += numeric_keys(value, key + ".")
            continue
        text = str(hints[f.name])
        if re.search(r"\b(int|float)\b", text):
            out.append(key)
    return out


def _values(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (tuple, list)) else [v]


def check_ranges(cfg: Any) -> None:
    """Raise :class:`ConfigError` for the first value outside its allowed range (naming the key, the value and the
    range), for a non-finite float anywhere, or for a malformed device string."""
    for key in numeric_keys(cfg):
        for v in _values(_get(cfg, key)):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}={v!r}: expected a finite number")
    for rule in RULES:
        value = _get(cfg, rule.key)
        if value is None:
            continue
        for v in _values(value):
            if not rule.ok(v):
                raise ConfigError(f"{rule.key}={value!r} is out of range: expected {rule.allowed}")
    for key in DEVICE_KEYS:
        check_device(_get(cfg, key), key)


def check_device(value: str, key: str) -> None:
    """Syntax of a device string: ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``."""
    if not _DEVICE_RE.match(str(value)):
        raise ConfigError(f"{key}={value!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:<index>'")


def check_device_available(value: str, key: str) -> None:
    """Refuse a CUDA device that this machine does not have (``auto`` and ``cpu`` always pass)."""
    check_device(value, key)
    if not str(value).startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={value!r} but this machine has no CUDA device; use {key}=cpu or auto")
    if ":" in value and int(value.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(f"{key}={value!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_command_devices(cfg: Any, command: str) -> None:
    """The device ``command`` runs on must be present (see :data:`COMMAND_DEVICE_KEYS`); other commands pass."""
    key = COMMAND_DEVICE_KEYS.get(command)
    if key is not None:
        check_device_available(_get(cfg, key), key)

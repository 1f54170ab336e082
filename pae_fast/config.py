"""Typed run configuration: one dataclass per stage, YAML presets, dotted overrides, resolved config per run.

A run is described by :class:`Config`, whose sections are the stages of the pipeline (``data``, ``tokenizer``,
``refine``, ``model`` (the generator), ``flow``, ``train``, ``sample``, ``eval``). Presets in ``configs/*.yaml``
set any subset of the fields; the command line overrides single fields with dotted keys::

    python -m pae_fast train-dit --config configs/tiny_cpu.yaml --train.steps 20 --model.depth 2

Unknown keys and values of the wrong type are errors that name the key (and the file) and list what is valid.
Every run writes its resolved config to ``<out_dir>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pae_fast.io import atomic_write_text

__all__ = [
    "ConfigError",
    "DataConfig",
    "TokenizerConfig",
    "RefineConfig",
    "GeneratorConfig",
    "FlowConfig",
    "TrainConfig",
    "SampleConfig",
    "EvalConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "parse_override_args",
    "config_to_dict",
    "config_from_dict",
    "dump_yaml",
    "save_resolved",
]


class ConfigError(ValueError):
    """A config file, key or value is not valid; the message names it and lists what is expected."""


# ----------------------------------------------------------------------------------------------------------------
# Stage configs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where images or latents come from and how they are batched."""

    source: str = "synthetic"  # synthetic | folder | imagenet | skimage | latent_cache
    root: str | None = None  # image folder (class sub-folders) or latent-cache directory
    image_size: int = 256
    num_classes: int = 1000
    batch_size: int = 32  # per process
    num_workers: int = 4
    loader: Literal["auto", "dali", "pil"] = "auto"  # auto: DALI when installed, PIL otherwise
    hflip: bool = True
    drop_last: bool = True  # static shapes for CUDA graphs
    synthetic_size: int = 512  # number of items of the synthetic sources
    latent_channels: int = 32  # synthetic latent sources
    latent_size: int = 16


@dataclass
class TokenizerConfig:
    """PAE / RAE tokenizer (SPEC §1-2). Loss weights follow the secondary transcription of the paper."""

    name: str = "PAE-DINOv2-L-d32"
    vfm_weights: str | None = None  # local safetensors/.pth of the frozen encoder (hub names need a network)
    checkpoint: str | None = None  # trained tokenizer weights (safetensors)
    latent_channels: int = 32
    decoder: str = "ViT-L"
    lambda_l1: float = 1.0
    lambda_lpips: float = 1.0
    lambda_gan: float = 0.5
    lambda_ssr: float = 0.2
    lambda_mcr: float = 0.5
    lambda_scr: float = 1.0
    mcr_angles: tuple[float, ...] = (42.5, 85.0)
    mcr_mode: Literal["noise", "geodesic"] = "noise"
    noise_aug_tau: float = 0.0  # RAE noise-augmented decoding (0 = off; RAE uses 0.8)
    noise_aug_dist: Literal["uniform", "half_normal"] = "uniform"  # code: U(0, tau); paper: |N(0, tau^2)|
    gan_start_step: int = 0
    disc_start_step: int = 0
    adaptive_weight_max: float = 1e4
    lpips_weights: str | None = None  # local LPIPS weights; random features when absent (tests)


@dataclass
class RefineConfig:
    """Stage 0: refined priors (a projector D->latent_dim and a ViT reconstructor), SPEC §1.1."""

    latent_dim: int = 32
    reconstructor_depth: int = 4
    reconstructor_hidden: int = 1024
    lambda_rep: float = 1.0
    lambda_gram: float = 1.0
    lowpass_strength: float = 0.4
    upsampler: Literal["bilinear", "anyup"] = "bilinear"


@dataclass
class GeneratorConfig:
    """Generator (LightningDiT / DiT^DH). ``None`` fields keep the registered variant's default."""

    name: str = "LightningDiT-XL/1"
    in_channels: int = 32
    input_size: int = 16
    num_classes: int = 1000
    class_dropout: float = 0.1
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    use_qknorm: bool | None = None
    use_rope: bool | None = None
    use_swiglu: bool | None = None
    wo_shift: bool | None = None
    grad_checkpointing: bool = False
    checkpoint: str | None = None  # generator weights to load (safetensors)
    head_depth: int | None = None  # DiT^DH head (2 blocks); None: the variant's default
    head_hidden_size: int | None = None  # DiT^DH head width (2048)
    head_num_heads: int | None = None  # DiT^DH head attention heads (16)


@dataclass
class FlowConfig:
    """Flow matching (SPEC §4). Time convention: t = 1 is data, t = 0 is noise."""

    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 0.7  # our convention: t <- s t / (1 + (s-1) t); s < 1 moves toward noise
    rae_alpha: float | None = None  # RAE's shift (t=1 noise convention); converted to shift = 1/alpha at load
    lightningdit_tau: float | None = None  # LightningDiT's time_shifting_factor t/(t + tau(1-t)); shift = 1/tau at load
    dimension_shift: bool = False  # RAE: alpha = sqrt(m / 4096), m = tokens x channels
    cosine_loss: bool = True  # PAE: MSE + (1 - cos); RAE: MSE only


@dataclass
class TrainConfig:
    """The shared training engine (all stages)."""

    steps: int = 100_000
    global_batch_size: int = 1024
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    schedule: Literal["constant", "warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    decay_start: int = 0  # linear schedule: constant lr until this step, then linear to min_lr
    grad_clip: float = 0.0  # 0 = off
    ema_decay: float = 0.9999
    # bf16: bf16 compute weights + fp32 masters; bf16-autocast: fp32 weights under autocast (pae_fast/engine/precision)
    precision: Literal["fp32", "bf16", "bf16-autocast", "fp16"] = "bf16"
    tf32: bool = True
    compile: Literal["off", "default", "max-autotune", "reduce-overhead"] = "off"
    compile_scope: Literal["step", "block"] = "step"
    optimizer: Literal["adamw", "apex_fused_adam", "fused_adamw_ema"] = "adamw"
    distributed: Literal["ddp", "fsdp"] = "ddp"
    log_every: int = 100
    ckpt_every: int = 5000
    keep_last: int = 3
    resume: str = "auto"  # auto | none | path to a checkpoint folder
    nonfinite: Literal["skip", "stop"] = "skip"
    tensorboard: bool = False
    kernel_backend: Literal["auto", "triton", "torch"] = "auto"
    device: str = "auto"  # auto | cpu | cuda
    find_unused_parameters: bool = False  # DDP: parameters without a gradient in some steps
    progress: bool = True  # tqdm progress bar with ETA on rank 0


@dataclass
class SampleConfig:
    """Sampling (SPEC §4): PAE default Euler ODE, 250 steps, shift 0.4, CFG 2.5 from t = 0.25."""

    checkpoint: str | None = None
    tokenizer_checkpoint: str | None = None
    num_samples: int = 64
    batch_size: int = 32
    sampler: Literal["euler", "heun", "euler_maruyama"] = "euler"
    steps: int = 250
    shift: float = 0.4
    lightningdit_tau: float | None = None  # LightningDiT's time_shifting_factor; converted to shift = 1/tau at load
    guidance: Literal["none", "cfg", "autoguidance"] = "cfg"
    cfg_scale: float = 2.5
    cfg_interval_start: float = 0.25  # guidance only while t >= start (t = 1 is data)
    guide_checkpoint: str | None = None
    guide_name: str | None = None
    autoguidance_scale: float = 1.42
    per_class: int | None = None  # class-balanced labels (50 per class for FID)
    use_ema: bool = True
    seed: int = 0
    save_png: bool = True
    save_npz: bool = True
    output_dir: str | None = None  # where samples go; default <out_dir>/samples
    sde_noise_scale: float = 1.0  # eta of the Euler-Maruyama SDE, g(t)^2 = 2 eta (1 - t) (SiT's diffusion_norm)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast of the generator on CUDA
    device: str = "auto"  # auto | cpu | cuda
    grid_max: int = 64  # samples shown in the PNG grid


@dataclass
class EvalConfig:
    """Evaluation: generation metrics, tokenizer metrics, diffusability."""

    reference: str | None = None  # ADM reference npz or image folder
    inception_weights: str | None = None  # local FID Inception weights
    batch_size: int = 64
    knn_k: int = 3  # precision/recall manifolds
    lnc_k: int = 10
    sec_rho: float = 0.5
    viv_iters: int = 5
    max_per_class: int | None = None
    inception_size: int = 299  # FID protocol (TF-style resize as ADM); smaller only for quick checks
    is_splits: int = 10
    dino_model: str = "vit_large_patch14_dinov2.lvd142m"  # FD_DINOv2 feature space (timm name)
    dino_weights: str | None = None  # local DINOv2 weights; FD_DINOv2 is skipped when absent
    lpips_net: Literal["vgg", "alex"] = "vgg"
    lpips_weights: str | None = None  # LPIPS linear heads (official v0.1 .pth) or a whole pae_fast LPIPS state dict
    lpips_backbone_weights: str | None = None  # torchvision vgg16 / alexnet state dict for the LPIPS backbone
    ssc_sigma: float = 0.1  # token affinity exp(cos / sigma) for SSC
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class Config:
    """A whole run; each command reads the sections it needs."""

    out_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    model: GeneratorConfig = field(default_factory=GeneratorConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------------------------
# Type checking and coercion
# ----------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"list of {inner}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{key}: expected a list of {len(args)} items, got {len(value)}: {value!r}")
        elem_types = [args[0]] * len(value) if (not args or args[-1] is Ellipsis or origin is list) else list(args)
        out = [_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, elem_types))] if args else list(value)
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r} ({type(value).__name__})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected int, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key)
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}.{hint} Valid keys here: {', '.join(sorted(valid))}")


def _from_dict(cls: type, data: dict, prefix: str = "", where: str = "") -> Any:
    fields = _fields(cls)
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise _unknown_key(full, list(fields), where)
        kwargs[k] = _coerce(v, fields[k], full) if not dataclasses.is_dataclass(fields[k]) else _from_dict(
            fields[k], v if isinstance(v, dict) else _not_mapping(full, v), full, where
        )
    return cls(**kwargs)


def _not_mapping(key: str, v: Any) -> dict:
    raise ConfigError(f"{key}: expected a mapping (a config section), got {v!r}")


def config_from_dict(data: dict, cls: type = Config, where: str = "") -> Any:
    """Build a typed config from a plain dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config{where} must be a mapping at the top level, got {type(data).__name__}")
    cfg = _from_dict(cls, data, "", where)
    return _finalize(cfg)


def config_to_dict(cfg: Any) -> dict:
    """Plain dict (tuples as lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _finalize(cfg: Any) -> Any:
    """Conversions done once at load (never inside model code)."""
    if isinstance(cfg, Config):
        flow = cfg.flow
        if flow.rae_alpha is not None:
            if flow.rae_alpha <= 0:
                raise ConfigError(f"flow.rae_alpha must be > 0, got {flow.rae_alpha}")
            # RAE's shift alpha (t = 1 noise) equals our shift s = 1 / alpha (t = 1 data), SPEC §0.
            flow.shift = 1.0 / flow.rae_alpha
            flow.rae_alpha = None
        for section, name in ((flow, "flow"), (cfg.sample, "sample")):
            tau = section.lightningdit_tau
            if tau is not None:
                if tau <= 0:
                    raise ConfigError(f"{name}.lightningdit_tau must be > 0, got {tau}")
                # LightningDiT's grid t / (t + tau (1 - t)) is our shift s t / (1 + (s - 1) t) with s = 1 / tau.
                section.shift = 1.0 / tau
                section.lightningdit_tau = None
        if flow.shift <= 0:
            raise ConfigError(f"flow.shift must be > 0, got {flow.shift}")
        if cfg.sample.shift <= 0:
            raise ConfigError(f"sample.shift must be > 0, got {cfg.sample.shift}")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Files and overrides
# ----------------------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML preset (or the defaults when ``path`` is None) and apply dotted overrides."""
    data: dict = {}
    where = ""
    if path is not None:
        p = Path(path)
        where = f" in {p}"
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    cfg = config_from_dict(data, Config, where)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``cfg`` with dotted keys set (``{"train.steps": 20}``), each checked and coerced."""
    data = config_to_dict(cfg)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        cls: Any = type(cfg)
        for i, part in enumerate(parts):
            fields = _fields(cls)
            if part not in fields:
                raise _unknown_key(".".join(parts[: i + 1]), list(fields), " (command-line override)")
            tp = fields[part]
            if i < len(parts) - 1:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section; cannot set {key!r}")
                node = node[part]
                cls = tp
            else:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{key} is a section; set one of its keys: {', '.join(_fields(tp))}")
                node[part] = config_to_dict(_coerce(value, tp, key))
    return config_from_dict(data, type(cfg))


def parse_override_args(argv: list[str]) -> dict[str, Any]:
    """Parse ``--a.b value`` / ``--a.b=value`` pairs; values are YAML scalars or lists (``[1, 2]``)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}; overrides look like --section.key value")
        body = tok[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {tok} has no value")
            key, raw = body, argv[i + 1]
            i += 2
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key] = raw
    return out


def save_resolved(cfg: Any, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config to ``out_dir/name`` atomically (temp file, fsync, rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    atomic_write_text(target, dump_yaml(cfg))
    return target

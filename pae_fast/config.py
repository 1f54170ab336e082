"""Typed run configuration: one dataclass per stage, YAML presets, dotted overrides, resolved config per run.

A run is described by :class:`Config`, whose sections are the stages of the pipeline (``data``, ``tokenizer``,
``refine``, ``model`` (the generator), ``flow``, ``train``, ``sample``, ``eval``). Presets in ``configs/*.yaml``
set any subset of the fields; the command line overrides single fields with dotted keys::

    python -m pae_fast train-dit --config configs/tiny_cpu.yaml --train.steps 20 --model.depth 2

A preset may start from another with ``base: NAME_OR_PATH`` and state only what differs (chains allowed). Unknown
keys and values of the wrong type are errors that name the key (and the file) and list what is valid; every
numeric value is range-checked at load (``pae_fast/config_checks.py``), before a command writes anything.
Every run writes its resolved config to ``<out_dir>/config.yaml``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pae_fast.config_io import (
    BASE_KEY,
    ConfigError,
    apply_overrides,
    config_to_dict,
    dump_yaml,
    list_presets,
    parse_override_args,
    preset_path,
    read_preset,
    save_resolved,
)
from pae_fast.config_io import config_from_dict as _config_from_dict

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
    "DemoConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "parse_override_args",
    "config_to_dict",
    "config_from_dict",
    "dump_yaml",
    "save_resolved",
    "read_preset",
    "preset_path",
    "list_presets",
    "BASE_KEY",
]


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
    batch_size: int | None = None  # per process; the layout a preset was written for (None: from train)
    num_workers: int = 4
    loader: Literal["auto", "dali", "pil"] = "auto"  # auto: DALI when installed, PIL otherwise
    file_list: str | None = None  # "path label" lines instead of an ImageFolder tree (paths relative to root)
    on_bad_file: Literal["error", "skip"] = "error"  # skip: drop undecodable images, count them (data/bad_files)
    dali_threads: int = 4  # DALI CPU threads per process
    prefetch: int = 2  # batches prepared ahead (DALI queue depth; PIL prefetch per worker)
    hflip: bool = True
    drop_last: bool = True  # static shapes for CUDA graphs
    synthetic_size: int = 512  # number of items of the synthetic sources
    latent_channels: int = 32  # synthetic latent sources
    latent_size: int = 16
    # train-dit: "cache" reads the latent cache at data.root; "online" reads the images at data.root and encodes them
    # on the fly with the frozen tokenizer (tokenizer.name, tokenizer.checkpoint) on the training device
    latents: Literal["cache", "online"] = "cache"
    latent_stats: str | None = None  # online: stats.safetensors to standardise with (else computed, data.stats_items)
    stats_items: int = 10_000  # online: images (a seeded random subset) the latent statistics are computed from


@dataclass
class TokenizerConfig:
    """PAE / RAE tokenizer (docs/method.md § Tokenizer, § Tokenizer losses, § RAE baseline). Loss weights follow the
    secondary transcription of the paper."""

    name: str = "PAE-DINOv2-L-d32"
    vfm_weights: str | None = None  # local safetensors/.pth of the frozen encoder (hub names need a network)
    checkpoint: str | None = None  # trained tokenizer weights (safetensors)
    random_init: bool = False  # allow a random tokenizer when checkpoint is unset (pipeline checks only; never silent)
    # which weights of a tokenizer run / checkpoint encode latents (cache-latents, data.latents online): raw = the
    # trained, non-EMA weights, as the authors' extract_latents.py; recorded as tokenizer_weights in the metadata
    encode_weights: Literal["raw", "ema"] = "raw"
    # The latent width and the decoder are the variant's (``name``, docs/method.md § PAE tokenizer): no key repeats
    # them.
    # Loss weights and switches (docs/method.md §Tokenizer losses). A term is computed only when its switch is on
    # AND its weight is > 0; an off term is absent from the loss dict and costs nothing.
    lambda_l1: float = 1.0
    lambda_lpips: float = 1.0
    lambda_gan: float = 0.5
    lambda_ssr: float = 0.2
    lambda_mcr: float = 0.5
    lambda_scr: float = 1.0
    ssr: bool = True  # spatial-structure regularizer (Gram of latent tokens vs the structural target)
    # SSR's scale (docs/method.md § SSR): cosine Grams of l2-normalised tokens or raw inner products (both sides), and
    # the squared Gram difference summed per image / (N^2: mean, N: row_mean, 1: sum), averaged over the batch
    ssr_gram: Literal["cosine", "raw"] = "cosine"
    ssr_reduction: Literal["mean", "row_mean", "sum"] = "mean"
    # on logged steps (train.log_every): each regularizer's gradient norm at z over the reconstruction's, in
    # stats.jsonl as grad_share/<ssr|mcr|scr> (docs/method.md § Tokenizer training; extra backward passes then only)
    log_grad_shares: bool = True
    mcr: bool = True  # manifold-continuity regularizer (decode perturbed latents)
    scr: bool = True  # global-semantics regularizer (cosine to the 32-d semantic target)
    mcr_angles: tuple[float, ...] = (42.5, 85.0)  # (medium, large) degrees, one shared noise draw
    mcr_mode: Literal["noise", "geodesic"] = "noise"
    mcr_cascade: Literal["cascaded", "medium", "large"] = "cascaded"  # medium->sg(recon), large->sg(medium)
    scr_terms: Literal["pooled", "patch", "both"] = "both"
    priors: Literal["refined", "raw"] = "refined"  # SSR/SCR targets from the refined projector or raw VFM tokens
    priors_file: str | None = None  # priors=refined: the priors.safetensors written by refine-priors
    raw_prior_projection: Literal["pca", "random"] = "pca"  # priors=raw: VFM D -> the latent width for SCR
    noise_aug_tau: float = 0.0  # RAE noise-augmented decoding (0 = off; RAE uses 0.8)
    noise_aug_dist: Literal["uniform", "half_normal"] = "uniform"  # code: U(0, tau); paper: |N(0, tau^2)|
    gan_start_step: int = 0  # generator GAN term from this step on
    disc_start_step: int = 0  # discriminator updates from this step on
    adaptive_weight_max: float = 1e4
    disc_model: str = "vit_small_patch8_224.dino"  # timm name of the frozen discriminator backbone
    disc_weights: str | None = None  # local weights of disc_model; "random": random frozen features (tests/demo)
    disc_blocks: tuple[int, ...] = (2, 5, 8, 11)  # backbone blocks whose tokens feed the heads
    disc_input_size: int = 224  # images are resized to this before the backbone
    disc_aug: str = "color,translation,cutout"  # DiffAug policy (comma-separated; "" = none)
    lpips_weights: str | None = None  # LPIPS heads (official v0.1) or a whole pae_fast LPIPS file; "none": LPIPS off
    lpips_backbone_weights: str | None = None  # torchvision vgg16 state dict (not needed for a whole LPIPS file)
    heldout_items: int = 64  # train-tokenizer: held-out images for PSNR / SSIM (/ LPIPS / rFID) at each checkpoint
    grid_items: int = 8  # train-tokenizer: held-out images shown as input | reconstruction at each checkpoint
    # Ablations (docs/method.md § Ablation presets): the stage-0 initialisation policy and Table 3a's regularisers.
    # init_from_priors: projector + decompressor start from priors_file; None (auto) = only when SSR / SCR use refined
    # targets; true needs priors_file whatever the losses; false never initialises from it.
    init_from_priors: bool | None = None
    lambda_kl: float = 0.0  # KL(q(z|x) || N(0, I)); needs a *-kl tokenizer variant (log-variance head)
    lambda_diffusion: float = 0.0  # flow-matching loss of a jointly trained latent denoiser on z
    diffusion_hidden: int = 256  # that denoiser's width [choice]


@dataclass
class RefineConfig:
    """Stage 0: refined priors (a projector D->latent_dim and a ViT reconstructor), docs/method.md § Refined priors."""

    # P_t's output width is the tokenizer's latent width (the variant's; P_t initialises its projector): no key
    reconstructor_depth: int = 4
    reconstructor_hidden: int = 1024
    lambda_rep: float = 1.0
    lambda_gram: float = 1.0
    lowpass_strength: float = 0.4  # Gaussian sigma in units of one latent cell (image_size / grid); 0 = no filter
    upsampler: Literal["bilinear", "anyup"] = "bilinear"
    projector_heads: int = 16  # attention heads of P_t (the tokenizer's projector layout)
    reconstructor_heads: int = 16


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
    """Flow matching (docs/method.md § Flow matching). Time convention: t = 1 is data, t = 0 is noise."""

    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 0.7  # our convention: t <- s t / (1 + (s-1) t); s < 1 moves toward noise
    rae_alpha: float | None = None  # RAE's shift (t=1 noise convention); converted to shift = 1/alpha at load
    # convention of the generator weights loaded for sampling: pae (ours) or rae (RAE's own weights: t = 1 noise,
    # predicts eps - x), wrapped once at load (flow/convention.py); checkpoint metadata wins when it records one
    time_convention: Literal["pae", "rae"] = "pae"
    dimension_shift: bool = False  # RAE: shift 1/alpha, alpha = sqrt(C*H*W / 4096) of the latent shape, not flow.shift
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
    # auto: fused_adamw_ema (AdamW + EMA + bf16 copy in one Triton kernel) on CUDA where supported, else torch AdamW
    optimizer: Literal["auto", "adamw", "apex_fused_adam", "fused_adamw_ema"] = "auto"
    distributed: Literal["ddp", "fsdp"] = "ddp"
    log_every: int = 100
    ckpt_every: int = 5000
    keep_last: int = 3
    resume: str = "auto"  # auto | none | path to a checkpoint folder
    nonfinite: Literal["skip", "stop"] = "skip"
    max_skipped_steps: int = 10  # nonfinite=skip: this many consecutive skipped steps stop the run (exit code 5)
    tensorboard: bool = False
    kernel_backend: Literal["auto", "triton", "torch"] = "auto"
    device: str = "auto"  # auto | cpu | cuda
    find_unused_parameters: bool = False  # DDP: parameters without a gradient in some steps
    progress: bool = True  # rank 0: tqdm bar on a terminal; off a terminal the log_every lines are the progress


@dataclass
class SampleConfig:
    """Sampling (docs/method.md § Sampling): PAE default Euler ODE on shift(linspace(0, 1, 250), 0.4), CFG 2.5
    from t = 0.25.

    Grid (flow/grid.py): ``steps`` solver steps between the ``steps + 1`` points
    ``shift(linspace(t_start, t_end, steps + 1))``; the authors' "250 sampling steps" are 250 points = 249 steps.
    """

    checkpoint: str | None = None
    tokenizer_checkpoint: str | None = None
    num_samples: int = 64
    batch_size: int = 32
    sampler: Literal["euler", "heun", "euler_maruyama", "sde_sbdm"] = "euler"
    steps: int = 249  # solver steps = grid points - 1 (model calls: steps; 2 steps for heun; steps + 1 for sde_sbdm)
    shift: float = 0.4  # our convention, the same formula and value as PAE's code
    t_start: float = 0.0  # first grid time before the shift (sde_sbdm: PAE uses 1e-5)
    t_end: float = 1.0  # last grid time before the shift (sde_sbdm: 0.996, its last step's time; RAE: 0.999)
    # sde_sbdm's noise-free last step at t_end over h = 1 - t_end (docs/method.md § PAE no-guidance SDE):
    # mean x + h(2v - x/t) (the authors' presets), euler x + h v, tweedie x/t + ((1-t)^2/t) score
    last_step: Literal["mean", "euler", "tweedie"] = "mean"
    # RAE: the grid shift is 1/alpha, alpha = sqrt(C*H*W / 4096) of the generator's latent shape (not sample.shift)
    dimension_shift: bool = False
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
    sde_noise_scale: float = 1.0  # eta of our euler_maruyama SDE, g(t)^2 = 2 eta (1 - t); not used by sde_sbdm
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast of the generator on CUDA
    device: str = "auto"  # auto | cpu | cuda
    grid_max: int = 64  # samples shown in the PNG grid
    latent_stats: str | None = None  # stats.safetensors for weights whose metadata carries none (bare weights)


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
    protocol: Literal["adm", "torch-fidelity"] = "adm"  # IS splits/shuffle, k-NN distance precision (eval/protocol.py)
    is_splits: int = 10  # IS splits of the torch-fidelity protocol (ADM: consecutive chunks of 5,000 images)
    dino_model: str = "vit_large_patch14_dinov2.lvd142m"  # FD_DINOv2 feature space (timm name)
    dino_weights: str | None = None  # local DINOv2 weights; FD_DINOv2 is skipped when absent
    lpips_net: Literal["vgg", "alex"] = "vgg"
    lpips_weights: str | None = None  # LPIPS linear heads (official v0.1 .pth) or a whole pae_fast LPIPS state dict
    lpips_backbone_weights: str | None = None  # torchvision vgg16 / alexnet state dict for the LPIPS backbone
    ssc_sigma: float = 0.1  # token affinity exp(cos / sigma) for SSC
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class DemoConfig:
    """``demo`` (pae_fast/stages/demo.py, docs/method.md § Demo): the sizes of the stages before the generator.

    The generators use ``model`` / ``flow`` / ``train`` / ``sample`` (both PAE and the baseline: same steps); the
    tokenizers use ``tokenizer`` / ``refine`` with the steps below; ``tokenizer.vfm_weights`` names local ViT-tiny
    weights (unset: a ViT-tiny is pre-trained as an MAE on the demo images in the run)."""

    train_per_class: int = 128  # demo image crops per class (8 classes = 8 photographs)
    heldout_per_class: int = 32  # pixel-disjoint held-out crops per class (PSNR, validation loss, FD reference)
    mae_steps: int = 300  # MAE pre-training of the ViT-tiny VFM (unless tokenizer.vfm_weights is given)
    mae_batch_size: int = 64
    refine_steps: int = 100  # refine-priors
    refine_batch_size: int = 32
    tokenizer_steps: int = 400  # train-tokenizer, the same for PAE and the baseline
    tokenizer_batch_size: int = 16
    tokenizer_lr: float = 1e-3
    baseline: str = "RAE-tiny"  # the RAE-style tokenizer on the same VFM (no priors, same decoder)
    val_draws: int = 4  # (time, noise) draws per held-out latent for the generator validation loss
    # convergence (docs/method.md § Convergence): the generators of seeds seed .. seed + convergence_seeds - 1 per
    # latent space, each evaluated (unguided image FD in the VFM's features) at convergence_points log-spaced steps
    convergence_seeds: int = 2
    convergence_points: int = 6
    convergence_per_class: int = 8  # samples per class per evaluation
    convergence_sample_steps: int = 10  # sample.sampler steps per evaluation


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
    demo: DemoConfig = field(default_factory=DemoConfig)

    def finalize(self) -> None:
        """Conversions done once at load (never inside model code)."""
        flow = self.flow
        if flow.rae_alpha is not None:
            if flow.rae_alpha <= 0:
                raise ConfigError(f"flow.rae_alpha must be > 0, got {flow.rae_alpha}")
            # RAE's shift alpha (t = 1 noise) equals our shift s = 1 / alpha (t = 1 data), docs/method.md § Conventions.
            flow.shift = 1.0 / flow.rae_alpha
            flow.rae_alpha = None
        if flow.shift <= 0:
            raise ConfigError(f"flow.shift must be > 0, got {flow.shift}")
        if self.sample.shift <= 0:
            raise ConfigError(f"sample.shift must be > 0, got {self.sample.shift}")
        from pae_fast.config_checks import check_ranges

        check_ranges(self)  # every numeric value and device string, before any command writes anything


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def config_from_dict(data: dict, cls: type = Config, where: str = "") -> Any:
    """Build a typed config (default :class:`Config`) from a plain dict, checking every key and type."""
    return _config_from_dict(data, cls, where)


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML preset (its ``base:`` chain merged; the defaults when ``path`` is None) and apply dotted
    overrides."""
    data: dict = {}
    where = ""
    if path is not None:
        where = f" in {path}"
        data = read_preset(path)
    cfg = config_from_dict(data, Config, where)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg

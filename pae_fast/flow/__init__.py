"""Flow matching: linear path, time sampling and shift, loss, samplers and guidance (docs/method.md § Flow matching,
§ Sampling).

Convention: t = 1 is data, t = 0 is noise; ``x_t = t·x1 + (1 − t)·x0``, velocity ``v = x1 − x0``.
"""

from pae_fast.flow.convention import RAETimeConvention, convention_for, resolve_time_convention, wrap_time_convention
from pae_fast.flow.grid import LAST_STEPS, SAMPLER_NAMES, SamplingPlan, plan_from_config, sample_shift, sampling_plan
from pae_fast.flow.guidance import (
    AutoGuidance,
    ClassifierFreeGuidance,
    class_balanced_labels,
    conditional_velocity,
    guidance_mask,
    random_labels,
)
from pae_fast.flow.loss import FlowLoss, flow_matching_loss
from pae_fast.flow.path import (
    expand_time,
    interpolate,
    score_from_velocity,
    velocity_target,
    x0_from_velocity,
    x1_from_velocity,
)
from pae_fast.flow.samplers import (
    SAMPLERS,
    Trajectory,
    VelocityFn,
    apply_last_step,
    euler,
    euler_maruyama,
    heun,
    sample,
    sbdm_drift,
    sde_sbdm,
)
from pae_fast.flow.timesteps import dimension_shift, sample_time, shift_time, time_grid

__all__ = [
    "AutoGuidance",
    "ClassifierFreeGuidance",
    "FlowLoss",
    "LAST_STEPS",
    "RAETimeConvention",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SamplingPlan",
    "Trajectory",
    "VelocityFn",
    "apply_last_step",
    "class_balanced_labels",
    "conditional_velocity",
    "convention_for",
    "dimension_shift",
    "euler",
    "euler_maruyama",
    "expand_time",
    "flow_matching_loss",
    "guidance_mask",
    "heun",
    "interpolate",
    "plan_from_config",
    "random_labels",
    "resolve_time_convention",
    "sample",
    "sample_shift",
    "sample_time",
    "sampling_plan",
    "sbdm_drift",
    "sde_sbdm",
    "score_from_velocity",
    "shift_time",
    "time_grid",
    "velocity_target",
    "wrap_time_convention",
    "x0_from_velocity",
    "x1_from_velocity",
]

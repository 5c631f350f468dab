"""A ComfyUI model's noise levels as a diffguide schedule, and its sigmas as diffguide times.

ComfyUI samples in its own coordinates: on VP and EDM models x = x0 + sigma eps with sigma the VE
level (k-diffusion's), on flow models (CONST) x = (1 - sigma) x0 + sigma eps with sigma the flow
time. diffguide's schedules hold x = a x0 + s eps, so x_diffguide = c x_comfy with c = a on VP and
EDM schedules and c = a + s = 1 on flows (``core.schedule.ode_scale``). A denoised output is x0 in
both, and eps = (x_comfy - x0) / sigma on VE models: Pred(x0, eps) is the same in either.

Nothing here imports ComfyUI: a model_sampling is read through its attributes and its class names.
"""

from __future__ import annotations

import math

import torch

from ..core.schedule import F64, EDMSchedule, FlowSchedule, Schedule, VPSchedule, ode_scale

# how far (relative) a sigma may lie above a VP table's top and still be read as the top: ComfyUI
# computes its schedulers in float32, so its karras grid starts a few float32 steps off sigma_max
TOP_SLACK = 1e-5


def _class_names(obj) -> set[str]:
    """The names of obj's classes: ComfyUI builds each model_sampling as a class mixing a schedule
    (ModelSamplingDiscrete, ...) with a parameterisation (EPS, CONST, ...)."""
    return {cls.__name__ for cls in type(obj).__mro__}


def is_flow(model_sampling) -> bool:
    """True for ComfyUI's CONST (rectified flow) models, whose sigma is the flow time."""
    return "CONST" in _class_names(model_sampling)


def output_kind(model_sampling) -> str | None:
    """The network's raw output as diffguide names it (eps, v, flow, x0); None where ComfyUI's
    parameterisation has no diffguide name (EDM's, CogVideoX's v, a sigma_data other than 1)."""
    names = _class_names(model_sampling)
    if "CONST" in names:
        return "flow"
    if "X0" in names:
        return "x0"
    if "EDM" in names or float(getattr(model_sampling, "sigma_data", 1.0)) != 1.0:
        return None
    if "V_PREDICTION" in names:
        return "v"
    return "eps" if "EPS" in names else None


def _flow_schedule(model_sampling) -> FlowSchedule:
    """ComfyUI's flow sigma(t) = shift t / (1 + (shift - 1) t) (SD3's; Flux's exp(mu) shift is the
    same map), read back at t = 0.5 where it is shift / (1 + shift)."""
    half = float(model_sampling.percent_to_sigma(0.5))
    time_scale = float(model_sampling.timestep(torch.tensor(0.5, dtype=F64))) / 0.5
    return FlowSchedule(
        shift=half / (1 - half),
        time_scale=time_scale,
        num_train_timesteps=len(model_sampling.sigmas),
    )


def model_schedule(model_sampling, top: float | None = None) -> Schedule:
    """The diffguide schedule of a ComfyUI model_sampling: a flow for CONST models, EDM's for
    continuous EDM/V models, else the VP table of its trained sigmas. ``top``: the largest sigma a
    run will visit. A little above a VP table's top (ComfyUI's float32 rounding), the table's top
    is raised to it, so that every sigma keeps its exact level; further above, the levels are
    read on an EDM schedule, whose time is the VE level itself."""
    names = _class_names(model_sampling)
    if "CONST" in names:
        return _flow_schedule(model_sampling)
    if not names & {"EPS", "V_PREDICTION_DDPM", "COSMOS_RFLOW"}:
        raise ValueError(
            f"model_sampling {type(model_sampling).__name__} has no diffguide schedule (its "
            f"parameterisation is none of ComfyUI's EPS, V_PREDICTION, EDM, X0, CONST)"
        )
    lo, hi = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    continuous = "ModelSamplingContinuousEDM" in names
    if continuous or (top is not None and top > hi * (1 + TOP_SLACK)):
        return EDMSchedule(
            sigma_lo=lo,
            sigma_hi=max(hi, top or 0.0),
            sigma_data=float(getattr(model_sampling, "sigma_data", 1.0)),
        )
    sigmas = model_sampling.sigmas.detach().to("cpu", F64).clone()
    if top is not None and top > hi:  # within the slack: the table's top raised to it
        sigmas[-1] = top
    try:
        return VPSchedule(1 / (1 + sigmas * sigmas))
    except ValueError:  # a table with repeated levels (Stable Cascade's clamped ends)
        # up to the run's top, which ComfyUI's float32 karras grid puts a little above hi
        return EDMSchedule(sigma_lo=lo, sigma_hi=max(hi, top or 0.0))


def sigmas_of(schedule: Schedule, ts) -> torch.Tensor:
    """ComfyUI sigmas of diffguide times (float64): the inverse of ``times``."""
    ts = torch.as_tensor(ts, dtype=F64)
    return schedule.sigma(ts) if isinstance(schedule, FlowSchedule) else schedule.ve(ts)


def noise_scale(model_sampling) -> float:
    """The std of ComfyUI's noise on a flow model (its noise_scale: x = (1 - sigma) x0 +
    sigma noise_scale eps; HiDream-O1's is 8); 1 elsewhere, where ComfyUI does not read it."""
    return float(getattr(model_sampling, "noise_scale", 1.0)) if is_flow(model_sampling) else 1.0


def scale_at(schedule: Schedule, t) -> float:
    """c with x_diffguide = c x_comfy at time t: alpha on VE models, 1 on flows."""
    a, s = schedule.at(t)[:2]
    return ode_scale(schedule, a, s)


def sigma_at(schedule: Schedule, t) -> float:
    """ComfyUI's sigma at time t (a float)."""
    a, s, ve = schedule.at(t)[:3]
    return s if isinstance(schedule, FlowSchedule) else ve


def finite_top(sigmas) -> float:
    """The largest finite sigma of a grid (ComfyUI's grids are descending, noise end first)."""
    sig = torch.as_tensor(sigmas).detach().to("cpu", F64)
    return max((v for v in sig.tolist() if math.isfinite(v)), default=0.0)

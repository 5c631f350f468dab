"""A diffusers scheduler, read as diffguide objects: the noise schedule, the prediction kind, and
the time grid and starting noise scale its ``set_timesteps`` would use.

Only the scheduler's *config* and class decide these; its step rule plays no part (the sampler
does)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.denoiser import EDMPrecondition
from ..core.registry import parse_spec
from ..core.sample import IndexStride
from ..core.schedule import EDMSchedule, FlowSchedule, Schedule, TrigFlowSchedule, VPSchedule
from ..core.spacing import timesteps
from ..core.threshold import Clip, DynamicThreshold
from .scheduler_keys import review

KINDS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}

# Families of diffusers schedulers by their set_timesteps conventions.
_DDIM_LIKE = {
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "DDIMParallelScheduler",
    "DDPMParallelScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "CogVideoXDDIMScheduler",
    "CogVideoXDPMScheduler",
}
_DPM_LIKE = {
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "DPMSolverSDEScheduler",
    "SASolverScheduler",
}
_EULER_LIKE = {
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
}
_DDIM_KEEPS_EPS = {"DDIMScheduler", "DDIMParallelScheduler", "CogVideoXDDIMScheduler"}
# with sigma-derived grids (Karras, exponential, beta) these show the network an integer time beside
# the exact sigma: rounded (Karras) or truncated by their int64 timesteps (exponential, beta)
_ROUND_KARRAS = {
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "SASolverScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
}
_INT_TIMESTEPS = {
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "SASolverScheduler",
}
_FLOW = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"}
_EDM = {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"}
_STRIDED = {
    "DDIMScheduler",
    "DDIMParallelScheduler",
    "PNDMScheduler",
    "CogVideoXDDIMScheduler",
}  # t - T // n steps


@dataclass(frozen=True, eq=False)
class SigmaTimes:
    """The times diffusers' schedulers show the network beside exact Karras, exponential or beta
    sigmas: t from sigma by interpolating log sigma in the scheduler's own float32 table (its
    ``_sigma_to_t``; diffguide's schedule interpolates sigma itself), then rounded (multistep
    schedulers with Karras sigmas), truncated by their int64 cast (with exponential or beta
    sigmas) or kept ("float": Euler and the other k-diffusion ports)."""

    schedule: Schedule
    log_sigmas: np.ndarray  # float32, as the scheduler computes it
    mode: str  # "round", "trunc" or "float"

    @classmethod
    def of(cls, scheduler, schedule: Schedule, mode: str) -> "SigmaTimes":
        ac = scheduler.alphas_cumprod.detach().cpu().float().numpy()
        return cls(schedule, np.log(((1 - ac) / ac) ** 0.5), mode)

    def __call__(self, t: torch.Tensor):
        ve = np.atleast_1d(self.schedule.ve(torch.as_tensor(t, dtype=torch.float64)).numpy())
        log_sigma = np.log(np.maximum(ve, 1e-10))
        dists = log_sigma - self.log_sigmas[:, None]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(self.log_sigmas) - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
        tm = (1 - w) * low + w * (low + 1)
        tm = {"round": np.round, "trunc": np.trunc, "float": lambda v: v}[self.mode](tm)
        return torch.from_numpy(tm).reshape(torch.as_tensor(t).shape)


@dataclass(frozen=True, eq=False)
class TruncatedTimes:
    """The network's time truncated to an integer, as multistep schedulers' int64 timesteps do with
    flow sigmas (Sana's DPM-Solver: 1000 x shifted sigma, cast)."""

    schedule: Schedule

    def __call__(self, t: torch.Tensor):
        return torch.trunc(self.schedule.model_time(torch.as_tensor(t, dtype=torch.float64)))


@dataclass(frozen=True)
class FlowGrid:
    """FlowMatchEulerDiscreteScheduler.set_timesteps as a diffguide grid: ``steps`` unshifted base
    times
    (the pipeline's own linspace(1, 1/n, n) when it ``passes`` sigmas, as Flux and Qwen-Image do;
    else
    the scheduler's linspace(1, t_end, n)), shifted by the schedule, stretched so that the last one
    is
    ``terminal`` (shift_terminal: 1 - s scaled by (1 - terminal) / (1 - s_last)), respaced between
    their ends as Karras, exponential or Beta sigmas of the flow time (use_*_sigmas), then the data
    end."""

    passes: bool = False
    t_end: float = 1e-3
    terminal: float | None = None
    respace: str | None = None

    def options(self) -> dict:
        """The settings that make this grid other than the plain shifted one, for metadata."""
        return {k: v for k, v in (("shift_terminal", self.terminal), ("sigmas", self.respace)) if v}

    def __call__(self, schedule: FlowSchedule, steps: int) -> torch.Tensor:
        base = torch.linspace(
            1.0, 1.0 / steps if self.passes else self.t_end, steps, dtype=torch.float64
        )
        if not self.terminal and self.respace is None:  # the shifted base times themselves, exactly
            return torch.cat([base, torch.zeros(1, dtype=torch.float64)])
        s = schedule.flow_time(base)
        if self.terminal:
            z = 1 - s
            s = 1 - z * (1 - self.terminal) / z[-1]
        if self.respace is not None:
            s = respaced(s, self.respace)
        return torch.cat([schedule.t_of_flow_time(s), torch.zeros(1, dtype=torch.float64)])


def respaced(s: torch.Tensor, kind: str) -> torch.Tensor:
    """len(s) levels between s[0] and s[-1] as diffusers' _convert_to_karras (rho 7), _exponential
    or _beta (Beta(0.6, 0.6) quantiles) space them, on whatever level they are given (flow time
    here)."""
    from ..core.spacing import beta_quantile

    hi, lo, n = float(s[0]), float(s[-1]), s.numel()
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    if kind == "karras":
        return (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    if kind == "exponential":
        return torch.exp(torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64))
    q = [beta_quantile(1 - float(r), 0.6, 0.6) for r in ramp]
    return torch.tensor([lo + v * (hi - lo) for v in q], dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class ContinuousTimes:
    """Euler's timestep_type "continuous" with v-prediction (CosXL-style EDM training): the network
    sees ln(ve) / 4 of the exact level instead of a training index."""

    schedule: Schedule

    def __call__(self, t: torch.Tensor):
        return 0.25 * torch.log(self.schedule.ve(torch.as_tensor(t, dtype=torch.float64)))


@dataclass(frozen=True)
class SchedulerInfo:
    """What a diffusers scheduler means in diffguide terms."""

    schedule: Schedule
    kind: str
    grid: Any = field(
        default_factory=dict
    )  # timesteps() arguments reproducing set_timesteps, or a FlowGrid
    start: str = "unit"  # initial noise: "unit" (sqrt(a^2 + s^2) z), "sigma" (s z), "noise" (z)
    name: str = ""
    threshold: object = None  # x0 clipping the config asks for (clip_sample, thresholding)
    sampler: str = "dpmpp_2m"  # the default sampler for this model
    boundary: float | None = None  # a consistency model's timestep_scaling (LCMScheduler)
    time_fn: object = None  # the network's times on the own sigma grid (SigmaTimes)
    dynamic: tuple | None = None  # resolution-dependent shift (Flux): see at_size
    steps: int | None = None  # the scheduler's own default step count, if it has one
    notice: str | None = None  # said when the scheduler's step rule has no diffguide sampler
    stride_final: float | None = (
        None  # DDIM's and PNDM's t - T // n landing rule, and where it ends
    )
    precondition: object = None  # EDM's input and output scalings (EDM schedulers)
    unreproduced: tuple = ()  # 'key=value (why)' for config keys diffguide does not reproduce

    @property
    def config_notice(self) -> str | None:
        """One line naming every config key diffguide does not reproduce (None: all are)."""
        if not self.unreproduced:
            return None
        return (
            f"{self.name} config keys diffguide does not reproduce "
            "(its images will differ from diffusers'): " + "; ".join(self.unreproduced)
        )

    def at_size(self, seq_len: int) -> "SchedulerInfo":
        """The schedule for an image of ``seq_len`` latent tokens: with dynamic shifting (Flux), mu
        grows linearly in the token count between (base_seq_len, base_shift) and (max_seq_len,
        max_shift), and the flow time is shifted by exp(mu) ("exponential") or mu ("linear") -- the
        static shift s t / (1 + (s - 1) t) with s = exp(mu)."""
        if self.dynamic is None:
            return self
        base_len, max_len, base_shift, max_shift, kind = self.dynamic
        m = (max_shift - base_shift) / (max_len - base_len)
        mu = seq_len * m + base_shift - m * base_len
        shift = math.exp(mu) if kind == "exponential" else mu
        return dataclasses.replace(
            self, schedule=dataclasses.replace(self.schedule, shift=shift), dynamic=None
        )

    def passing_sigmas(self, grid: dict) -> "SchedulerInfo":
        """The info of a pipeline that passes its own sigmas (Flux's and Qwen-Image's linspace(1,
        1/n, n)): a flow scheduler still shifts, stretches and respaces them; ``grid`` otherwise."""
        if isinstance(self.grid, FlowGrid):
            return dataclasses.replace(self, grid=dataclasses.replace(self.grid, passes=True))
        return dataclasses.replace(self, grid=grid)

    def timesteps(self, steps: int, spacing: str | None = None) -> torch.Tensor:
        """The scheduler's own grid, or ``spacing`` (all the way to the data end) when given."""
        if spacing is not None:
            return timesteps(self.schedule, steps, spacing)
        if callable(self.grid):
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
            return self.grid(self.schedule, steps)
        return timesteps(self.schedule, steps, **self.grid)

    def stride(self, steps: int, sampler, spacing: str | None = None) -> IndexStride | None:
        """DDIM's and PNDM's landing rule (update to t - T // n, not to the grid's next point) for
        a run
        on the scheduler's own grid with the sampler that reproduces its step rule; else None."""
        if self.stride_final is None or spacing is not None or not steps:
            return None
        own = parse_spec("sampler", self.sampler)
        if type(sampler) is not type(own):
            return None
        return IndexStride(self.schedule.num_train_timesteps // steps, self.stride_final)

    def start_scale(self, ts: torch.Tensor) -> float:
        """Scale of the standard-normal initial latent at ts[0]: sqrt(a^2 + s^2) assumes
        unit-variance
        data (1 for VP); "sigma" is the k-diffusion habit of diffusers' Euler schedulers, x = s
        z."""
        if self.start == "noise":  # the pipeline starts from plain noise whatever the first level
            return 1.0
        a, s = float(self.schedule.alpha(ts[0])), float(self.schedule.sigma(ts[0]))
        return s if self.start == "sigma" else math.sqrt(a * a + s * s)


# schedulers that replace a zero terminal alpha_bar by 2^-24 so their first sigma is finite
_TINY_TERMINAL = {
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
}


def _vp_schedule(cfg, name: str = "") -> VPSchedule:
    schedule = VPSchedule.from_betas(
        beta_start=cfg.get("beta_start", 0.0001),
        beta_end=cfg.get("beta_end", 0.02),
        beta_schedule=cfg.get("beta_schedule", "linear"),
        num_train_timesteps=cfg.get("num_train_timesteps", 1000),
        rescale_betas_zero_snr=cfg.get("rescale_betas_zero_snr", False),
        snr_shift_scale=cfg.get("snr_shift_scale"),  # CogVideoX's schedulers
        trained_betas=cfg.get("trained_betas"),
    )
    ac = schedule.alphas_cumprod
    if name in _TINY_TERMINAL and float(ac[-1]) == 0.0:
        ac = ac.clone()
        ac[-1] = 2.0**-24
        return VPSchedule(ac)
    return schedule


def _flow(name: str, cfg: dict, unreproduced: tuple) -> SchedulerInfo:
    """FlowMatchEuler / FlowMatchHeun (SD3, Flux, Qwen-Image): shift, dynamic shift, shift_terminal,
    Karras / exponential / Beta sigmas of the flow time."""
    T = cfg.get("num_train_timesteps", 1000)
    dynamic = None
    if cfg.get("use_dynamic_shifting"):
        kind = cfg.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise ValueError(
                f"{name} time_shift_type {kind!r} is not supported; supported: exponential, linear"
            )
        dynamic = (
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
            kind,
        )
    schedule = FlowSchedule(shift=float(cfg.get("shift", 1.0)), num_train_timesteps=T)
    # its own grid spaces N points from 1 to the lowest level of its training table (shifted there
    # unless the shift is dynamic), which set_timesteps then shifts again
    t_end = (
        1.0 / T
        if dynamic
        else float(schedule.flow_time(torch.tensor(1.0 / T, dtype=torch.float64)))
    )
    respace = next(
        (k for k in ("karras", "exponential", "beta") if cfg.get(f"use_{k}_sigmas")), None
    )
    grid = FlowGrid(False, t_end, cfg.get("shift_terminal") or None, respace)
    sampler, notice = "euler", None
    if name == "FlowMatchHeunDiscreteScheduler":
        sampler = "heun"
    elif cfg.get("stochastic_sampling"):
        sampler = "consistency"
        notice = (
            f"{name} with stochastic_sampling draws its step noise from torch's global generator "
            "in diffusers; diffguide's consistency sampler draws it from each image's seed (the "
            "same rule, other noise)"
        )
    return SchedulerInfo(
        schedule,
        "flow",
        grid,
        "unit",
        name,
        sampler=sampler,
        dynamic=dynamic,
        notice=notice,
        unreproduced=unreproduced,
    )


def _edm(name: str, cfg: dict, unreproduced: tuple) -> SchedulerInfo:
    """EDMEuler / EDMDPMSolverMultistep (Playground v2.5, CosXL): EDM's VE levels and
    preconditioning."""
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"{name} prediction_type {pred!r} is not supported; supported: epsilon, v_prediction"
        )
    sd = float(cfg.get("sigma_data", 0.5))
    schedule = EDMSchedule(
        float(cfg.get("sigma_min", 0.002)),
        float(cfg.get("sigma_max", 80.0)),
        sd,
        int(cfg.get("num_train_timesteps", 1000)),
    )
    kind = cfg.get("sigma_schedule", "karras")
    if kind not in ("karras", "exponential"):
        raise ValueError(
            f"{name} sigma_schedule {kind!r} is not supported; supported: karras, exponential"
        )
    grid = (
        {"spacing": "karras", "rho": float(cfg.get("rho", 7.0))}
        if kind == "karras"
        else {"spacing": "exponential"}
    )
    sampler, notice = (
        ("euler", None)
        if name == "EDMEulerScheduler"
        else own_sampler("DPMSolverMultistepScheduler", cfg)
    )
    return SchedulerInfo(
        schedule,
        "eps",
        grid,
        "unit",
        name,
        _threshold(cfg, False),
        sampler,
        notice=notice,
        precondition=EDMPrecondition(sd, 1.0 if pred == "epsilon" else -1.0),
        unreproduced=unreproduced,
    )


def _threshold(cfg: dict, keep: bool):
    if cfg.get("thresholding"):
        return DynamicThreshold(
            cfg.get("dynamic_thresholding_ratio", 0.995),
            cfg.get("sample_max_value", 1.0),
            keep_eps=keep,
        )
    if cfg.get("clip_sample"):
        return Clip(cfg.get("clip_sample_range", 1.0), keep_eps=keep)
    return None


def from_scheduler(scheduler) -> SchedulerInfo:
    """Read a diffusers scheduler as a SchedulerInfo. Config keys diffguide does not reproduce are
    listed in ``unreproduced`` (``scheduler_keys.review``); the pipeline says so in one notice."""
    name = type(scheduler).__name__
    cfg = dict(scheduler.config)
    unreproduced = tuple(review(name, cfg, type(scheduler)))
    if name in _FLOW:
        return _flow(name, cfg, unreproduced)
    if name in _EDM:
        return _edm(name, cfg, unreproduced)
    if name == "SCMScheduler":  # sCM's TrigFlow (SANA-Sprint): the family turns the output into x0
        if cfg.get("prediction_type", "trigflow") != "trigflow":
            raise ValueError(
                f"SCMScheduler prediction_type {cfg.get('prediction_type')!r} is not supported; "
                "supported: trigflow"
            )
        schedule = TrigFlowSchedule(
            sigma_data=float(cfg.get("sigma_data", 0.5)),
            num_train_timesteps=cfg.get("num_train_timesteps", 1000),
        )
        return SchedulerInfo(
            schedule,
            "x0",
            {"spacing": "scm"},
            "unit",
            name,
            sampler="consistency",
            steps=2,
            unreproduced=unreproduced,
        )
    if name in _DPM_LIKE and cfg.get("use_flow_sigmas"):  # Sana: DPM-Solver on a rectified flow
        if cfg.get("prediction_type") != "flow_prediction":
            raise ValueError(
                f"{name} with use_flow_sigmas needs prediction_type flow_prediction, got "
                f"{cfg.get('prediction_type')!r}"
            )
        T = cfg.get("num_train_timesteps", 1000)
        schedule = FlowSchedule(shift=float(cfg.get("flow_shift", 1.0)), num_train_timesteps=T)
        grid = {
            "spacing": "uniform_t",
            "t_start": 1 - 1 / T,
        }  # 1 - linspace(1, 1/T, n + 1), the last dropped
        if name == "UniPCMultistepScheduler":  # its own: linspace(1, 1/T, n + 1)[:-1], sigma 1
            grid = {"spacing": "uniform_t", "t_start": 1.0, "stop": 1 / T, "nudge": 1e-6}
        if cfg.get("final_sigmas_type") == "sigma_min":
            raise ValueError(
                f"{name} with flow sigmas and final_sigmas_type sigma_min is not supported"
            )
        sampler, notice = own_sampler(name, cfg)
        return SchedulerInfo(
            schedule,
            "flow",
            grid,
            "noise",
            name,  # init_noise_sigma 1 at sigma 1 - 1/T
            sampler=sampler,
            notice=notice,
            unreproduced=unreproduced,
            time_fn=TruncatedTimes(schedule) if name in _INT_TIMESTEPS else None,
        )
    return _vp(scheduler, name, cfg, unreproduced)


def _vp(scheduler, name: str, cfg: dict, unreproduced: tuple) -> SchedulerInfo:
    """The discrete VP schedulers (DDIM, DDPM, PNDM, LCM, TCD, DPM-Solver, UniPC, DEIS, Euler,
    Heun...)."""
    kind = KINDS.get(cfg.get("prediction_type", "epsilon"))
    if kind is None or kind == "flow":
        raise ValueError(
            f"{name} has prediction_type {cfg.get('prediction_type')!r}; supported: "
            f"epsilon, v_prediction, sample"
        )
    schedule = _vp_schedule(cfg, name)
    spacing = cfg.get("timestep_spacing", "leading" if name in _DDIM_LIKE else "linspace")
    grid: dict = {"spacing": spacing}
    if spacing == "leading":
        grid["steps_offset"] = cfg.get("steps_offset", 0)
    start, rounding, stride_final = "unit", None, None
    sigma_grid = next(
        (k for k in ("karras", "exponential", "beta") if cfg.get(f"use_{k}_sigmas")), None
    )
    lu = name == "DPMSolverMultistepScheduler" and cfg.get("use_lu_lambdas") and sigma_grid is None
    if sigma_grid is not None or lu:
        grid = {
            "spacing": sigma_grid or "exponential"
        }  # exponential: uniform in log sigma; beta: Beta(0.6, 0.6) quantiles
        if name in _EULER_LIKE:  # Euler's own sigma_min / sigma_max bound its sigma grids
            grid.update(
                {k: float(cfg[k]) for k in ("sigma_min", "sigma_max") if cfg.get(k) is not None}
            )
        rounds = (sigma_grid == "karras" and name in _ROUND_KARRAS or lu) and not (
            name == "DPMSolverMultistepScheduler"
            and cfg.get("beta_schedule") == "squaredcos_cap_v2"
        )
        mode = "round" if rounds else "trunc" if name in _INT_TIMESTEPS else "float"
        rounding = (
            SigmaTimes.of(scheduler, schedule, mode)
            if hasattr(scheduler, "alphas_cumprod")
            else None
        )
    elif name in _DPM_LIKE:
        if spacing != "trailing":
            grid["drop_last"] = True
    elif name in _EULER_LIKE:
        if spacing == "linspace":
            grid["round"] = False  # fractional timesteps, interpolated sigmas
    elif name in _STRIDED:
        if spacing != "leading":  # the grid's next point is not where their step lands (t - T // n)
            stride_final = -1.0 if cfg.get("set_alpha_to_one", name != "PNDMScheduler") else 0.0
        elif cfg.get("set_alpha_to_one", name != "PNDMScheduler") is False:
            grid["final"] = "sigma_min"  # DDIM's last step lands on alpha_bar[0], not on data
    if (
        name == "EulerDiscreteScheduler"
        and cfg.get("timestep_type") == "continuous"
        and kind == "v"
    ):
        rounding = ContinuousTimes(schedule)
    if name in _EULER_LIKE and spacing in ("linspace", "trailing"):
        start = "sigma"
    if name in _DPM_LIKE and (
        cfg.get("final_sigmas_type") == "sigma_min"
        or name == "DEISMultistepScheduler"
        and sigma_grid is None
    ):  # DEIS ends on sigma(0)
        grid["final"] = "sigma_min"
    threshold = _threshold(
        cfg, name in _DDIM_KEEPS_EPS
    )  # DDIM's step clips x0 but renoises with the model's eps
    if name == "TCDScheduler":  # TCD: LCM's grid, no boundary, ending on the table's first level
        grid = {
            "spacing": "lcm",
            "original_steps": int(cfg.get("original_inference_steps", 50)),
            "final": "sigma_min",
        }
        # the pipelines pass eta = 0 unless told (TCD's gamma); eta=0.3 is the authors'
        # recommendation
        return SchedulerInfo(
            schedule, kind, grid, start, name, threshold, "tcd:gamma=0", unreproduced=unreproduced
        )
    if (
        name == "LCMScheduler"
    ):  # a consistency-distilled model: boundary condition and its own sampler
        grid = {"spacing": "lcm", "original_steps": int(cfg.get("original_inference_steps", 50))}
        return SchedulerInfo(
            schedule,
            kind,
            grid,
            start,
            name,
            threshold,
            "consistency",
            float(cfg.get("timestep_scaling", 10.0)),
            unreproduced=unreproduced,
        )
    sampler, notice = own_sampler(name, cfg)
    if (
        name == "DEISMultistepScheduler" and sigma_grid is not None
    ):  # diffusers' last step there is empty
        notice = (
            f"{name} with use_{sigma_grid}_sigmas ends with a zero-length step in diffusers, so "
            f"its images keep sigma_min's noise; diffguide's grid lands on data"
        )
    return SchedulerInfo(
        schedule,
        kind,
        grid,
        start,
        name,
        threshold,
        sampler=sampler,
        time_fn=rounding,
        notice=notice,
        stride_final=stride_final,
        unreproduced=unreproduced,
    )


# diffusers scheduler -> the diffguide sampler with its step rule (the grid comes from the config)
_SAMPLERS = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "KDPM2DiscreteScheduler": "dpm2",
    "KDPM2AncestralDiscreteScheduler": "dpm2_ancestral",
    "DDIMScheduler": "ddim",
    "DDIMParallelScheduler": "ddim",
    "DDPMScheduler": "ddim:eta=1",
    "DDPMParallelScheduler": "ddim:eta=1",
    "CogVideoXDDIMScheduler": "ddim",
}


def _spec(base: str, opts: list, cfg: dict) -> str:
    """A sampler spec from its options, with the scheduler's lower_order_final where it is off."""
    if cfg.get("lower_order_final", True) is False:
        opts = [*opts, "lower_order_final=False"]
    return base + (":" + ",".join(opts) if opts else "")


def own_sampler(name: str, cfg: dict) -> tuple[str, str | None]:
    """(the diffguide sampler that reproduces the scheduler's step rule, a notice where none
    does)."""
    if name == "DPMSolverMultistepScheduler":
        algo, order = cfg.get("algorithm_type", "dpmsolver++"), cfg.get("solver_order", 2)
        base = {
            ("dpmsolver++", 2): "dpmpp_2m",
            ("dpmsolver++", 3): "dpmpp_3m_published",
            ("sde-dpmsolver++", 2): "dpmpp_2m_sde",
        }.get((algo, order))
        if base is None:
            return "dpmpp_2m", (
                f"{name} with algorithm_type {algo!r} and solver_order {order} has no diffguide "
                f"sampler; sampling with dpmpp_2m"
            )
        opts = (
            [f"solver_type={cfg['solver_type']}"]
            if cfg.get("solver_type", "midpoint") != "midpoint"
            else []
        )
        if cfg.get("euler_at_final"):
            opts.append("euler_at_final=True")
        return _spec(base, opts, cfg), None
    if name == "UniPCMultistepScheduler":
        if cfg.get("predict_x0", True) is False or cfg.get("solver_p") is not None:
            return (
                "unipc",
                f"{name} with predict_x0=False or a solver_p has no diffguide sampler; sampling "
                "with unipc",
            )
        opts = [f"order={cfg.get('solver_order', 2)}"] if cfg.get("solver_order", 2) != 2 else []
        if cfg.get("solver_type", "bh2") != "bh2":
            opts.append(f"solver_type={cfg['solver_type']}")
        if cfg.get("disable_corrector"):
            opts.append(
                "disable_corrector=" + "|".join(str(int(v)) for v in cfg["disable_corrector"])
            )
        return _spec("unipc", opts, cfg), None
    if name == "DEISMultistepScheduler":
        if cfg.get("algorithm_type", "deis") != "deis":
            return (
                "deis",
                f"{name} with algorithm_type {cfg.get('algorithm_type')!r} has no diffguide "
                "sampler; sampling with deis",
            )
        opts = [f"order={cfg.get('solver_order', 2)}"] if cfg.get("solver_order", 2) != 2 else []
        return _spec("deis", opts, cfg), None
    if name == "DPMSolverSinglestepScheduler":
        algo, order = cfg.get("algorithm_type", "dpmsolver++"), cfg.get("solver_order", 2)
        if (
            algo == "dpmsolver++"
            and order == 2
            and cfg.get("solver_type", "midpoint") == "midpoint"
        ):
            return _spec("dpmpp_2s_singlestep", [], cfg), None
        return "dpmpp_2m", (
            f"{name} with algorithm_type {algo!r}, solver_order {order} and solver_type "
            f"{cfg.get('solver_type', 'midpoint')!r} has no diffguide sampler; sampling with "
            "dpmpp_2m"
        )
    if name == "DPMSolverSDEScheduler":
        return "dpmpp_sde", (
            f"{name}: sampling with dpmpp_sde, whose Brownian noise is diffguide's own tree, not "
            f"torchsde's: the images differ from diffusers' for the same seed"
        )
    if name == "PNDMScheduler":
        plms = "plms:space=v" if cfg.get("prediction_type") == "v_prediction" else "plms"
        if cfg.get("skip_prk_steps", False):
            return plms, None
        return plms, (
            f"{name} without skip_prk_steps starts with Runge-Kutta (PRK) steps, which diffguide "
            f"does not have; sampling with plms (its pseudo improved-Euler start)"
        )
    if name in ("DDPMScheduler", "DDPMParallelScheduler") and cfg.get("variance_type") not in (
        None,
        "fixed_small",
        "fixed_small_log",
    ):
        return "ddim:eta=1", (
            f"{name} with variance_type {cfg.get('variance_type')!r} has no diffguide sampler; "
            f"sampling with ddim:eta=1 (its fixed_small posterior)"
        )
    if name in _SAMPLERS:
        return _SAMPLERS[name], None
    return "dpmpp_2m", f"{name} has no diffguide sampler yet; sampling with dpmpp_2m on its grid"

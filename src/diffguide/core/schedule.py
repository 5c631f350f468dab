"""Noise schedules: x_t = alpha(t) x0 + sigma(t) eps, described as (alpha, sigma, lambda,
lambda^-1).

Every schedule also exposes the VE-equivalent noise level ``ve(t) = sigma/alpha = exp(-lambda)``
(k-diffusion's and EDM's "sigma"), which is what spacings, guidance intervals and Heun-type solvers
use, so they behave the same on VP and flow models. All arithmetic is float64.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

F64 = torch.float64


def _t64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=F64)


class Schedule:
    """Base class. Subclasses define ``ve(t)``, ``t_of_ve(ve)``, ``alpha(t)`` and ``model_time(t)``.

    ``t_min`` is the data end (sigma = 0), ``t_max`` the noise end. ``sigma_min``/``sigma_max`` are
    the
    finite VE levels the network was trained on, the default range of logSNR and Karras spacings.
    """

    t_min: float
    t_max: float
    num_train_timesteps: int
    ode_space = "ve"  # coordinates where Heun-type solvers integrate: x/a (VE) or x/(a+s) (flow)

    def ve(self, t) -> torch.Tensor:
        raise NotImplementedError

    def t_of_ve(self, ve) -> torch.Tensor:
        raise NotImplementedError

    def alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def model_time(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        ve = self.ve(t)
        # ve * alpha keeps full precision near the data end; at ve = inf (alpha = 0) sigma is 1.
        return torch.where(torch.isinf(ve), torch.ones_like(ve), ve * self.alpha(t))

    def lam(self, t) -> torch.Tensor:
        """Half log-SNR, log(alpha/sigma): +inf at the data end."""
        return -torch.log(self.ve(t))

    def t_of_lam(self, lam) -> torch.Tensor:
        return self.t_of_ve(torch.exp(-_t64(lam)))

    @property
    def sigma_min(self) -> float:
        raise NotImplementedError

    @property
    def sigma_max(self) -> float:
        raise NotImplementedError

    def at(self, t) -> tuple[float, float, float, float]:
        """(alpha, sigma, ve, model_time) at one time as float64 floats, memoised: a sampling run
        asks for the same few times over and over, and tensor calls on scalars cost microseconds."""
        return _at(self, float(t))

    def check_t(self, t: torch.Tensor, what: str = "t") -> None:
        lo, hi = min(self.t_min, self.t_max), max(self.t_min, self.t_max)
        if torch.any(t < lo - 1e-9) or torch.any(t > hi + 1e-9) or torch.any(torch.isnan(t)):
            raise ValueError(
                f"{what} has values outside this schedule's range [{lo}, {hi}]: "
                f"min {t.min().item():g}, max {t.max().item():g}"
            )


@functools.lru_cache(maxsize=16384)
def _at(schedule: Schedule, t: float) -> tuple[float, float, float, float]:
    tt = torch.tensor([t], dtype=F64)
    return (
        float(schedule.alpha(tt)),
        float(schedule.sigma(tt)),
        float(schedule.ve(tt)),
        float(schedule.model_time(tt)),
    )


def ode_scale(schedule, a, s):
    """c of the straight coordinates y = x / c in which the probability-flow ODE is integrated
    (``ode_space``): a + s on flow schedules (ComfyUI's CONST models, where it is 1), else a (the
    VE coordinates x / a). a and s may be floats or tensors."""
    return (a + s) if getattr(schedule, "ode_space", "ve") == "flow" else a


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: sqrt(alpha_bar) moved to end at 0, its start kept."""
    ab = alphas_cumprod.sqrt()
    ab0, abT = ab[0].clone(), ab[-1].clone()
    return ((ab - abT) * (ab0 / (ab0 - abT))) ** 2


@dataclass(frozen=True, eq=False)
class VPSchedule(Schedule):
    """Discrete variance-preserving schedule from a table of alphas_cumprod (DDPM, SD 1/2/XL, DiT).

    Time t is the training index (the value the network sees), fractional in between. The table is
    extended with t = -1, where alpha = 1 and sigma = 0, so every grid can end at clean data.
    Between
    table entries the VE level is interpolated linearly, as diffusers' Euler/Heun schedulers do.
    With a
    zero-terminal-SNR table (alphas_cumprod[-1] == 0) the last interval interpolates alpha instead,
    so alpha reaches 0 continuously.
    """

    alphas_cumprod: torch.Tensor
    spacing: str = "linspace"
    _ve_ext: torch.Tensor = field(init=False, repr=False)
    _a_ext: torch.Tensor = field(init=False, repr=False)
    _zero_snr: bool = field(init=False, repr=False)

    def __post_init__(self):
        ac = torch.as_tensor(self.alphas_cumprod).detach().to("cpu", F64).flatten()
        if ac.numel() < 2:
            raise ValueError(f"alphas_cumprod needs at least 2 entries, got {ac.numel()}")
        if torch.any(ac[1:] >= ac[:-1]) or ac[0] > 1 or ac[-1] < 0 or ac[0] <= 0:
            raise ValueError(
                "alphas_cumprod must be strictly decreasing within (0, 1] "
                "(the last entry may be 0 for zero terminal SNR)"
            )
        object.__setattr__(self, "alphas_cumprod", ac)
        ve = torch.sqrt((1 - ac) / ac)  # inf where ac == 0
        object.__setattr__(self, "_ve_ext", torch.cat([ve.new_zeros(1), ve]))
        object.__setattr__(self, "_a_ext", torch.cat([ve.new_ones(1), ac.sqrt()]))
        object.__setattr__(self, "_zero_snr", bool(ac[-1] == 0))

    @classmethod
    def from_betas(
        cls,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        rescale_betas_zero_snr: bool = False,
        snr_shift_scale: float | None = None,
        trained_betas=None,
        **kwargs,
    ) -> "VPSchedule":
        """The tables diffusers builds from a scheduler config (same float32 arithmetic);
        ``snr_shift_scale``: CogVideoX's shift, which comes before the zero-SNR rescale."""
        n = int(num_train_timesteps)
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=F64)
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.tensor(
                [min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32
            )
        else:
            raise ValueError(
                f"unknown beta_schedule {beta_schedule!r}; choose one of: "
                "linear, scaled_linear, squaredcos_cap_v2"
            )
        if snr_shift_scale is not None:  # CogVideoX: the SNR divided by k (SD3's shift)
            k = float(snr_shift_scale)
            ac = torch.cumprod(1 - betas, 0)
            ac = ac / (k + (1 - k) * ac)
            return cls(rescale_zero_terminal_snr(ac) if rescale_betas_zero_snr else ac, **kwargs)
        if rescale_betas_zero_snr:  # the other schedulers rescale through their betas
            ab2 = rescale_zero_terminal_snr(torch.cumprod(1 - betas, 0))
            betas = 1 - torch.cat([ab2[:1], ab2[1:] / ab2[:-1]])
        return cls(torch.cumprod(1.0 - betas, dim=0), **kwargs)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def t_min(self) -> float:
        return -1.0

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    def index_time(self, i) -> torch.Tensor:
        """The time of training timestep index i (-1: the data end): the index itself."""
        return _t64(i)

    @property
    def zero_terminal_snr(self) -> bool:
        return self._zero_snr

    @property
    def sigma_min(self) -> float:
        return float(self._ve_ext[1])

    @property
    def sigma_max(self) -> float:
        return float(self._ve_ext[-1])

    def _segment(self, t):
        u = _t64(t).clamp(self.t_min, self.t_max) + 1.0  # position in the extended table
        k = u.floor().clamp(0, self.num_train_timesteps - 1).long()
        return k, u - k

    def ve(self, t) -> torch.Tensor:
        k, f = self._segment(t)
        lo, hi = self._ve_ext[k], self._ve_ext[k + 1]
        ve = torch.where(f == 0, lo, lo + f * (hi - lo))
        if self.zero_terminal_snr:
            a = self._a_ext[k] * (1 - f)
            ve = torch.where(torch.isinf(hi) & (f > 0), torch.sqrt(1 - a * a) / a, ve)
        return ve

    def alpha(self, t) -> torch.Tensor:
        return torch.rsqrt(1 + self.ve(t) ** 2)

    def t_of_ve(self, ve) -> torch.Tensor:
        ve = _t64(ve)
        table = self._ve_ext
        k = (torch.searchsorted(table, ve.clamp(min=0), right=True) - 1).clamp(0, table.numel() - 2)
        lo, hi = table[k], table[k + 1]
        t = k - 1 + (ve - lo) / (hi - lo)
        if self.zero_terminal_snr:
            a = torch.rsqrt(1 + ve**2)
            t = torch.where(torch.isinf(hi), k - 1 + 1 - a / self._a_ext[k], t)
        return t.clamp(self.t_min, self.t_max)

    def model_time(self, t) -> torch.Tensor:
        return _t64(t).clamp(0, self.t_max)


@dataclass(frozen=True)
class FlowSchedule(Schedule):
    """Rectified flow (SD3, Flux): x_t = (1 - s) x0 + s eps with s the shifted flow time.

    t in [0, 1] is the unshifted time; s(t) = shift t / (1 + (shift - 1) t), so the VE level is
    simply
    shift * t / (1 - t) and a uniform grid in t is the shifted grid SD3 samples on. The network sees
    ``time_scale * s`` (1000 for SD3, 1 for Flux).
    """

    shift: float = 1.0
    time_scale: float = 1000.0
    num_train_timesteps: int = 1000
    spacing: str = "uniform_t"

    def __post_init__(self):
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"FlowSchedule shift must be a positive number, got {self.shift!r}")
        if int(self.num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps!r}")

    t_min = 0.0
    t_max = 1.0
    ode_space = "flow"

    def flow_time(self, t) -> torch.Tensor:
        t = _t64(t)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def t_of_flow_time(self, s) -> torch.Tensor:
        """The inverse of ``flow_time``: the time of flow time s (ComfyUI's and diffusers' flow
        sigma), through its VE level s / (1 - s), which is inf from s = 1 on (pure noise)."""
        s = _t64(s)
        return self.t_of_ve(torch.where(s >= 1, torch.full_like(s, math.inf), s / (1 - s)))

    def index_time(self, i) -> torch.Tensor:
        """The time of training timestep index i: (i + 1) / n, as FlowMatchEulerDiscreteScheduler's
        training sigmas 1/n .. 1 (so -1 is the data end and n - 1 pure noise), before the shift."""
        return (_t64(i) + 1) / self.num_train_timesteps

    def ve(self, t) -> torch.Tensor:
        t = _t64(t)
        return self.shift * t / (1 - t)  # inf at t = 1

    def alpha(self, t) -> torch.Tensor:
        return 1 - self.flow_time(t)

    def sigma(self, t) -> torch.Tensor:
        return self.flow_time(t)

    def t_of_ve(self, ve) -> torch.Tensor:
        ve = _t64(ve)
        return torch.where(torch.isinf(ve), torch.ones_like(ve), ve / (self.shift + ve))

    def model_time(self, t) -> torch.Tensor:
        return self.time_scale * self.flow_time(t)

    @property
    def sigma_min(self) -> float:
        return float(self.ve(1.0 / self.num_train_timesteps))

    @property
    def sigma_max(self) -> float:
        return float(self.ve(1.0 - 1.0 / self.num_train_timesteps))


@dataclass(frozen=True)
class TrigFlowSchedule(Schedule):
    """TrigFlow (Lu & Song 2024, sCM, eq. 1; SANA-Sprint): x_t = cos(t) x0 + sin(t) sigma_d z with
    t in [0, pi/2], held here in units of sigma_d (x / sigma_d, whose x0 is the VAE latent that
    SanaSprintPipeline decodes): alpha = cos t, sigma = sin t, VE level tan t (sigma_d tan t in
    EDM's units). The network sees the flow time it was trained with, tau = sin t / (cos t + sin t)
    (``model_time``); its input and output conversions belong to the model family."""

    sigma_data: float = 0.5
    num_train_timesteps: int = 1000
    spacing: str = "uniform_t"

    def __post_init__(self):
        if not (self.sigma_data > 0 and math.isfinite(self.sigma_data)):
            raise ValueError(
                f"TrigFlowSchedule sigma_data must be a positive number, got {self.sigma_data!r}"
            )

    t_min = 0.0
    t_max = math.pi / 2
    ode_space = "ve"

    def ve(self, t) -> torch.Tensor:
        t = _t64(t)
        return torch.where(t >= self.t_max, torch.full_like(t, math.inf), torch.tan(t))

    def t_of_ve(self, ve) -> torch.Tensor:
        return torch.atan(_t64(ve))

    def alpha(self, t) -> torch.Tensor:
        return torch.cos(_t64(t)).clamp(min=0.0)

    def sigma(self, t) -> torch.Tensor:
        return torch.sin(_t64(t))

    def model_time(self, t) -> torch.Tensor:
        t = _t64(t)
        return torch.sin(t) / (torch.cos(t) + torch.sin(t))

    @property
    def sigma_min(self) -> float:
        return 0.002 / self.sigma_data  # EDM's range (0.002 to 80), in units of sigma_d

    @property
    def sigma_max(self) -> float:
        return 80.0 / self.sigma_data


@dataclass(frozen=True)
class EDMSchedule(Schedule):
    """EDM's continuous VE levels (Karras et al. 2022; diffusers' EDM schedulers) in VP form: t is
    the
    VE level itself, alpha = 1 / sqrt(1 + t^2), so the state is x_VE / sqrt(1 + sigma^2) and ends as
    the data. The network sees c_noise = ln(sigma) / 4 (EDM's Table 1); its input and output
    scalings with ``sigma_data`` are an ``EDMPrecondition`` of the denoiser."""

    sigma_lo: float = 0.002
    sigma_hi: float = 80.0
    sigma_data: float = 0.5
    num_train_timesteps: int = 1000
    spacing: str = "karras"

    def __post_init__(self):
        if not (0 < self.sigma_lo < self.sigma_hi < math.inf) or not self.sigma_data > 0:
            raise ValueError(
                f"EDMSchedule needs 0 < sigma_min < sigma_max < inf and sigma_data > 0, got "
                f"{self.sigma_lo}, {self.sigma_hi}, {self.sigma_data}"
            )

    t_min = 0.0

    @property
    def t_max(self) -> float:
        return self.sigma_hi

    def ve(self, t) -> torch.Tensor:
        return _t64(t)

    def t_of_ve(self, ve) -> torch.Tensor:
        return _t64(ve)

    def alpha(self, t) -> torch.Tensor:
        return torch.rsqrt(1 + _t64(t) ** 2)

    def model_time(self, t) -> torch.Tensor:
        return 0.25 * torch.log(_t64(t))

    @property
    def sigma_min(self) -> float:
        return self.sigma_lo

    @property
    def sigma_max(self) -> float:
        return self.sigma_hi

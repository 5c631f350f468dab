"""Denoisers: callables ``(x, t, cond) -> Pred`` with a ``.schedule``.

``t`` is a 0-dim tensor (one level for the batch, as in sampling) or shape [B] (one level per
sample,
as in training). ``NetDenoiser`` wraps a raw network: x stays in the schedule's native space, the
network runs in its own dtype and sees ``schedule.model_time(t)``, and the output is converted to a
Pred in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from .pred import KINDS, Pred
from .schedule import Schedule


@dataclass(frozen=True)
class EDMPrecondition:
    """EDM's network scalings (Karras et al. 2022, eq. 7; diffusers' EDM schedulers) on a VP-form
    state
    x = a x0 + s eps with VE level ve = s / a: the network sees c_in x / a, c_in = 1 / sqrt(ve^2 +
    sd^2), and its raw F gives x0 = c_skip x / a + c_out F with c_skip = sd^2 / (ve^2 + sd^2) and
    c_out = sign ve sd / sqrt(ve^2 + sd^2) (sign +1 where diffusers calls the output epsilon, -1
    for v)."""

    sigma_data: float = 0.5
    sign: float = 1.0

    def scale_in(self, a, s) -> float:
        ve = s / a
        return 1.0 / (a * (ve * ve + self.sigma_data**2) ** 0.5)

    def pred(self, out: torch.Tensor, x: torch.Tensor, a, s) -> Pred:
        ve, sd2 = s / a, self.sigma_data**2
        c_skip, c_out = (
            sd2 / (ve * ve + sd2),
            self.sign * ve * self.sigma_data / (ve * ve + sd2) ** 0.5,
        )
        return Pred.from_x0(x, c_skip * x.float() / a + c_out * out.float(), a, s)


class Denoiser(Protocol):
    schedule: Schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> Pred: ...


def levels(schedule: Schedule, t: torch.Tensor, like: torch.Tensor):
    """(a, s) at t as float64 scalars/[B] tensors, ready to broadcast against like."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.ndim not in (0, 1) or (t.ndim == 1 and t.numel() != like.shape[0]):
        raise ValueError(
            f"t must be a scalar or have one entry per sample ({like.shape[0]}), "
            f"got shape {tuple(t.shape)}"
        )
    return schedule.alpha(t), schedule.sigma(t)


@dataclass(frozen=True, eq=False)
class NetDenoiser:
    """A network ``forward(x_in, model_time, cond) -> output`` of prediction ``kind``.

    ``dtype`` is the network's input dtype (default: that of x). ``learned_sigma`` keeps only the
    first
    half of the output channels (DiT, iDDPM). ``module`` is the network as an ``nn.Module`` where
    there is one, for branch perturbations that hook into it (TSG's time-embedding noise).
    ``time_fn`` (t -> the network's time, a float for a scalar t) replaces ``schedule.model_time``
    for
    what the network sees while the levels stay exact: diffusers' multistep schedulers show integer
    times beside exact Karras, exponential or beta sigmas. ``precondition`` (an ``EDMPrecondition``)
    scales the network's input and turns its output into the prediction instead of ``kind``.
    ``time_input`` ((alpha, sigma) -> the network's time, e.g. ``TrigFlowTime``) replaces both for a
    network trained on a time of its own.
    """

    forward: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
    schedule: Schedule
    kind: str = "eps"
    dtype: torch.dtype | None = None
    learned_sigma: bool = False
    module: Any = None
    time_fn: Any = None
    precondition: Any = None
    time_input: Any = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"unknown prediction kind {self.kind!r}; choose one of: {', '.join(KINDS)}"
            )

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> Pred:
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim == 0:  # one level for the batch: memoised floats
            a, s, _, tm = self.schedule.at(t)
            if self.time_input is not None:
                tm = float(self.time_input(a, s))
            elif self.time_fn is not None:
                tm = float(self.time_fn(t))
            tm = torch.full((x.shape[0],), tm, dtype=torch.float32, device=x.device)
        else:
            a, s = levels(self.schedule, t, x)
            if self.time_input is not None:
                tm = self.time_input(a, s)
            else:
                tm = self.timestep(t)
            tm = torch.as_tensor(tm).to(device=x.device, dtype=torch.float32)
        pre = self.precondition
        x_in = x if pre is None else x * _per_sample(pre.scale_in(a, s), x)
        out = self.forward(x_in.to(self.dtype or x.dtype), tm, cond)
        if self.learned_sigma:
            out = out[:, : out.shape[1] // 2]
        if pre is not None:
            return pre.pred(out, x, _per_sample(a, x), _per_sample(s, x))
        return Pred.from_output(self.kind, out, x, a, s)

    def timestep(self, t):
        """The scheduler's timestep at t: ``time_fn``'s where given, else the schedule's model time
        (what the network sees, unless ``time_input`` gives it a time of its own)."""
        return self.schedule.model_time(t) if self.time_fn is None else self.time_fn(t)


def _per_sample(c, like: torch.Tensor):
    """A float, or a [B] tensor shaped to broadcast against like (in like's dtype)."""
    if isinstance(c, torch.Tensor):
        return c.to(like.device, torch.float32 if like.dtype != torch.float64 else like.dtype).view(
            -1, *([1] * (like.ndim - 1))
        )
    return c


@dataclass(frozen=True)
class TrigFlowTime:
    """The dense time SANA-Sprint feeds its student, sin t / (sin t + cos t) of TrigFlow's t
    (arXiv 2503.09641, Sec. 3.2), from a level (alpha, sigma): sigma_d tan t = sigma / alpha gives
    sigma / (sigma + sigma_d alpha), in [0, 1]."""

    sigma_d: float = 0.5

    def __call__(self, a, s):
        return s / (s + self.sigma_d * a)


@dataclass(frozen=True, eq=False)
class Boundary:
    """A consistency model's boundary condition (Song et al. 2023, eq. 7, with LCM's discrete form):
    x0 <- c_skip(t) x + c_out(t) x0, c_skip = sd^2 / ((k t)^2 + sd^2), c_out = k t / sqrt((k t)^2 +
    sd^2) with t the network's time, k = ``timestep_scaling`` and sd = ``sigma_data`` (diffusers'
    LCMScheduler)."""

    inner: Any
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0

    @property
    def schedule(self) -> Schedule:
        return self.inner.schedule

    @property
    def module(self):
        return getattr(self.inner, "module", None)

    def scalings(self, t: torch.Tensor):
        """(c_skip, c_out) at t (float64, scalar or [B])."""
        st = (
            torch.as_tensor(
                self.schedule.model_time(torch.as_tensor(t, dtype=torch.float64)),
                dtype=torch.float64,
            )
            * self.timestep_scaling
        )
        sd2 = self.sigma_data**2
        return sd2 / (st * st + sd2), st / torch.sqrt(st * st + sd2)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> Pred:
        t = torch.as_tensor(t, dtype=torch.float64)
        p = self.inner(x, t, cond)
        c_skip, c_out = self.scalings(t)
        a, s = levels(self.schedule, t, x)
        if t.ndim == 0:
            c_skip, c_out = float(c_skip), float(c_out)
        else:
            c_skip = c_skip.to(x.device, p.x0.dtype).view(-1, *([1] * (x.ndim - 1)))
            c_out = c_out.to(x.device, p.x0.dtype).view(-1, *([1] * (x.ndim - 1)))
        return Pred.from_x0(x, c_skip * x + c_out * p.x0, a, s)


def with_boundary(denoiser, timestep_scaling: float | None):
    """``denoiser`` under LCM's boundary condition with that constant; None: the denoiser itself (a
    flow or TrigFlow student, whose own x0 is x at the data end already)."""
    return (
        denoiser
        if timestep_scaling is None
        else Boundary(denoiser, timestep_scaling=timestep_scaling)
    )

"""Denoisers: callables ``(x, t, cond) -> Pred`` with a ``.schedule``.

``t`` is a 0-dim tensor (one level for the batch, as in sampling) or shape [B] (one level per sample,
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


class Denoiser(Protocol):
    schedule: Schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> Pred: ...


def levels(schedule: Schedule, t: torch.Tensor, like: torch.Tensor):
    """(a, s) at t as float64 scalars/[B] tensors, ready to broadcast against like."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.ndim not in (0, 1) or (t.ndim == 1 and t.numel() != like.shape[0]):
        raise ValueError(f"t must be a scalar or have one entry per sample ({like.shape[0]}), "
                         f"got shape {tuple(t.shape)}")
    return schedule.alpha(t), schedule.sigma(t)


@dataclass(frozen=True, eq=False)
class NetDenoiser:
    """A network ``forward(x_in, model_time, cond) -> output`` of prediction ``kind``.

    ``dtype`` is the network's input dtype (default: that of x). ``learned_sigma`` keeps only the first
    half of the output channels (DiT, iDDPM). ``module`` is the network as an ``nn.Module`` where
    there is one, for branch perturbations that hook into it (TSG's time-embedding noise).
    ``time_fn`` (t -> the network's time, a float for a scalar t) replaces ``schedule.model_time`` for
    what the network sees while the levels stay exact: diffusers' multistep schedulers show integer
    times beside exact Karras, exponential or beta sigmas.
    """

    forward: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
    schedule: Schedule
    kind: str = "eps"
    dtype: torch.dtype | None = None
    learned_sigma: bool = False
    module: Any = None
    time_fn: Any = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown prediction kind {self.kind!r}; choose one of: {', '.join(KINDS)}")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> Pred:
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim == 0:  # one level for the batch: memoised floats
            a, s, _, tm = self.schedule.at(t)
            if self.time_fn is not None:
                tm = float(self.time_fn(t))
            tm = torch.full((x.shape[0],), tm, dtype=torch.float32, device=x.device)
        else:
            a, s = levels(self.schedule, t, x)
            tm = (self.schedule.model_time(t) if self.time_fn is None else self.time_fn(t))
            tm = torch.as_tensor(tm).to(device=x.device, dtype=torch.float32)
        out = self.forward(x.to(self.dtype or x.dtype), tm, cond)
        if self.learned_sigma:
            out = out[:, : out.shape[1] // 2]
        return Pred.from_output(self.kind, out, x, a, s)


@dataclass(frozen=True, eq=False)
class Boundary:
    """A consistency model's boundary condition (Song et al. 2023, eq. 7, with LCM's discrete form):
    x0 <- c_skip(t) x + c_out(t) x0, c_skip = sd^2 / ((k t)^2 + sd^2), c_out = k t / sqrt((k t)^2 + sd^2)
    with t the network's time, k = ``timestep_scaling`` and sd = ``sigma_data`` (diffusers' LCMScheduler)."""

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
        st = torch.as_tensor(self.schedule.model_time(torch.as_tensor(t, dtype=torch.float64)),
                             dtype=torch.float64) * self.timestep_scaling
        sd2 = self.sigma_data ** 2
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
    """``denoiser`` under LCM's boundary condition with that constant; None: the denoiser itself (a flow
    or TrigFlow student, whose own x0 is x at the data end already)."""
    return denoiser if timestep_scaling is None else Boundary(denoiser, timestep_scaling=timestep_scaling)

"""First-order samplers: DDIM (with eta), Euler (with churn), Euler ancestral.

With a Pred all three are the same data-anchor-plus-renoise update x' = a' x0 + s' eps (+ noise):
Euler in VE coordinates, x~' = x~ + (ve' - ve)(x~ - x0)/ve, is exactly DDIM's eta = 0 step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.registry import register
from ..core.sample import Ancestral, Churn, Sampler, ancestral
from ..core.schedule import VPSchedule


@register("sampler", "ddim")
@dataclass(frozen=True)
class DDIM(Ancestral):
    """DDIM (Song et al. 2021, eq. 12): x' = a' x0 + a' ve_down eps + a' ve_up z; eta = 1 is
    DDPM."""

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        st = st.landing()  # diffusers' DDIM lands at t - T // n on linspace and trailing grids
        down, up = ancestral(st, self.eta)
        x = st.a_next * p.x0 + (st.a_next * down) * p.eps
        if up > 0:
            x = x + (st.a_next * up * self.s_noise) * noise(x, st.t, st.t_next)
        return x, state


@register("sampler", "euler_ancestral")
@dataclass(frozen=True)
class EulerAncestral(DDIM):
    """Euler ancestral (k-diffusion's sample_euler_ancestral); eta = 1 is DDPM's ancestral step."""

    eta: float = 1.0


@register("sampler", "euler")
@dataclass(frozen=True)
class Euler(Churn):
    """Euler (Karras et al. 2022, Alg. 2 without the correction), with optional churn."""

    def step(self, denoise, x, st, state, noise):
        x, st = self.churned(x, st, noise)
        p = denoise(x, st.t)
        return st.a_next * p.x0 + st.s_next * p.eps, state


@register("sampler", "tcd")
@dataclass(frozen=True)
class TCD(Sampler):
    """TCD's strategic stochastic sampling (Zheng et al. 2024, arXiv 2402.19159, eq. 10; diffusers'
    TCDScheduler): the prediction is put at the earlier level s = floor((1 - gamma) t') by DDIM,
    then
    noised forward from s to t' with fresh noise. gamma = 0 is DDIM; diffusers calls gamma eta."""

    gamma: float = 0.3

    def __post_init__(self):
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma!r}")

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        tn = float(st.t_next)
        # training indices on a discrete table (floor, as diffusers), a continuous time otherwise
        ts = (
            math.floor((1 - self.gamma) * tn)
            if isinstance(st.schedule, VPSchedule)
            else (1 - self.gamma) * tn
        )
        s = st.to(t_next=torch.tensor(max(ts, st.schedule.t_min), dtype=torch.float64))
        k = st.a_next / s.a_next  # the forward transition from s to t': x' = k x_s + std z
        x = st.a_next * p.x0 + (k * s.s_next) * p.eps
        std = math.sqrt(max(st.s_next**2 - (k * s.s_next) ** 2, 0.0))
        if std > 0:
            x = x + std * noise(x, st.t, st.t_next)
        return x, state

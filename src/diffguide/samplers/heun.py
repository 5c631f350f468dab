"""Heun's second-order sampler (Karras et al. 2022, Alg. 1 and 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.registry import register
from ..core.sample import Churn, Sampler, straight
from ..core.spacing import timesteps


@register("sampler", "heun")
@dataclass(frozen=True)
class Heun(Churn):
    """Heun (trapezoid) on the ODE in straight coordinates y = x/c, where y = (a/c) x0 + (s/c) eps.

    c = a (VE coordinates, EDM) on VP schedules and c = a + s (= 1, flow time, as diffusers'
    FlowMatchHeun) on flow schedules. Both evaluations' x0 form the data anchor and their eps the
    renoise, each averaged. The step to sigma = 0 is plain Euler (one evaluation), and so is a VP
    step from a = 0 (zero terminal SNR), where VE coordinates are infinite.
    """

    def step(self, denoise, x, st, state, noise):
        x, st = self.churned(x, st, noise)
        p = denoise(x, st.t)
        x_euler = st.a_next * p.x0 + st.s_next * p.eps
        c, _, flow = straight(st)
        if st.last or (st.a == 0 and not flow):
            return x_euler, state
        q = denoise(x_euler, st.t_next)
        c_next = straight(st, nxt=True)[0]
        da, ds = st.a_next / c_next - st.a / c, st.s_next / c_next - st.s / c
        y = (st.a / c) * p.x0 + (st.s / c) * p.eps  # y at t, rebuilt from the prediction
        y_next = y + (0.5 * da) * (p.x0 + q.x0) + (0.5 * ds) * (p.eps + q.eps)
        return c_next * y_next, state


_HEUN = Heun()  # Restart's steps: plain Heun, no churn


@register("sampler", "restart")
@dataclass(frozen=True)
class Restart(Sampler):
    """Restart sampling (Xu et al. 2023, arXiv 2306.14878, Alg. 1): Heun steps, and on the step that
    first reaches VE level ``restart_min`` (or the grid's last level above data, if none is that
    low), ``restart_times`` times: forward noise up to ``restart_max``
    (fresh noise, x~ += sqrt(max^2 - min^2) z) and Heun back down over ``restart_steps`` Karras
    levels
    from restart_max to that level (ComfyUI's sample_restart with an explicit restart interval)."""

    restart_min: float = 0.1
    restart_max: float = 2.0
    restart_steps: int = 10
    restart_times: int = 2
    s_noise: float = 1.0

    def __post_init__(self):
        if not 0 < self.restart_min < self.restart_max:
            raise ValueError(
                f"need 0 < restart_min < restart_max, got {self.restart_min!r}, "
                f"{self.restart_max!r}"
            )
        for k in ("restart_steps", "restart_times"):
            v = getattr(self, k)
            if (
                isinstance(v, bool)
                or not isinstance(v, int)
                or v < (2 if k == "restart_steps" else 0)
            ):
                raise ValueError(
                    f"{k} must be an integer >= {2 if k == 'restart_steps' else 0}, got {v!r}"
                )

    def step(self, denoise, x, st, state, noise):
        heun = _HEUN
        x, _ = heun.step(denoise, x, st, (), noise)
        # once: at the first level <= restart_min, or at the last level above data on a grid too
        # coarse to have one (ComfyUI takes the grid level nearest to restart_min)
        reach = st.ve_next <= self.restart_min or st.i == st.n - 2
        if state or not reach or st.ve_next <= 0 or st.ve_next >= self.restart_max:
            return x, state
        lo, hi = st.ve_next, self.restart_max
        times = timesteps(
            st.schedule,
            self.restart_steps - 1,
            "karras",
            final="sigma_min",
            sigma_min=lo,
            sigma_max=hi,
        )
        top = st.to(t=times[0], t_next=times[0])
        for _ in range(self.restart_times):
            z = noise(x, st.t_next, times[0])
            x = (top.a / st.a_next) * x + (top.a * math.sqrt(hi**2 - lo**2) * self.s_noise) * z
            for k in range(len(times) - 1):
                sub = st.to(t=times[k], t_next=times[k + 1])
                x, _ = heun.step(denoise, x, sub, (), noise)
        return x, ("restarted",)

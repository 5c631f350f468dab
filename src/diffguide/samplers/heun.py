"""Heun's second-order sampler (Karras et al. 2022, Alg. 1 and 2)."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.registry import register
from ..core.sample import Churn


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
        flow = getattr(st.schedule, "ode_space", "ve") == "flow"
        if st.last or (st.a == 0 and not flow):
            return x_euler, state
        q = denoise(x_euler, st.t_next)
        c, c_next = (st.a + st.s, st.a_next + st.s_next) if flow else (st.a, st.a_next)
        da, ds = st.a_next / c_next - st.a / c, st.s_next / c_next - st.s / c
        y = (st.a / c) * p.x0 + (st.s / c) * p.eps  # y at t, rebuilt from the prediction
        y_next = y + (0.5 * da) * (p.x0 + q.x0) + (0.5 * ds) * (p.eps + q.eps)
        return c_next * y_next, state

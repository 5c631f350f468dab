"""Pseudo linear multistep samplers: PLMS (Liu et al. 2022, PNDM, arXiv 2202.09778, as diffusers'
PNDMScheduler with skip_prk_steps) and iPNDM (Zhang & Chen 2022, DEIS, arXiv 2204.13902;
k-diffusion's sample_ipndm).

Both combine the last four slopes with the Adams-Bashforth weights (1; 3, -1 / 2; 23, -16, 5 / 12;
55, -59, 37, -9 / 24). PLMS puts the combined eps through DDIM's transfer (PNDM eq. 11) and starts
with
a pseudo improved-Euler step (two evaluations); iPNDM steps the straight-coordinate ODE (VE levels
on VP models, flow time on flow models) and starts with Euler. As DDIM, an update is the current
prediction's a' x0 + s' eps plus the history's correction, so CFG++ works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.registry import register
from ..core.pred import Pred
from ..core.sample import Sampler, straight, straight_point

WEIGHTS = {
    1: (1.0,),
    2: (1.5, -0.5),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def combine(slopes) -> object:
    """Adams-Bashforth combination of slopes (newest first)."""
    w = WEIGHTS[len(slopes)]
    out = w[0] * slopes[0]
    for k, e in zip(w[1:], slopes[1:]):
        out = out + k * e
    return out


def _transfer(st, p, eps):
    """DDIM's step (PNDM's transfer) with ``eps`` in place of the prediction's, written around it:
    a' x0 + s' eps_p + (s' - a' s / a)(eps - eps_p)."""
    x = st.a_next * p.x0 + st.s_next * p.eps
    if st.a == 0:  # from infinite noise no eps but the prediction's is usable
        return x
    return x + (st.s_next - st.a_next * st.s / st.a) * (eps - p.eps)


@register("sampler", "plms")
@dataclass(frozen=True)
class PLMS(Sampler):
    """PLMS (PNDM with skip_prk_steps, diffusers' PNDMScheduler): the first step is a pseudo
    improved
    Euler step (eps averaged over both ends, two evaluations), then fourth-order pseudo linear
    multistep on the eps history."""

    space: str = (
        "eps"  # "v": combine v outputs, as diffusers' PNDMScheduler does for v-prediction models
    )

    def __post_init__(self):
        if self.space not in ("eps", "v"):
            raise ValueError(f"space must be eps or v, got {self.space!r}")

    def _slope(self, p, st):
        return p.eps if self.space == "eps" else p.v(st.a, st.s)

    def _eps(self, slope, p, st, x=None):
        """The eps a combined slope means at this step's start; a v is converted with the current
        sample (a x0 + s eps, or ``x``), as diffusers converts its combined v output (a VP schedule:
        a^2 + s^2 = 1)."""
        if self.space == "eps":
            return slope
        return st.a * slope + st.s * (st.a * p.x0 + st.s * p.eps if x is None else x)

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        e = self._slope(p, st)
        land = st.landing()  # diffusers' PNDM lands at t - T // n on linspace and trailing grids
        if not state:  # start: DDIM to t', evaluate there, step again from x with the mean slope
            if land.last:
                return land.a_next * p.x0, (e,)
            q = denoise(_transfer(land, p, p.eps), st.t_next)
            mean = 0.5 * (e + self._slope(q, st.to(t=st.t_next)))
            rise = st.rising()
            if rise is st:
                return _transfer(st, p, self._eps(mean, p, st)), (e,)
            # with a stride the correction starts from level t' + r, on x itself (PNDM's counter 1)
            at = Pred.from_eps(x, self._eps(mean, p, rise, x), rise.a, rise.s)
            return _transfer(rise, at, at.eps), (e,)
        slopes = (e,) + state[:3]
        return _transfer(land, p, self._eps(combine(slopes), p, st)), slopes


@register("sampler", "ipndm")
@dataclass(frozen=True)
class IPNDM(Sampler):
    """iPNDM (k-diffusion's sample_ipndm, max order 4): y' = y + (u' - u) d with d the
    Adams-Bashforth
    combination of the last slopes dy/du (eps on VP models, eps - x0 on flow models)."""

    order: int = 4

    def __post_init__(self):
        if isinstance(self.order, bool) or self.order not in (1, 2, 3, 4):
            raise ValueError(f"order must be 1, 2, 3 or 4, got {self.order!r}")

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        c, u, flow = straight(st)
        c1, u1, _ = straight(st, nxt=True)
        if not (u < float("inf")):  # from infinite VE (zero terminal SNR): Euler, no slope kept
            return st.a_next * p.x0 + st.s_next * p.eps, ()
        y, d = straight_point(p, u, flow)
        slopes = (d,) + state[: self.order - 1]
        return c1 * (y + (u1 - u) * combine(slopes)), slopes

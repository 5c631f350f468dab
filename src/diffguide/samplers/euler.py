"""First-order samplers: DDIM (with eta), Euler (with churn), Euler ancestral.

With a Pred all three are the same data-anchor-plus-renoise update x' = a' x0 + s' eps (+ noise):
Euler in VE coordinates, x~' = x~ + (ve' - ve)(x~ - x0)/ve, is exactly DDIM's eta = 0 step.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.registry import register
from ..core.sample import Ancestral, Churn, ancestral


@register("sampler", "ddim")
@dataclass(frozen=True)
class DDIM(Ancestral):
    """DDIM (Song et al. 2021, eq. 12): x' = a' x0 + a' ve_down eps + a' ve_up z; eta = 1 is DDPM."""

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
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

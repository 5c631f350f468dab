"""DEIS (Zhang & Chen 2022, arXiv 2204.13902): the exponential integrator with eps interpolated by a
polynomial in log rho (rho the VE level), diffusers' DEISMultistepScheduler ("logrho" multistep,
orders 1-3; order 1 is DDIM).

In VE coordinates y = x / a: y' = y + sum_j c_j eps_j, c_j the integral over [rho, rho'] of the
Lagrange basis in log rho through the last levels (exactly: the integrand is a polynomial in u = log
rho times e^u, integrated by parts). y is rebuilt from the current prediction, so its x0 is the data
anchor and the eps history (CFG++'s unconditional eps) the slope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.registry import register
from ..core.sample import Sampler
from .dpmpp import multistep_order
from .lms import lagrange_basis


def deis_coefficients(rhos: list[float], r0: float, r1: float) -> list[float]:
    """Integrals over rho in [r0, r1] of the Lagrange basis polynomials in log rho on ``rhos``."""
    out = []
    for p in lagrange_basis([math.log(r) for r in rhos]):

        def F(u, p=p):  # an antiderivative of P(u) e^u: e^u sum_k (-1)^k P^(k)(u)
            total, d, sign = 0.0, p, 1.0
            while True:
                total += sign * d(u)
                if d.order == 0:
                    break
                d, sign = d.deriv(), -sign
            return math.exp(u) * total

        out.append(F(math.log(r1)) - F(math.log(r0)))
    return out


@register("sampler", "deis")
@dataclass(frozen=True)
class DEIS(Sampler):
    """DEIS multistep (log-rho polynomial extrapolation of eps), as diffusers'
    DEISMultistepScheduler with its warm-up and lower_order_final rules; order 1 is DDIM."""

    order: int = 2
    lower_order_final: bool = True

    def __post_init__(self):
        if isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {self.order!r}")

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        if not (st.a > 0 and math.isfinite(st.ve)):  # from infinite noise: DDIM, no slope kept
            return st.a_next * p.x0 + st.s_next * p.eps, ()
        order = multistep_order(st, len(state), self.order, self.lower_order_final)
        hist = ((p.eps, st.ve),) + state[: self.order - 1]
        y = p.x0 + st.ve * p.eps
        if order == 1:
            y = p.x0 + st.ve_next * p.eps
        else:
            coeffs = deis_coefficients([v for _, v in hist[:order]], st.ve, st.ve_next)
            for c, (e, _) in zip(coeffs, hist):
                y = y + c * e
        return st.a_next * y, hist

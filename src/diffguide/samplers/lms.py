"""Linear multistep (k-diffusion's sample_lms, diffusers' LMSDiscreteScheduler) and DPM2 (Karras et
al. 2022's second-order sampler as k-diffusion's sample_dpm_2 / sample_dpm_2_ancestral).

LMS works in the straight coordinates of ``core.sample.straight`` (VE levels on VP schedules, flow
time on flows); y is rebuilt from each prediction, so the data anchor is always the current x0 and
CFG++'s unconditional eps enters as the derivative, as in Euler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.registry import register
from ..core.sample import Ancestral, Sampler, ancestral, straight, straight_point


def lagrange_basis(us: list[float]) -> list:
    """The Lagrange basis polynomials (numpy poly1d) on the nodes ``us``: L_j(u_m) = [j == m]."""
    out = []
    for j, uj in enumerate(us):
        p = np.poly1d([1.0])
        for m, um in enumerate(us):
            if m != j:
                p = p * np.poly1d([1.0, -um]) / (uj - um)
        out.append(p)
    return out


def lms_coefficients(us: list[float], u0: float, u1: float) -> list[float]:
    """Integrals over [u0, u1] of the Lagrange basis polynomials on the nodes ``us`` (exact, by
    polynomial antiderivatives: k-diffusion integrates the same polynomials with scipy's quad)."""
    return [float(p.integ()(u1) - p.integ()(u0)) for p in lagrange_basis(us)]


@register("sampler", "lms")
@dataclass(frozen=True)
class LMS(Sampler):
    """Linear multistep of ``order`` (4, as k-diffusion and diffusers): y' = y + sum_j c_j d_j with
    c_j the integral of the Lagrange basis through the last ``order`` levels u_j."""

    order: int = 4

    def __post_init__(self):
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"order must be an integer >= 1, got {self.order!r}")

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        c, u, flow = straight(st)
        c1, u1, _ = straight(st, nxt=True)
        if not math.isfinite(st.ve) or not math.isfinite(
            u
        ):  # from infinite noise: Euler, no history kept
            return st.a_next * p.x0 + st.s_next * p.eps, ()
        y, d = straight_point(p, u, flow)
        hist = ((d, u),) + tuple(state[: self.order - 1])
        coeffs = lms_coefficients([v for _, v in hist], u, u1)
        for k, (dk, _) in zip(coeffs, hist):
            y = y + k * dk
        return c1 * y, hist


@register("sampler", "dpm2")
@dataclass(frozen=True)
class DPM2(Ancestral):
    """DPM2 (k-diffusion's sample_dpm_2): an evaluation at the geometric mean of the VE levels,
    whose
    slope makes the step; Euler onto sigma = 0 and from infinite VE (a flow's t = 1). eta > 0 is
    sample_dpm_2_ancestral (the step goes to
    ve_down, then fresh noise up to ve')."""

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        down, up = ancestral(st, self.eta)
        if (
            down == 0 or st.a == 0 or not math.isfinite(st.ve)
        ):  # Euler onto data, and from infinite noise
            y = p.x0 + down * p.eps
        else:
            ve_mid = math.exp(0.5 * (math.log(st.ve) + math.log(down)))
            mid = st.to(t_next=st.schedule.t_of_ve(torch.tensor(ve_mid, dtype=torch.float64)))
            q = denoise(mid.a_next * (p.x0 + ve_mid * p.eps), mid.t_next)
            y = p.x0 + st.ve * p.eps + (down - st.ve) * q.eps
        if up > 0:
            y = y + (up * self.s_noise) * noise(p.x0, st.t, st.t_next)
        return st.a_next * y, state


@register("sampler", "dpm2_ancestral")
@dataclass(frozen=True)
class DPM2Ancestral(DPM2):
    """DPM2 ancestral (k-diffusion's sample_dpm_2_ancestral)."""

    eta: float = 1.0

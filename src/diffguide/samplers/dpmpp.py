"""DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095): multistep 2M/3M (ODE and SDE), singlestep 2S.

All updates are exponential integrators in lambda written as data anchor plus renoise:
  y' = D + ve' E,  x' = a' y',  D = x0 + (polynomial correction from the x0 history),
  E = e^{-eta h} eps + sqrt(1 - e^{-2 eta h}) z,
with H = (1 + eta) h in the phi functions (k-diffusion's eta form; eta = 1 is diffusers' SDE
variant). The renoise uses the current eps only; the correction uses the x0 history each Pred names
(``Pred.history``: the guided x0, or for CFG++ the unconditional one).
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.registry import register
from ..core.sample import Ancestral, BrownianTree, Sampler, ancestral, data_sde_step

SOLVER_TYPES = ("midpoint", "heun")
WARMUPS = ("lower_order", "singlestep")


def _singlestep(denoise, p, st, r, eta, s_noise, noise):
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1) from the prediction p at st.t, to ve_down +
    noise."""
    down, up = ancestral(st, eta)
    if down == 0 or not math.isfinite(st.lam):  # lands on data, or starts at infinite noise
        y = p.x0 + down * p.eps
    else:
        h = -math.log(down) - st.lam
        mid = st.to_lam(st.lam + r * h)
        q = denoise(mid.a_next * p.x0 + mid.s_next * p.eps, mid.t_next)
        y = p.x0 + down * p.eps + (-math.expm1(-h) / (2 * r)) * (q.x0 - p.x0)
    if up > 0:
        y = y + (up * s_noise) * noise(p.x0, st.t, st.t_next)
    return st.a_next * y


def multistep_order(
    st, history: int, order: int, lower_order_final: bool = True, euler_at_final: bool = False
) -> int:
    """History-limited order; first order onto sigma = 0 and, as diffusers' lower_order_final, on
    the last step (and at most second on the one before) when there are fewer than 15 steps."""
    low = lower_order_final and st.n < 15
    if st.last or (st.i == st.n - 1 and (low or euler_at_final)):
        return 1
    order = min(order, history + 1)
    return min(order, 2) if low and st.i == st.n - 2 else order


@dataclass(frozen=True)
class _Multistep(Sampler):
    solver_type: str = "midpoint"
    eta: float = 0.0
    s_noise: float = 1.0
    lower_order_final: bool = True
    euler_at_final: bool = False
    order: ClassVar[int] = 2
    corrected: ClassVar[bool] = True
    warmup: ClassVar[str] = "lower_order"

    def __post_init__(self):
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"unknown solver_type {self.solver_type!r}; choose one of: "
                f"{', '.join(SOLVER_TYPES)}"
            )
        if self.warmup not in WARMUPS:
            raise ValueError(f"unknown warmup {self.warmup!r}; choose one of: {', '.join(WARMUPS)}")
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")

    def step_order(self, st, history: int) -> int:
        return multistep_order(st, history, self.order, self.lower_order_final, self.euler_at_final)

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        order = self.step_order(st, len(state))
        # a point at lam = -inf (pure noise, flow t = 1) gives no slope information: the multistep
        # correction vanishes as the previous step size goes to infinity, so it is not kept
        keep = ((p.history, st.lam),) + state[: self.order - 2] if math.isfinite(st.lam) else ()
        if (
            order == 1
            and not state
            and self.order >= 3
            and self.warmup == "singlestep"
            and not st.last
            and math.isfinite(st.lam)
        ):
            # a first-order start would cap the global order at 2; a 2S step (local error h^3) won't
            return _singlestep(denoise, p, st, 0.5, 0.0, 1.0, noise), keep
        H = (1 + self.eta) * st.h
        D = p.x0
        if order >= 2:
            x0_1, lam_1 = state[0]
            r0 = (st.lam - lam_1) / st.h
            d1_0 = (p.x0 - x0_1) / r0
            phi1 = -math.expm1(-H)
            phi2 = 1 - phi1 / H
            if order == 2:
                D = D + (0.5 * phi1 if self.solver_type == "midpoint" else phi2) * d1_0
            else:
                x0_2, lam_2 = state[1]
                r1 = (lam_1 - lam_2) / st.h
                d1_1 = (x0_1 - x0_2) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)  # = h^2 D''/2 from the Newton interpolant
                phi3 = phi2 / H - 0.5
                D = D + phi2 * d1 - ((2.0 if self.corrected else 1.0) * phi3) * d2
        if st.s_next == 0:
            return st.a_next * D, keep
        z = noise(x, st.t, st.t_next) if self.eta > 0 else None  # drawn even when s_noise is 0
        return data_sde_step(st, D, p.eps, self.eta, self.s_noise, z), keep


@register("sampler", "dpmpp_2m")
@dataclass(frozen=True)
class DPMpp2M(_Multistep):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2); solver_type heun is the official 'taylor' form."""


@register("sampler", "dpmpp_2m_sde")
@dataclass(frozen=True)
class DPMpp2MSDE(_Multistep):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, Sec. 5 and App. B); eta scales the injected noise."""

    eta: float = 1.0


@register("sampler", "dpmpp_3m")
@dataclass(frozen=True)
class DPMpp3M(_Multistep):
    """DPM-Solver++(3M) with the full second-derivative term: the published update (official repo,
    diffusers, k-diffusion) takes d2 = h^2 D''/2 as if it were h^2 D'' and converges at order 2
    only. The first step is a 2S step so that the global order stays 3 (one extra evaluation)."""

    order: ClassVar[int] = 3
    warmup: str = "singlestep"


@register("sampler", "dpmpp_3m_published")
@dataclass(frozen=True)
class DPMpp3MPublished(_Multistep):
    """DPM-Solver++(3M) exactly as published and shipped by diffusers and k-diffusion (order ~2)."""

    order: ClassVar[int] = 3
    corrected: ClassVar[bool] = False


@register("sampler", "dpmpp_3m_sde")
@dataclass(frozen=True)
class DPMpp3MSDE(DPMpp3M):
    """SDE-DPM-Solver++(3M) (k-diffusion's dpmpp_3m_sde with the corrected second-derivative
    term)."""

    eta: float = 1.0
    warmup: str = "lower_order"


@register("sampler", "dpmpp_2s")
@dataclass(frozen=True)
class DPMpp2S(Ancestral):
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1) at lambda + r h; two evaluations per step. With
    eta > 0 it is k-diffusion's dpmpp_2s_ancestral."""

    r: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.r <= 1:
            raise ValueError(f"r must be in (0, 1], got {self.r!r}")

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        return _singlestep(denoise, p, st, self.r, self.eta, self.s_noise, noise), state


@register("sampler", "dpmpp_2s_ancestral")
@dataclass(frozen=True)
class DPMpp2SAncestral(DPMpp2S):
    """DPM++(2S) ancestral (k-diffusion's sample_dpmpp_2s_ancestral)."""

    eta: float = 1.0


@register("sampler", "dpmpp_sde")
@dataclass(frozen=True)
class DPMppSDE(Ancestral):
    """DPM++ SDE (k-diffusion's sample_dpmpp_sde): a 2S step at lambda + r h with ancestral noise
    on both
    substeps, the noise read from a Brownian tree over the schedule's VE range, so an image's noise
    is
    fixed by its seed whatever the step count. The tree's per-image seeds come from one draw of the
    run's noise (an image's own stream with seed= or per-image generators)."""

    eta: float = 1.0
    r: float = 0.5
    capturable = False  # the Brownian tree is built on the host

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.r <= 1:
            raise ValueError(f"r must be in (0, 1], got {self.r!r}")

    def init_state(self):
        return None

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        if st.last or not math.isfinite(st.lam):  # onto data, or from infinite noise: first order
            down, up = ancestral(st, self.eta) if not st.last else (0.0, 0.0)
            y = p.x0 + down * p.eps
            if up > 0:
                y = y + (up * self.s_noise) * noise(p.x0, st.t, st.t_next)
            return st.a_next * y, state
        tree = state
        if tree is None:
            z = (
                noise(x, st.t, st.t_next).flatten(1)[:, 0].double()
            )  # one draw per image fixes its tree
            seeds = [int.from_bytes(struct.pack("<d", float(v)), "little") for v in z]
            sc = st.schedule
            # the schedule's whole VE range, so the path does not depend on the grid; a zero-
            # terminal-SNR table has no finite top, and there the run's first finite level is the
            # top instead
            hi = float(sc.sigma_max) if math.isfinite(float(sc.sigma_max)) else st.ve
            tree = BrownianTree(
                seeds, min(float(sc.sigma_min), st.ve_next or st.ve), hi, tuple(x.shape[1:])
            )
        w = tree(st.ve)  # W at this level, shared by both substeps' increments
        ve_s = math.exp(-(st.lam + self.r * st.h))
        mid = st.to(t_next=st.schedule.t_of_ve(torch.tensor(ve_s, dtype=torch.float64)))
        down, up = ancestral(mid, self.eta)
        y2 = p.x0 + down * p.eps
        if up > 0:
            y2 = y2 + (up * self.s_noise) * tree.increment(st.ve, ve_s, w).to(x)
        q = denoise(mid.a_next * y2, mid.t_next)
        down, up = ancestral(st, self.eta)
        fac = 1 / (2 * self.r)
        shift = fac * (q.history - p.history)  # D - x0: the 2S correction from the x0 history
        y = p.x0 + down * p.eps + (1 - down / st.ve) * shift
        if up > 0:
            y = y + (up * self.s_noise) * tree.increment(st.ve, st.ve_next, w).to(x)
        return st.a_next * y, tree


@functools.lru_cache(maxsize=64)
def singlestep_orders(
    steps: int, lower_order_final: bool = True, final_zero: bool = True
) -> tuple[int, ...]:
    """DPMSolverSinglestepScheduler's order list for solver_order 2: pairs (1, 2) of grid steps, the
    last steps first order (its get_order_list). Made once per step count, not at every step."""
    if lower_order_final:
        orders = (
            [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
        )
    else:
        orders = [1, 2] * (steps // 2) + ([1] if steps % 2 else [])
    if final_zero:
        orders[-1] = 1
    return tuple(orders)


@register("sampler", "dpmpp_2s_singlestep")
@dataclass(frozen=True)
class DPMpp2SSinglestep(Sampler):
    """DPM-Solver++(2S) laid on the grid as diffusers' DPMSolverSinglestepScheduler does
    (solver_order 2,
    midpoint): grid steps in pairs, a first-order step to the pair's middle point, then one 2S
    update
    from the pair's start with the middle point's x0 (Lu et al. 2022, Alg. 1 with r = h0 / h)."""

    lower_order_final: bool = True

    def init_state(self):
        return None

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        order = singlestep_orders(st.n, self.lower_order_final, True)[st.i]
        if order == 1 or state is None or not math.isfinite(state[3]):
            # the pair's start: remember its prediction; a DDIM step to the middle point
            return st.a_next * p.x0 + st.s_next * p.eps, (p.x0, p.history, p.eps, st.lam)
        x0_s, hist_s, eps_s, lam_s = state
        h, h0 = st.lam_next - lam_s, st.lam - lam_s
        d1 = (p.history - hist_s) / (h0 / h)
        return st.a_next * (x0_s + 0.5 * (-math.expm1(-h)) * d1) + st.s_next * eps_s, None

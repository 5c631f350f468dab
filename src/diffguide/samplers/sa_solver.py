"""SA-Solver (Xue et al. 2023, arXiv 2309.05019): ComfyUI's sample_sa_solver(_pece)
(comfy/k_diffusion/sampling.py and sa_solver.py), the stochastic Adams predictor-corrector in data
prediction with tau(sigma) = eta inside ComfyUI's default SDE window (20% to 80% of the model's
timesteps) and 0 outside.

ComfyUI's predictor is x' = (s'/s) e^{-tau^2 h} x_c + a' sum_j b_j x0_j (+ noise), the b_j the
exponentially weighted integrals of the Lagrange basis over the last points in lambda; the corrector
redoes the previous step with the new point's x0 included (same tau, same noise), which moves the
sample by a (sum_j b^c_j x0_j - sum_j b^p_j x0_j). Written on the Pred contract, as UniPC here: the
base of the predictor is a' x0 + s' e^{-tau^2 h} eps from the current prediction (equal to
(s'/s) e^{-tau^2 h} x + a' (1 - e^{-(1 + tau^2) h}) x0 for x = a x0 + s eps, and the b_j sum to
1 - e^{-(1 + tau^2) h}), the Adams terms are differences of the x0 history (``Pred.history``), and
the corrector's move is carried from the evaluation point as an explicit offset. With PECE the
corrected sample is evaluated again and that prediction replaces the point's.

As in ComfyUI, the orders fall towards the end of a grid that ends at the data (assumed: a Step does
not see the grid's end), and from a first point at lambda = -inf (a flow's t = 1) the first
evaluation and lambda are those of 0.01% of the way in (offset_first_sigma_for_snr).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.registry import register
from ..core.sample import Sampler, sde_factors
from ..core.schedule import F64, EDMSchedule, FlowSchedule, VPSchedule
from ..core.spacing import _table_levels


def _percent_t(schedule, p: float) -> float:
    """The time ``p`` of the way from pure noise to data, as ComfyUI's percent_to_sigma counts it
    (1 - p of the model's timesteps; a flow's unshifted time)."""
    if isinstance(schedule, FlowSchedule):
        return 1.0 - p
    if isinstance(schedule, VPSchedule):
        return (1.0 - p) * schedule.t_max
    if isinstance(schedule, EDMSchedule):
        lo, hi = math.log(schedule.sigma_lo), math.log(schedule.sigma_hi)
        return math.exp(lo + (1.0 - p) * (hi - lo))
    return schedule.t_min + (1.0 - p) * (schedule.t_max - schedule.t_min)


@functools.lru_cache(maxsize=256)  # SA-Solver asks for the same two levels at every step
def percent_ve(schedule, p: float) -> float:
    """ComfyUI's percent_to_sigma as a VE level (a VP table interpolated log-linearly, as its
    ModelSamplingDiscrete.sigma does); inf at p <= 0 and 0 at p >= 1, as there."""
    if p <= 0:
        return math.inf
    if p >= 1:
        return 0.0
    t = _percent_t(schedule, p)
    if isinstance(schedule, VPSchedule):
        return float(_table_levels(schedule, torch.tensor(t, dtype=F64)))
    return schedule.at(t)[2]


def sa_weights(lams, lam_s: float, lam_t: float, tau: float, simple: bool, corrector: bool):
    """SA-Solver's b_i / alpha_t for the points lams (oldest first) over the step lam_s -> lam_t
    (ComfyUI's compute_stochastic_adams_b_coeffs, eqs. 15 and 18; ``simple``: its order-2 scheme
    of Appendix D). Computed in lambda - lam_t, where the Vandermonde system is well conditioned."""
    m, h = 1.0 + tau * tau, lam_t - lam_s
    k = len(lams)
    if simple and k == 2:
        total = -math.expm1(-m * h)
        if corrector:
            b1 = 0.5 * m * h
        else:
            b1 = total - 0.5 * m * h * h / (lams[0] - lam_s)
        return [total - b1, b1]
    e = math.exp(-m * h)
    moments = []  # m int_s^t e^{m (x - t)} (x - t)^p dx, by parts
    for p in range(k):
        top = 1.0 if p == 0 else 0.0
        moments.append(top - (-h) ** p * e - (p / m * moments[-1] if p else 0.0))
    u = np.asarray(lams, dtype=np.float64) - lam_t
    vt = np.vander(u, k, increasing=True).T
    return [float(v) for v in np.linalg.solve(vt, np.asarray(moments))]


def _check_order(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 6:
        raise ValueError(f"{name} must be an integer in [{lo}, 6], got {v!r}")


@register("sampler", "sa_solver")
@dataclass(frozen=True)
class SASolver(Sampler):
    """SA-Solver (Xue et al. 2023, arXiv 2309.05019; ComfyUI's sample_sa_solver)."""

    eta: float = 1.0
    sde_start_percent: float = 0.2
    sde_end_percent: float = 0.8
    s_noise: float = 1.0
    predictor_order: int = 3
    corrector_order: int = 4
    use_pece: bool = False
    simple_order_2: bool = False

    def __post_init__(self):
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")
        for name in ("sde_start_percent", "sde_end_percent"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        _check_order("predictor_order", self.predictor_order, 1)
        _check_order("corrector_order", self.corrector_order, 0)

    def init_state(self):
        return None  # after a step: (((x0 history, lam), ...) oldest first, predictor's carry)

    def tau(self, schedule, ve: float) -> float:
        """ComfyUI's get_tau_interval_func: eta where the level lies in the SDE window, else 0."""
        if self.eta <= 0:
            return 0.0
        hi = percent_ve(schedule, self.sde_start_percent)
        lo = percent_ve(schedule, self.sde_end_percent)
        return self.eta if hi >= ve >= lo else 0.0

    def step(self, denoise, x, st, state, noise):
        hist, carry = state if state is not None else ((), None)
        if not math.isfinite(st.lam):  # offset_first_sigma_for_snr
            t0 = torch.tensor(_percent_t(st.schedule, 1e-4), dtype=F64)
            st = st.to(t=t0)
        keep = max(self.predictor_order, self.corrector_order) + 1
        p = denoise(x, st.t)
        hist = (hist + ((p.history, st.lam),))[-keep:]
        n_pts = min(len(hist), keep - 1)
        c_order = 0 if carry is None or (st.last and not self.use_pece) else self.corrector_order
        c_order = min(c_order, n_pts, st.n - st.i)
        p_order = max(min(self.predictor_order, n_pts, st.n - 1 - st.i), 1)
        offset = None
        if c_order > 0:  # the previous step again, with this point's x0: a move of the sample
            w_p, tau, lam_s = carry
            lams = [lam for _, lam in hist[-c_order:]]
            w_c = sa_weights(lams, lam_s, st.lam, tau, self.simple_order_2, corrector=True)
            cur = hist[-1][0]
            # the Adams terms as differences from the newest point, whose own term is 0 (left out)
            diff = sum(w * (h - cur) for w, (h, _) in zip(w_c, hist[-c_order:-1]))
            diff = diff - sum(w * (h - cur) for w, (h, _) in zip(w_p, hist[-len(w_p) - 1 : -1]))
            offset = st.a * diff
            if self.use_pece:  # evaluate the corrected sample; its prediction replaces the point's
                p = denoise(x + offset, st.t)
                hist, offset = hist[:-1] + ((p.history, st.lam),), None
        if st.last:
            return st.a_next * p.x0, (hist, None)
        tau, h = self.tau(st.schedule, st.ve_next), st.h
        lams = [lam for _, lam in hist[-p_order:]]
        w_p = sa_weights(lams, st.lam, st.lam_next, tau, self.simple_order_2, corrector=False)
        cur = hist[-1][0]
        damp, fresh = sde_factors(h, tau * tau)  # DPM-Solver++'s SDE step with eta = tau^2
        out = st.a_next * p.x0 + (st.s_next * damp) * p.eps
        if p_order > 1:  # (the newest point's term, w (cur - cur), left out)
            out = out + st.a_next * sum(w * (g - cur) for w, (g, _) in zip(w_p, hist[-p_order:-1]))
        if offset is not None:
            out = out + (st.s_next / st.s * damp) * offset
        if tau > 0 and self.s_noise > 0:
            out = out + (st.s_next * fresh * self.s_noise) * noise(x, st.t, st.t_next)
        return out, (hist, (w_p, tau, st.lam))


@register("sampler", "sa_solver_pece")
@dataclass(frozen=True)
class SASolverPECE(SASolver):
    """SA-Solver in PECE mode (Xue et al. 2023, arXiv 2309.05019; ComfyUI's
    sample_sa_solver_pece)."""

    use_pece: bool = True

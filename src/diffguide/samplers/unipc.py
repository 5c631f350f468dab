"""UniPC (Zhao et al. 2023, arXiv 2302.04867): the unified predictor (UniP) and corrector (UniC) in
the data-prediction form of diffusers' UniPCMultistepScheduler (bh1 / bh2, orders 1-3).

The corrector re-uses the evaluation at the new point (no extra NFE): it moves the sample there
before the next predictor step. Written on the Pred contract: the base of every update is the DDIM
step a' x0 + s' eps from the current prediction, the predictor and corrector terms are differences
of the x0 history (``Pred.history``: for CFG++ the unconditional x0), and the corrector's move is
carried to the next step as an explicit offset rather than re-derived from x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.registry import register
from ..core.sample import Sampler

SOLVER_TYPES = ("bh1", "bh2")


def unipc_weights(
    h: float, rks: list[float], variant: str, corrector: bool
) -> tuple[list[float], float]:
    """(rho, B(h)) of UniP / UniC (Alg. 1-2; diffusers' multistep_uni_p/c_bh_update) for step h in
    lambda and the relative positions rks of the history points (the last rk, 1, is the new
    point)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    B = hh if variant == "bh1" else h_phi_1
    order = len(rks)
    R = np.array([[rk ** (i - 1) for rk in rks] for i in range(1, order + 1)])
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / B)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    b = np.array(b)
    if corrector:
        rho = [0.5] if order == 1 else list(np.linalg.solve(R, b))
    else:
        rho = (
            []
            if order == 1
            else [0.5]
            if order == 2
            else list(np.linalg.solve(R[:-1, :-1], b[:-1]))
        )
    return [float(r) for r in rho], B


@register("sampler", "unipc")
@dataclass(frozen=True)
class UniPC(Sampler):
    """UniPC with data prediction (diffusers' defaults: order 2, bh2, the corrector on every step
    but
    the first, lower order on the final steps); ``disable_corrector``: step indices to skip it on,
    e.g. "0|1" (diffusers' disable_corrector)."""

    order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: str = ""

    def __post_init__(self):
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"unknown solver_type {self.solver_type!r}; choose one of: "
                f"{', '.join(SOLVER_TYPES)}"
            )
        if isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {self.order!r}")
        try:  # parsed once, not at every step
            skipped = frozenset(int(v) for v in str(self.disable_corrector).split("|") if v.strip())
        except ValueError:
            raise ValueError(
                f"disable_corrector must be step indices separated by '|', got "
                f"{self.disable_corrector!r}"
            ) from None
        object.__setattr__(self, "_skipped", skipped)

    def init_state(self):
        return ((), None)

    def step(self, denoise, x, st, state, noise):
        hist, carry = state  # hist: ((x0, lam), ...) of earlier points, newest first
        p = denoise(x, st.t)
        cur, lam = p.history, st.lam
        offset = 0.0
        if carry is not None and (st.i - 1) not in self._skipped and math.isfinite(lam):
            pred_res, order_c = carry  # UniC: the previous step again, with this point's x0 known
            x0_s, lam_s = hist[0]
            h = lam - lam_s
            rks = [(hist[k][1] - lam_s) / h for k in range(1, order_c)] + [1.0]
            rho, B = unipc_weights(h, rks, self.solver_type, corrector=True)
            corr = sum(
                r * (hist[k][0] - x0_s) / rks[k - 1] for k, r in zip(range(1, order_c), rho[:-1])
            )
            offset = (st.a * B) * (pred_res - corr - rho[-1] * (cur - x0_s))
        order = min(self.order, st.n - st.i) if self.lower_order_final else self.order
        order = 1 if st.last else min(order, len(hist) + 1) if math.isfinite(lam) else 1
        keep = (((cur, lam),) + hist[: self.order - 1]) if math.isfinite(lam) else ()
        x_next = st.a_next * p.x0 + st.s_next * p.eps
        if st.s > 0 and not isinstance(offset, float):
            x_next = x_next + (st.s_next / st.s) * offset
        pred_res = 0.0
        if order > 1:  # UniP's higher-order terms from the x0 history
            h = st.h
            rks = [(hist[k - 1][1] - lam) / h for k in range(1, order)] + [1.0]
            rho, B = unipc_weights(h, rks, self.solver_type, corrector=False)
            pred_res = sum(
                r * (hist[k - 1][0] - cur) / rks[k - 1] for k, r in zip(range(1, order), rho)
            )
            x_next = x_next - (st.a_next * B) * pred_res
        return x_next, (keep, (pred_res, order) if keep else None)

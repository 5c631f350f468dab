"""DPM-Solver (Lu et al. 2022, arXiv 2206.00927) as k-diffusion's and ComfyUI's sample_dpm_fast
and sample_dpm_adaptive: singlestep solvers of orders 1-3 on levels they choose themselves.

Levels. Both integrate from the grid's first level to its last nonzero one (ComfyUI's sigma_max =
sigmas[0] and sigma_min = the smallest nonzero sigma) and ignore the levels in between. A Step knows
only its own interval, and the grid's end is known only at its last step, so the first n - 1 steps
hold x at the first level without evaluating the network, and the last step runs the whole solve.
A callback sees x unchanged until then (a change it makes carries over); T-Stitch, which switches
models by step, and step caches, which plan by step, are refused. Guidance that reads the step
(start/stop windows, step counts) sees, at each evaluation, the step of the grid whose interval
holds its level: step i for levels in (the grid's level i + 1, its level i], step 0 at or above
the first. As in k-diffusion there is no
final denoising: on a grid that ends at data the sample keeps the noise of the last nonzero level
(VE 0.03 on SD's Karras grids, but the flow time 0.14 on a 20-step SD3 grid);
``denoise_to_zero=True`` spends one more evaluation there and returns its x0, as every other
diffguide sampler ends such a grid.

Coordinates. The solve runs in the straight coordinates of ``core.sample.straight``, y = x / c at
level u (the VE level on VP schedules, the flow time on flows: ComfyUI's sigma on both), with
lam = -log u and DPM-Solver's noise prediction the slope dy/du (eps on VP, eps - x0 on flows), so it
follows ComfyUI on both kinds of model. Every stage is the current prediction's DDIM step to its
level plus corrections from differences of slopes; nothing is re-derived from x.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from dataclasses import dataclass

import torch

from ..core.registry import register
from ..core.sample import Sampler, straight, straight_point
from ..core.schedule import F64, ode_scale
from .comfy import _split


class _Solve:
    """One solve's network evaluations at straight levels u (x = c y there). ``levels``: the grid's
    straight levels, first to last (n + 1 of them, decreasing), to tell the guided denoiser which of
    the grid's steps each evaluation falls in."""

    def __init__(self, denoise, schedule, levels=()):
        self.denoise, self.schedule = denoise, schedule
        self.flow = getattr(schedule, "ode_space", "ve") == "flow"
        self.levels = tuple(levels)
        self._inner = [-v for v in self.levels[1:-1]]  # ascending: the inner grid levels, negated

    def t(self, u: float):
        ve = (u / (1 - u) if u < 1 else math.inf) if self.flow else u
        return self.schedule.t_of_ve(torch.tensor(ve, dtype=F64))

    def step_of(self, u: float) -> int:
        """The grid step i whose interval holds u: level i >= u > level i + 1 (0 from the first
        level up; the last step below its start)."""
        return bisect.bisect_right(self._inner, -u)

    @contextlib.contextmanager
    def at(self, u: float):
        """Evaluations meanwhile report the grid step of level u to the guided denoiser (its
        ``_step``: what ``begin_step`` sets for the loop's own step), restored after."""
        held = getattr(self.denoise, "_step", None)
        if not self.levels or held is None or held[1] is None:  # no grid, or no step reported
            yield
            return
        self.denoise._step = (self.step_of(u), held[1])
        try:
            yield
        finally:
            self.denoise._step = held

    def __call__(self, y, u: float):
        t = self.t(u)
        a, s, _, _ = self.schedule.at(t)
        with self.at(u):
            return self.denoise(ode_scale(self.schedule, a, s) * y, t)

    def dpm(self, p, u: float, u1: float, order: int):
        """DPM-Solver-k from level u to u1 given the prediction p at u (Lu et al. 2022: k = 2 with
        r1 = 1/2, k = 3 with r1 = 1/3, r2 = 2/3): (the order k - 1 result made from the same
        evaluations, the adaptive solver's error estimate; the order-k result)."""
        flow, h = self.flow, math.log(u / u1)
        y1 = straight_point(p, u1, flow)[0]  # DPM-Solver-1: the DDIM step to u1
        if order == 1:
            return None, y1
        d, r1 = straight_point(p, u, flow)[1], (0.5 if order == 2 else 1 / 3)
        um = u * math.exp(-r1 * h)
        dm = straight_point(self(straight_point(p, um, flow)[0], um), um, flow)[1] - d
        y2 = y1 - ((u - u1) / (2 * r1)) * dm  # u1 (e^h - 1) = u - u1
        if order == 2:
            return y1, y2
        r2 = 2 / 3
        ub = u * math.exp(-r2 * h)
        yb = (
            straight_point(p, ub, flow)[0]
            - (ub * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1)) * dm
        )
        db = straight_point(self(yb, ub), ub, flow)[1] - d
        return y2, y1 - (u1 / r2 * (math.expm1(h) / h - 1)) * db

    def ancestral(self, u: float, u1: float, u_end: float, eta: float):
        """k-diffusion's split of the step u -> u1 into a solve to ``down`` (never below the end
        level) and fresh noise of std ``up`` that brings it back to u1."""
        down, up = _split(u, u1, eta)
        if up == 0:
            return u1, 0.0
        down = max(down, u_end)
        return down, math.sqrt(max(u1 * u1 - down * down, 0.0))

    def draw(self, noise, y, u: float, u1: float):
        return noise(y, self.t(u), self.t(u1))


def _solve_range(sampler, denoise, x, st, state):
    """Hold, then solve: (x, state, run), run None while holding (x stays at the first level), else
    (solver, the first prediction, y and level u there, the last nonzero level, evaluations spent).
    From infinite noise (zero-terminal-SNR VP) the first step is the DDIM step to the grid's next
    level, as Heun's, and the solve starts there (the prediction is None if nothing is left). The
    state holds (start, evaluations spent, the straight levels of the steps seen so far)."""
    name = type(sampler).name
    if getattr(denoise, "cache", None) is not None:  # every evaluation falls in the last step
        raise ValueError(
            f"{name} solves on its own levels inside the grid's last step; a step cache "
            "plans by step (run without one)"
        )
    if getattr(denoise, "stitch", None) is not None:
        raise ValueError(f"{name} solves on its own levels in one step; T-Stitch switches by step")
    t0, spent, levels = state if state is not None else (st.t, 0, ())
    levels = (*levels, straight(st)[1])
    if state is None and not math.isfinite(levels[0]):
        p = denoise(x, st.t)
        x, t0, spent = st.a_next * p.x0 + st.s_next * p.eps, st.t_next, 1
        if st.i == st.n - 1:
            return x, (t0, spent, levels), None
    if st.i < st.n - 1:
        return x, (t0, spent, levels), None
    c0, u0, _ = straight(st.to(t=t0))
    u_end = straight(st)[1] if st.last else straight(st, nxt=True)[1]
    if not (u_end < u0 or spent):
        raise ValueError(f"{name} needs a nonzero level below the first: give at least 2 steps")
    solve = _Solve(denoise, st.schedule, (*levels, straight(st, nxt=True)[1]))
    p = None
    if u_end < u0:
        with solve.at(u0):
            p = denoise(x, t0)
    return x, None, (solve, p, x / c0, u0, u_end, spent)


def _land(sampler, solve, y, u_end: float, st):
    """The loop's x from y at the last nonzero level: that y rescaled to the grid's end, as
    k-diffusion returns it, or with ``denoise_to_zero`` on a grid that ends at data, the x0 of one
    more evaluation there (DPM-Solver's option of that name)."""
    if sampler.denoise_to_zero and st.last:
        return st.a_next * solve(y, u_end).x0
    return straight(st, nxt=True)[0] * y


class _OwnLevels(Sampler):
    """What dpm_fast and dpm_adaptive share: no state across runs, eta checked."""

    def __post_init__(self):
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")

    def init_state(self):
        return None


@register("sampler", "dpm_fast")
@dataclass(frozen=True)
class DPMFast(_OwnLevels):
    """DPM-Solver-fast (Lu et al. 2022, arXiv 2206.00927; k-diffusion's and ComfyUI's
    sample_dpm_fast, A1111's "DPM fast").

    ``steps`` is the evaluation budget: floor(steps / 3) + 1 steps uniform in lam between the grid's
    first and last nonzero levels, of order 3, then 2 and 1 (steps divisible by 3) or steps mod 3.
    So it is third order for steps = 3k + 2, else second (its last step is of lower order). eta > 0
    adds k-diffusion's ancestral noise after each step (in ComfyUI's coordinates, also on flows).
    """

    eta: float = 0.0
    s_noise: float = 1.0
    denoise_to_zero: bool = False

    def step(self, denoise, x, st, state, noise):
        x, state, run = _solve_range(self, denoise, x, st, state)
        if run is None:
            return x, state
        solve, p, y, u0, u_end, spent = run
        nfe = st.n - spent
        m = nfe // 3 + 1
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        lam0, lam_end = -math.log(u0), -math.log(u_end)
        us = [u0] + [math.exp(-(lam0 + (lam_end - lam0) * k / m)) for k in range(1, m)] + [u_end]
        for k, order in enumerate(orders if p is not None else ()):
            u, u1 = us[k], us[k + 1]
            down, up = solve.ancestral(u, u1, u_end, self.eta)
            p = p if k == 0 else solve(y, u)
            y = solve.dpm(p, u, down, order)[1]
            if up > 0:
                y = y + (up * self.s_noise) * solve.draw(noise, y, u, u1)
        return _land(self, solve, y, u_end, st), None


@register("sampler", "dpm_adaptive")
@dataclass(frozen=True)
class DPMAdaptive(_OwnLevels):
    """DPM-Solver-12 and -23 with adaptive step size (Lu et al. 2022, arXiv 2206.00927;
    k-diffusion's and ComfyUI's sample_dpm_adaptive, A1111's "DPM adaptive").

    Each try steps by h in lam with DPM-Solver of ``order`` and of order - 1 from the same
    evaluations; the error |y_low - y_high| / max(atol, rtol max(|y_low|, |y_prev|)) (root mean
    square over the whole batch, so the step sizes are shared by its rows) sets the next h through
    k-diffusion's PID controller (pcoeff, icoeff, dcoeff, ``h_init``), which accepts the try when
    its factor is >= ``accept_safety``. ``steps`` is ignored; the evaluations depend on the data
    (a rejected try reuses its first evaluation, which k-diffusion makes again: the same result
    with one evaluation fewer per rejection), so a step cache, which plans by step, is refused.
    eta > 0 adds ancestral noise after each accepted step.
    """

    order: int = 3
    rtol: float = 0.05
    atol: float = 0.0078
    h_init: float = 0.05
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    accept_safety: float = 0.81
    eta: float = 0.0
    s_noise: float = 1.0
    denoise_to_zero: bool = False
    capturable = False  # each try's error is read back on the host

    def __post_init__(self):
        if isinstance(self.order, bool) or self.order not in (2, 3):
            raise ValueError(f"order must be 2 or 3, got {self.order!r}")
        if not (self.rtol >= 0 and self.atol >= 0 and self.rtol + self.atol > 0):
            raise ValueError(f"need rtol, atol >= 0, not both 0; got {self.rtol!r}, {self.atol!r}")
        if not self.h_init > 0:
            raise ValueError(f"h_init must be > 0, got {self.h_init!r}")
        super().__post_init__()

    def step(self, denoise, x, st, state, noise):
        x, state, run = _solve_range(self, denoise, x, st, state)
        if run is None:
            return x, state
        solve, p, y, u0, u_end, _ = run
        u, lam, lam_end, h = u0, -math.log(u0), -math.log(u_end), self.h_init
        y_prev, errs, order = y, [], self.order
        # the controller's exponents (k-diffusion: order 1.5 for the ancestral variant)
        k = 1.5 if self.eta else order
        b = (
            (self.pcoeff + self.icoeff + self.dcoeff) / k,
            -(self.pcoeff + 2 * self.dcoeff) / k,
            self.dcoeff / k,
        )
        while lam < lam_end - 1e-5:
            lam1 = min(lam_end, lam + h)
            u1 = u_end if lam1 == lam_end else math.exp(-lam1)
            down, up = solve.ancestral(u, u1, u_end, self.eta)
            p = solve(y, u) if p is None else p
            y_low, y_high = solve.dpm(p, u, down, order)
            tol = (torch.maximum(y_low.abs(), y_prev.abs()) * self.rtol).clamp(min=self.atol)
            diff = y_low - y_high
            # with atol = 0 an element where y_low = y_prev = 0 has tolerance 0: no error where
            # the two results agree there (not 0 / 0), infinite where they differ
            error = float(torch.where(diff == 0, 0.0, diff / tol).square().mean().sqrt())
            if not math.isfinite(error):
                if not torch.isfinite(y_high).all():  # a NaN from the network: the loop reports it
                    y = y_high
                    break
                raise ValueError(  # y_high finite: a zero tolerance where the results differ
                    f"dpm_adaptive's error estimate is not finite at level {u:.4g} (with atol=0: "
                    "an element where y_low and y_prev are 0 and y_high is not); give atol > 0"
                )
            # PIDStepSizeController.propose_step: errs holds the last three inverse errors
            errs[:] = errs or [1 / (error + 1e-8)] * 3
            errs[0] = 1 / (error + 1e-8)
            factor = 1 + math.atan(errs[0] ** b[0] * errs[1] ** b[1] * errs[2] ** b[2] - 1)
            h *= factor
            if factor >= self.accept_safety:  # accepted: the next try starts from y_high at u1
                errs[1:] = errs[:2]
                if up > 0:
                    y_high = y_high + (up * self.s_noise) * solve.draw(noise, y_high, u, u1)
                y_prev, y, u, lam, p = y_low, y_high, u1, lam1, None
        return _land(self, solve, y, u_end, st), None

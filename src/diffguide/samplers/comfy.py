"""ComfyUI's own samplers (comfy/k_diffusion/sampling.py): res_multistep(_ancestral),
gradient_estimation, heunpp2, exp_heun_2_x0(_sde), er_sde, seeds_2 and seeds_3.

res_multistep, gradient_estimation and heunpp2 step the ODE dy/du = (y - x0) / u with ComfyUI's
sigma as u: in the straight coordinates of ``core.sample.straight`` that is the VE level on VP
schedules (k-diffusion's x / a) and the flow time on flows (ComfyUI's CONST models). SEEDS,
exp_heun and ER-SDE are written in (alpha, sigma) and the half log-SNR, diffguide's (a, s, lam) on
every schedule. So each follows ComfyUI on both kinds of model. As everywhere in diffguide, an
update is the current prediction's DDIM step (a' x0 + s' eps) to some level, plus corrections from
differences of x0 predictions (or slopes), plus fresh noise; nothing is re-derived from x.

heunpp2 also needs the grid level after a step's end, which a Step does not carry. So each of its
three-evaluation steps returns its Euler predictor, and the next step, whose t_next is that level,
finishes it first: the same evaluations and the same final sample as ComfyUI. Between those steps x
is the predictor, and a callback's change to it carries over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


from ..core.registry import register
from ..core.sample import Ancestral, Churn, Sampler, data_sde_step, straight, straight_point

SEEDS_SOLVERS = ("phi_1", "phi_2")


def _split(u: float, u1: float, eta: float) -> tuple[float, float]:
    """k-diffusion's get_ancestral_step on levels u -> u1: (down, up)."""
    if not eta:
        return u1, 0.0
    up = min(u1, eta * u1 * math.sqrt(max(1 - (u1 / u) ** 2, 0.0)))
    return math.sqrt(max(u1 * u1 - up * up, 0.0)), up


def _phi1(z: float) -> float:
    """z phi_1(z) (ComfyUI's ei_h_phi_1)."""
    return math.expm1(z)


def _phi2(z: float) -> float:
    """z phi_2(z) (ComfyUI's ei_h_phi_2)."""
    return (math.expm1(z) - z) / z


def _at_lam(st, r: float):
    """The step from st.t to the level lam + r h (st itself when r = 1)."""
    return st if r == 1 else st.to_lam(st.lam + r * st.h)


def _chain(n, seg: float, z):
    """SEEDS' noise carried over a segment of length -seg / eta in lambda, plus fresh noise z."""
    return n * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * z


@register("sampler", "res_multistep")
@dataclass(frozen=True)
class ResMultistep(Ancestral):
    """RES second-order multistep (Zhang et al. 2023, arXiv 2308.02157; ComfyUI's res_multistep)."""

    def init_state(self):
        return None

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        _, u, flow = straight(st)
        c1, u1, _ = straight(st, nxt=True)
        down, up = _split(u, u1, self.eta)
        y = straight_point(p, down, flow)[0]  # Euler (DDIM) to the level down
        if state is not None and down > 0 and state[1] > 0:  # (old_down 0: ComfyUI's b2 is 0)
            old, old_down, u_prev = state
            h = math.log(u / down)
            c2 = math.log(old_down / u_prev) / h  # where the old x0 sits, in units of h
            b2 = _phi2(-h) / (-h) / c2 if c2 else 0.0
            y = y - (h * b2) * (p.x0 - old)
        if up > 0:
            y = y + (up * self.s_noise) * noise(x, st.t, st.t_next)
        return c1 * y, ((p.history, down, u) if math.isfinite(u) else None)


@register("sampler", "res_multistep_ancestral")
@dataclass(frozen=True)
class ResMultistepAncestral(ResMultistep):
    """RES multistep with ancestral noise (ComfyUI's res_multistep_ancestral)."""

    eta: float = 1.0


@register("sampler", "gradient_estimation")
@dataclass(frozen=True)
class GradientEstimation(Sampler):
    """Gradient estimation (Permenter & Yuan 2024; ComfyUI's sample_gradient_estimation)."""

    ge_gamma: float = 2.0

    def init_state(self):
        return None

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        _, u, flow = straight(st)
        c1, u1, _ = straight(st, nxt=True)
        y, d = straight_point(p, u1, flow)  # Euler (DDIM) to u1, and the slope dy/du
        if state is not None and not st.last and math.isfinite(u):
            y = y + ((self.ge_gamma - 1) * (u1 - u)) * (d - state)
        return c1 * y, d


@register("sampler", "heunpp2")
@dataclass(frozen=True)
class HeunPP2(Churn):
    """Heun++ (ComfyUI's sample_heunpp2): slopes at the next two grid levels, weighted by level."""

    def init_state(self):
        return None, None  # (the grid's first level u0, the unfinished step's (slope, du))

    def step(self, denoise, x, st, state, noise):
        u0, pending = state
        c, u, flow = straight(st)
        u0 = u if u0 is None else u0
        if pending is not None:  # finish the last step: its look-ahead level is this t_next
            d, du = pending
            u1 = straight(st, nxt=True)[1]
            q = denoise(x, st.t)
            r = denoise(st.a_next * q.x0 + st.s_next * q.eps, st.t_next)
            d2, d3 = straight_point(q, u, flow)[1], straight_point(r, u1, flow)[1]
            x = x + (c * du / (3 * u0)) * (u * (d2 - d) + u1 * (d3 - d))
        x, st = self.churned(x, st, noise)
        p = denoise(x, st.t)
        u = straight(st)[1]
        c1, u1, _ = straight(st, nxt=True)
        y, d = straight_point(p, u1, flow)
        if st.i >= st.n - 1 or not math.isfinite(u0):  # Euler onto the grid's end (or weights 0)
            return c1 * y, (u0, None)
        if st.i < st.n - 2:  # Heun++: finished by the next step
            return c1 * y, (u0, (d, u1 - u))
        q = denoise(c1 * y, st.t_next)  # the step before the last: Heun with weight u1 / (2 u0)
        d2 = straight_point(q, u1, flow)[1]
        return c1 * (y + (u1 / (2 * u0) * (u1 - u)) * (d2 - d)), (u0, None)


def _first_order(st, p, eta, s_noise, x, noise):
    """The data-prediction SDE step from lambda = -inf (a = 0) or onto data: a' x0 + s' E."""
    draw = eta > 0 and s_noise > 0 and st.s_next > 0
    return data_sde_step(st, p.x0, p.eps, eta, s_noise, noise(x, st.t, st.t_next) if draw else None)


def _seeds_stage(denoise, x, st, p, r, eta, s_noise, noise):
    """SEEDS' first stage: the SDE step from st.t to lam + r h, evaluated there. Returns the
    prediction, that substep, and its noise (None without noise), which later stages carry on."""
    h, mid = st.h, _at_lam(st, r)
    x2 = mid.a_next * p.x0 + (mid.s_next * math.exp(-r * h * eta)) * p.eps
    n = None
    if eta > 0 and s_noise > 0:
        n = math.sqrt(-math.expm1(-2 * r * h * eta)) * noise(x, st.t, mid.t_next)
        x2 = x2 + (mid.s_next * s_noise) * n
    return denoise(x2, mid.t_next), mid, n


def _seeds_2(denoise, x, st, noise, eta, s_noise, r, solver_type):
    """SEEDS-2's step (ComfyUI's sample_seeds_2): a stage at lam + r h, then the full step."""
    p = denoise(x, st.t)
    if st.last or not math.isfinite(st.lam):
        return _first_order(st, p, eta, s_noise, x, noise)
    h = st.h
    H = h * (eta + 1)
    q, mid, n = _seeds_stage(denoise, x, st, p, r, eta, s_noise, noise)
    k = -_phi1(-H) / (2 * r) if solver_type == "phi_1" else -_phi2(-H) / r
    out = data_sde_step(st, p.x0, p.eps, eta, s_noise)
    out = out + (st.a_next * k) * (q.x0 - p.x0)
    if n is not None:
        n = _chain(n, (r - 1) * h * eta, noise(x, mid.t_next, st.t_next))
        out = out + (st.s_next * s_noise) * n
    return out


def _check_seeds(eta, r, solver_type):
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if not 0 < r <= 1:
        raise ValueError(f"r must be in (0, 1], got {r!r}")
    if solver_type not in SEEDS_SOLVERS:
        raise ValueError(
            f"unknown solver_type {solver_type!r}; choose one of: {', '.join(SEEDS_SOLVERS)}"
        )


@register("sampler", "seeds_2")
@dataclass(frozen=True)
class Seeds2(Sampler):
    """SEEDS-2 (Gonzalez et al. 2023, arXiv 2305.14267; ComfyUI's sample_seeds_2)."""

    eta: float = 1.0
    s_noise: float = 1.0
    r: float = 0.5
    solver_type: str = "phi_1"

    def __post_init__(self):
        _check_seeds(self.eta, self.r, self.solver_type)

    def step(self, denoise, x, st, state, noise):
        args = (self.eta, self.s_noise, self.r, self.solver_type)
        return _seeds_2(denoise, x, st, noise, *args), state


@register("sampler", "exp_heun_2_x0")
@dataclass(frozen=True)
class ExpHeun2X0(Sampler):
    """Exponential Heun in x0 and log-SNR (ComfyUI's sample_exp_heun_2_x0: SEEDS-2, r = 1)."""

    solver_type: str = "phi_2"

    def __post_init__(self):
        _check_seeds(0.0, 1.0, self.solver_type)

    def step(self, denoise, x, st, state, noise):
        return _seeds_2(denoise, x, st, noise, 0.0, 0.0, 1.0, self.solver_type), state


@register("sampler", "exp_heun_2_x0_sde")
@dataclass(frozen=True)
class ExpHeun2X0SDE(Sampler):
    """Stochastic exponential Heun (ComfyUI's sample_exp_heun_2_x0_sde: SEEDS-2, r = 1)."""

    eta: float = 1.0
    s_noise: float = 1.0
    solver_type: str = "phi_2"

    def __post_init__(self):
        _check_seeds(self.eta, 1.0, self.solver_type)

    def step(self, denoise, x, st, state, noise):
        args = (self.eta, self.s_noise, 1.0, self.solver_type)
        return _seeds_2(denoise, x, st, noise, *args), state


@register("sampler", "seeds_3")
@dataclass(frozen=True)
class Seeds3(Sampler):
    """SEEDS-3 (Gonzalez et al. 2023, arXiv 2305.14267; ComfyUI's sample_seeds_3)."""

    eta: float = 1.0
    s_noise: float = 1.0
    r_1: float = 1.0 / 3
    r_2: float = 2.0 / 3

    def __post_init__(self):
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")
        if not 0 < self.r_1 < self.r_2 <= 1:
            raise ValueError(f"need 0 < r_1 < r_2 <= 1, got {self.r_1!r}, {self.r_2!r}")

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        eta, s_noise, r1, r2 = self.eta, self.s_noise, self.r_1, self.r_2
        if st.last or not math.isfinite(st.lam):
            return _first_order(st, p, eta, s_noise, x, noise), state
        h = st.h
        H = h * (eta + 1)
        q, m1, n = _seeds_stage(denoise, x, st, p, r1, eta, s_noise, noise)
        m2 = _at_lam(st, r2)
        x3 = m2.a_next * p.x0 + (m2.s_next * math.exp(-r2 * h * eta)) * p.eps
        x3 = x3 - (m2.a_next * r2 / r1 * _phi2(-r2 * H)) * (q.x0 - p.x0)
        if n is not None:
            n = _chain(n, (r1 - r2) * h * eta, noise(x, m1.t_next, m2.t_next))
            x3 = x3 + (m2.s_next * s_noise) * n
        w = denoise(x3, m2.t_next)
        out = data_sde_step(st, p.x0, p.eps, eta, s_noise)
        out = out - (st.a_next * _phi2(-H) / r2) * (w.x0 - p.x0)
        if n is not None:
            n = _chain(n, (r2 - 1) * h * eta, noise(x, m2.t_next, st.t_next))
            out = out + (st.s_next * s_noise) * n
        return out, state


def _er_scale(v: float) -> float:
    """ER-SDE's default noise scale function of the VE level (ComfyUI's
    default_er_sde_noise_scaler); inf past float range, as in torch."""
    e = v**0.3
    return v * (math.exp(e) + 10.0) if e < 700 else math.inf


@register("sampler", "er_sde")
@dataclass(frozen=True)
class ERSDE(Sampler):
    """ER-SDE-Solver-3 (Cui et al. 2023, arXiv 2309.06169; ComfyUI's sample_er_sde)."""

    s_noise: float = 1.0
    max_stage: int = 3

    def __post_init__(self):
        if isinstance(self.max_stage, bool) or self.max_stage not in (1, 2, 3):
            raise ValueError(f"max_stage must be 1, 2 or 3, got {self.max_stage!r}")

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        v, v1, a1 = st.ve, st.ve_next, st.a_next
        if st.last:
            return a1 * p.x0, ()
        if not math.isfinite(_er_scale(v)):  # from (near) infinite noise the ratio r is 0
            out, r, keep = a1 * p.x0, 0.0, ()
        else:
            r = _er_scale(v1) / _er_scale(v)
            out = a1 * p.x0 + (a1 * r * v) * p.eps
            if state and self.max_stage >= 2:
                dv, du = v1 - v, (v - v1) / 200  # a 200-point sum from v1 towards v
                pts = [v1 + k * du for k in range(200)]
                scales = [_er_scale(q) for q in pts]  # shared by both sums
                d1 = (p.x0 - state[0][0]) / (v - state[0][1])
                s = sum(1 / e for e in scales) * du
                out = out + (a1 * (dv + s * _er_scale(v1))) * d1
                if len(state) > 1 and self.max_stage >= 3:
                    (h1, v_1), (h2, v_2) = state
                    d2 = (d1 - (h1 - h2) / (v_1 - v_2)) / ((v - v_2) / 2)
                    su = sum((q - v) / e for q, e in zip(pts, scales)) * du
                    out = out + (a1 * (dv * dv / 2 + su * _er_scale(v1))) * d2
            keep = ((p.history, v),) + tuple(state[:1])
        if self.s_noise > 0:
            std = math.sqrt(max(v1 * v1 - (v * r) ** 2 if r else v1 * v1, 0.0))
            out = out + (a1 * std * self.s_noise) * noise(x, st.t, st.t_next)
        return out, keep

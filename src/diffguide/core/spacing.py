"""Time grids: ``timesteps(schedule, steps, spacing)`` returns a descending float64 tensor of t
values.

With ``final="zero"`` (the default) the grid has ``steps`` evaluation points and ends at the data
end
(sigma = 0); with ``final="sigma_min"`` it ends at the least noisy trained level instead, which is
what diffusers does for DDIM with ``set_alpha_to_one=False`` and DPM-Solver with
``final_sigmas_type="sigma_min"``."""

from __future__ import annotations

import math

import numpy as np
import torch

from .gits import gits_sigmas, loglinear_interp
from .schedule import F64, FlowSchedule, Schedule, TrigFlowSchedule, VPSchedule

FINALS = ("zero", "sigma_min")


def _karras(schedule, n, sigma_min=None, sigma_max=None, rho=7.0):
    """Karras et al. 2022, eq. 5: n levels uniform in ve^(1/rho)."""
    lo, hi = _ve_range(schedule, sigma_min, sigma_max, "karras")
    ramp = torch.linspace(0, 1, n, dtype=F64)
    ve = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return schedule.t_of_ve(ve)


def _uniform_lam(schedule, n, sigma_min=None, sigma_max=None):
    """n levels uniform in logSNR (Lu et al. 2022, 'logSNR' skip type)."""
    lo, hi = _ve_range(schedule, sigma_min, sigma_max, "uniform_lam")
    lam = torch.linspace(-math.log(hi), -math.log(lo), n, dtype=F64)
    return schedule.t_of_lam(lam)


def _beta(schedule, n, alpha=0.6, beta=0.6, sigma_min=None, sigma_max=None):
    """n levels at the Beta(alpha, beta) quantiles of the ve range (Lee et al. 2024, 'Beta
    sampling is all you need'; diffusers' use_beta_sigmas): ve_i = lo + F^-1(1 - i/(n-1)) (hi -
    lo)."""
    if not (alpha > 0 and beta > 0):
        raise ValueError(
            f"spacing 'beta' needs alpha > 0 and beta > 0, got alpha={alpha}, beta={beta}"
        )
    lo, hi = _ve_range(schedule, sigma_min, sigma_max, "beta")
    q = [beta_quantile(1 - i / (n - 1), alpha, beta) if n > 1 else 1.0 for i in range(n)]
    return schedule.t_of_ve(torch.tensor([lo + v * (hi - lo) for v in q], dtype=F64))


def _beta_cf(x: float, a: float, b: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300

    def guard(v):
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1 / guard(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 1000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 / guard(1 + num * d)
            c = guard(1 + num / c)
            h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return front * _beta_cf(x, a, b) / a
    return 1 - front * _beta_cf(1 - x, b, a) / b


def beta_quantile(p: float, a: float, b: float) -> float:
    """The inverse of ``beta_cdf`` by bisection (monotone; 60 halvings reach 1e-18)."""
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < p else (lo, mid)
    return (lo + hi) / 2


def _uniform_t(schedule, n, t_start=None, t_end=None, stop=None, nudge=None):
    """n times uniform from t_start to t_end; with ``stop``, the first n of n + 1 from t_start to
    stop (diffusers' UniPC on flow sigmas: linspace(1, 1/T, n + 1)[:-1]); ``nudge`` lowers a first
    level of exactly sigma 1 by that much, as that scheduler does (log alpha is -inf there)."""
    hi = schedule.t_max if t_start is None else float(t_start)
    if stop is not None:
        ts = torch.linspace(hi, float(stop), n + 1, dtype=F64)[:-1]
    else:
        lo = _t_sigma_min(schedule) if t_end is None else float(t_end)
        ts = torch.linspace(hi, lo, n, dtype=F64)
    if nudge is not None and abs(float(schedule.sigma(ts[0])) - 1) < float(nudge):
        e = float(nudge)  # a flow's sigma 1 - e, alpha e
        ts[0] = schedule.t_of_ve(torch.tensor((1 - e) / e, dtype=F64))
    return ts


def _polyexponential(schedule, n, rho=1.0, sigma_min=None, sigma_max=None):
    """k-diffusion's get_sigmas_polyexponential: log ve falls as a polynomial of degree rho in the
    step index (rho 1: uniform in log ve)."""
    lo, hi = _ve_range(schedule, sigma_min, sigma_max, "polyexponential")
    ramp = torch.linspace(1, 0, n, dtype=F64) ** float(rho)
    return schedule.t_of_ve(torch.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)))


def _kl_optimal(schedule, n, sigma_min=None, sigma_max=None):
    """ComfyUI's kl_optimal (Sabour et al. 2024, "Align Your Steps", eq. for the KL-optimal grid of
    a Gaussian): ve_i = tan((1 - i/(n-1)) atan(hi) + i/(n-1) atan(lo))."""
    lo, hi = _ve_range(schedule, sigma_min, sigma_max, "kl_optimal")
    w = torch.linspace(0, 1, n, dtype=F64) if n > 1 else torch.zeros(1, dtype=F64)
    return schedule.t_of_ve(torch.tan(w * math.atan(lo) + (1 - w) * math.atan(hi)))


def _simple(schedule, n):
    """ComfyUI's and A1111's "simple": every (T / n)-th training level from the top, index
    T - 1 - int(k (T / n))."""
    _indexed(schedule, "simple")
    T = schedule.num_train_timesteps
    step = (
        T / n
    )  # rounded first, as theirs: k (T / n) falls just below an integer k T / n at 70 of n <= 1000
    return schedule.index_time(torch.tensor([T - 1 - int(k * step) for k in range(n)], dtype=F64))


def _indexed(schedule, name):
    if not hasattr(schedule, "index_time"):
        raise ValueError(
            f"spacing {name!r} reads training timesteps, which {type(schedule).__name__} has not"
        )


def _sgm_uniform(schedule, n):
    """ComfyUI's and A1111's "sgm_uniform" (SGM's discretisation): n training indices uniform from
    the
    top one to the lowest, the endpoint excluded; on a VP table the level at a fractional index is
    interpolated log-linearly between its two entries, as their model_sampling.sigma / t_to_sigma
    do."""
    _indexed(schedule, "sgm_uniform")
    hi, lo = (
        float(schedule.index_time(schedule.num_train_timesteps - 1)),
        float(schedule.index_time(0)),
    )
    ts = torch.linspace(hi, lo, n + 1, dtype=F64)[:-1]
    if not isinstance(schedule, VPSchedule):  # a flow's levels are a formula of t, not a table
        return ts
    return schedule.t_of_ve(_table_levels(schedule, ts))


def _table_levels(schedule, idx):
    """VE levels at fractional indices of a VP table, log-linear between entries (k-diffusion's
    t_to_sigma); the VP schedule itself is linear in ve there (on SD's table up to 1e-4 apart on
    sgm_uniform's grids of 1 to 59 steps, 1.5% between the first two entries)."""
    low = idx.floor().clamp(max=schedule.t_max - 1)
    w = idx - low
    lo_ve, hi_ve = schedule.ve(low), schedule.ve(low + 1)
    # an entry itself is taken as it is, so that an infinite top level (zero terminal SNR) stays
    # exact
    mixed = torch.exp((1 - w) * torch.log(lo_ve) + w * torch.log(hi_ve))
    return torch.where(w == 0, lo_ve, torch.where(w == 1, hi_ve, mixed))


# Align Your Steps (Sabour et al. 2024): the published 10-step VE levels (NVIDIA's how-to page)
AYS_LEVELS = {
    "sd1": [
        14.6146412293,
        6.4745760956,
        3.8636745985,
        2.6946151520,
        1.8841921177,
        1.3943805092,
        0.9642583904,
        0.6523686016,
        0.3977456272,
        0.1515232662,
        0.0291671582,
    ],
    "sdxl": [
        14.6146412293,
        6.3184485287,
        3.7681790315,
        2.1811480769,
        1.3405244945,
        0.8620721141,
        0.5550693289,
        0.3798540708,
        0.2332364134,
        0.1114188177,
        0.0291671582,
    ],
}


def _ays(schedule, n, model="sd1"):
    """Align Your Steps: the published table for ``model`` (sd1, sdxl), interpolated linearly in
    log ve
    over a uniform position for other step counts (the authors' loglinear_interp); the last level is
    the data end."""
    if model not in AYS_LEVELS:
        raise ValueError(f"spacing 'ays' has tables for {', '.join(AYS_LEVELS)}, not {model!r}")
    ve = loglinear_interp(AYS_LEVELS[model], n + 1)[:-1]
    return schedule.t_of_ve(torch.from_numpy(ve.copy()))


# A1111's Align Your Steps tables (its sd_schedulers.py): the published levels to three decimals,
# the top one 14.615 a little above SD's largest trained level (14.6146), where a VP table's grid
# stops
AYS_LEVELS_A1111 = {
    "sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def _ays_a1111(schedule, n, model="sd1"):
    """A1111's Align Your Steps: its table (sd1, sdxl) as the n levels when n is its length, else
    interpolated linearly in log ve onto n points, the lowest level kept (ComfyUI's, ``ays``, takes
    n + 1 points and puts the data end in place of the lowest)."""
    if model not in AYS_LEVELS_A1111:
        raise ValueError(
            f"spacing 'ays_a1111' has tables for {', '.join(AYS_LEVELS_A1111)}, not {model!r}"
        )
    levels = np.asarray(AYS_LEVELS_A1111[model])
    if n != len(levels):
        levels = loglinear_interp(levels, n)
    return schedule.t_of_ve(torch.from_numpy(levels.copy()))


def _kl_optimal_a1111(schedule, n, sigma_min=None, sigma_max=None):
    """A1111's KL Optimal: n + 1 levels uniform in arctan(ve) from sigma_max down to sigma_min
    itself,
    with no step onto data (ComfyUI's, ``kl_optimal``, spreads n levels and then steps to zero)."""
    return _kl_optimal(schedule, n + 1, sigma_min, sigma_max)


# -- ComfyUI's other schedulers. ComfyUI's "sigma" is the VE level on VP and EDM models and the
# (shifted) flow time s on flow models; these spacings compute in those units, as ComfyUI does, and
# map the levels onto the schedule's times.


def comfy_times(schedule, sigmas) -> torch.Tensor:
    """Times of ComfyUI sigmas: on a flow schedule the flow time s (VE s / (1 - s), s = 1 pure
    noise), on any other the VE level itself (float64; the ComfyUI node pack's reading too)."""
    sig = torch.as_tensor(sigmas).detach().to("cpu", F64)
    if isinstance(schedule, FlowSchedule):
        return schedule.t_of_flow_time(sig)
    return schedule.t_of_ve(sig)


def _comfy_range(schedule) -> tuple[float, float]:
    """ComfyUI's model_sampling.sigma_min and sigma_max: on a flow its first training level
    s(1 / T) and 1, else the schedule's own VE range (a VP table's ends)."""
    if isinstance(schedule, FlowSchedule):
        return float(schedule.flow_time(schedule.index_time(0))), 1.0
    return schedule.sigma_min, schedule.sigma_max


def _normal(schedule, n):
    """ComfyUI's normal_scheduler: n model timesteps uniform from the top training level's to the
    lowest's, both included, read back through its model_sampling.sigma. On a VP table that is
    the index grid T - 1 .. 0 with levels log-linear between entries; a flow's timestep is 1000 s
    and its sigma(timestep) applies the shift again, so the grid is uniform in unshifted time from
    1 down to s(1 / T) (not 1 / T)."""
    _indexed(schedule, "normal")
    if isinstance(schedule, FlowSchedule):
        return torch.linspace(1.0, _comfy_range(schedule)[0], n, dtype=F64)
    idx = torch.linspace(schedule.num_train_timesteps - 1, 0, n, dtype=F64)
    return schedule.t_of_ve(_table_levels(schedule, idx))


def _ddim_uniform(schedule, n, trim=False):
    """ComfyUI's ddim_scheduler: every (T // n)-th training level from index 1 up, noise end
    first. Like ComfyUI's that is ceil((T - 1) / (T // n)) levels, n or more (31 for n = 30 on
    1000 levels; its KSampler runs them all); ``trim`` keeps the lowest n, as its BasicScheduler
    node does."""
    _indexed(schedule, "ddim_uniform")
    T = schedule.num_train_timesteps
    idx = torch.arange(1, T, max(T // n, 1), dtype=F64).flip(0)
    return schedule.index_time(idx[-n:] if trim else idx)


def _linear_quadratic(schedule, n, threshold_noise=0.025, linear_steps=None, sigma_max=None):
    """ComfyUI's linear_quadratic_schedule (Mochi's): sigma_max (1 - f_i), f rising linearly to
    ``threshold_noise`` over the first ``linear_steps`` (n // 2) steps, then on the quadratic that
    continues it and reaches 1 at step n (the data end)."""
    if not 0 < threshold_noise < 1:
        raise ValueError(
            f"spacing 'linear_quadratic' needs 0 < threshold_noise < 1, got {threshold_noise}"
        )
    top = _comfy_range(schedule)[1] if sigma_max is None else float(sigma_max)
    if not 0 < top < math.inf:
        raise ValueError(
            f"spacing 'linear_quadratic' needs a finite sigma_max > 0, got {top:g} (a "
            "zero-terminal-SNR schedule must be given one)"
        )
    if n == 1:
        frac = [0.0]
    else:
        k = n // 2 if linear_steps is None else int(linear_steps)
        if not 0 < k < n:
            raise ValueError(f"spacing 'linear_quadratic' needs 0 < linear_steps < {n}, got {k}")
        q, gap = n - k, k - threshold_noise * n
        a, b = gap / (k * q**2), threshold_noise / k - 2 * gap / q**2
        frac = [i * threshold_noise / k for i in range(k)]
        frac += [a * i * i + b * i + a * k * k for i in range(k, n)]
    return comfy_times(schedule, torch.tensor([top * (1 - f) for f in frac], dtype=F64))


def _laplace(schedule, n, mu=0.0, beta=0.5, sigma_min=None, sigma_max=None):
    """k-diffusion's get_sigmas_laplace in ComfyUI (Tiankai et al. 2024): log sigma = mu - beta
    sign(1/2 - x) log(1 - 2 |1/2 - x| + 1e-5) at n points x uniform on [0, 1], clamped to
    [sigma_min, sigma_max] (in ComfyUI's units; the model's range by default)."""
    lo, hi = _comfy_range(schedule)
    lo = lo if sigma_min is None else float(sigma_min)
    hi = hi if sigma_max is None else float(sigma_max)
    if not (0 < lo < hi and beta > 0):
        raise ValueError(
            f"spacing 'laplace' needs 0 < sigma_min < sigma_max and beta > 0, got "
            f"sigma_min={lo:g}, sigma_max={hi:g}, beta={beta}"
        )
    x = torch.linspace(0, 1, n, dtype=F64)
    lam = mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * (0.5 - x).abs() + 1e-5)
    return comfy_times(schedule, torch.exp(lam).clamp(lo, hi))


def _tangent_arc(k, slope, pivot, start, end):
    """RES4LYF's get_bong_tangent_sigmas: k points of an arctangent step around ``pivot``, scaled
    to run from ``start`` to ``end``."""

    def step(x):
        return (2 / math.pi * math.atan(-slope * (x - pivot)) + 1) / 2

    top, bottom = step(0), step(k - 1)
    return [(step(x) - bottom) / (top - bottom) * (start - end) + end for x in range(k)]


def _bong_tangent(
    schedule, n, start=1.0, middle=0.5, pivot_1=0.6, pivot_2=0.6, slope_1=0.2, slope_2=0.2
):
    """RES4LYF's bong_tangent_scheduler (a ComfyUI scheduler of that node pack): two arctangent
    stages over n + 2 points, ``start`` to ``middle`` then ``middle`` to 0 (the data end), their
    pivots at fractions of the points and slopes scaled by 40 / (n + 2). Levels in ComfyUI's units,
    whatever the model: start 1 is pure noise on a flow, VE 1 on a VP model (as RES4LYF gives)."""
    m = n + 2
    split = int((m * pivot_1 + m * pivot_2) / 2)
    if not (2 <= split <= m - 2 and start > middle > 0):
        raise ValueError(
            f"spacing 'bong_tangent' needs two stages of 2 points or more and start > middle > 0; "
            f"steps={n}, pivots ({pivot_1}, {pivot_2}) split {m} points at {split}"
        )
    first = _tangent_arc(split, slope_1 / (m / 40), int(m * pivot_1), start, middle)
    second = _tangent_arc(m - split, slope_2 / (m / 40), int(m * pivot_2) - split, middle, 0.0)
    return comfy_times(schedule, torch.tensor(first[:-1] + second[:-1], dtype=F64))


# OptimalSteps (Pei et al. 2025): the published flow-sigma tables of ComfyUI's OptimalStepsScheduler
OPTIMAL_STEPS_LEVELS = {
    name: [float(v) for v in text.split()]
    for name, text in {
        "flux": "0.9968 0.9886 0.9819 0.975 0.966 0.9471 0.9158 0.8287 0.5512 0.2808 0.001",
        "wan": "1.0 0.997 0.995 0.993 0.991 0.989 0.987 0.985 0.98 0.975 0.973 0.968 0.96 0.946 "
        "0.927 0.902 0.864 0.776 0.539 0.208 0.001",
        "chroma": "0.992 0.99 0.988 0.985 0.982 0.978 0.973 0.968 0.961 0.953 0.943 0.931 0.917 "
        "0.9 0.881 0.858 0.832 0.802 0.769 0.731 0.69 0.646 0.599 0.55 0.501 0.451 0.402 0.355 "
        "0.311 0.27 0.232 0.199 0.169 0.143 0.12 0.101 0.084 0.07 0.058 0.048 0.001",
    }.items()
}


def _gits(schedule, n, coeff=1.20):
    """GITS (Chen et al. 2024): ComfyUI's GITSScheduler table of SD 1.5 VE levels (coeff 0.80 to
    1.50 by 0.05, 2 to 20 steps), log-linear for other step counts; the data end follows."""
    if isinstance(schedule, FlowSchedule):
        raise ValueError(
            "spacing 'gits' is a table of SD 1.5's VE levels; it has none for a flow schedule"
        )
    return schedule.t_of_ve(torch.tensor(gits_sigmas(n, coeff)[:-1], dtype=F64))


def _optimal_steps(schedule, n, model="flux"):
    """ComfyUI's OptimalStepsScheduler: the table for ``model`` (flux, wan, chroma) as it is for
    n + 1 levels, else interpolated linearly in log sigma onto n + 1 (its loglinear_interp); the
    last becomes the data end. Levels in ComfyUI's units (a flow's s)."""
    if model not in OPTIMAL_STEPS_LEVELS:
        raise ValueError(
            f"spacing 'optimal_steps' has tables for {', '.join(OPTIMAL_STEPS_LEVELS)}, "
            f"not {model!r}"
        )
    levels = np.asarray(OPTIMAL_STEPS_LEVELS[model])
    if n + 1 != len(levels):
        levels = loglinear_interp(levels, n + 1)
    return comfy_times(schedule, torch.from_numpy(levels[:-1].copy()))


ABOVE_DATA = ("kl_optimal_a1111",)  # spacings whose grid ends at sigma_min, never at the data end


def _ve_range(schedule, sigma_min, sigma_max, name):
    lo = schedule.sigma_min if sigma_min is None else float(sigma_min)
    hi = schedule.sigma_max if sigma_max is None else float(sigma_max)
    if not (0 < lo < hi < math.inf):
        raise ValueError(
            f"spacing {name!r} needs 0 < sigma_min < sigma_max < inf, got sigma_min={lo:g}, "
            f"sigma_max={hi:g} (a zero-terminal-SNR schedule must be given a finite sigma_max)"
        )
    return lo, hi


def _t_sigma_min(schedule) -> float:
    return float(schedule.t_of_ve(torch.tensor(schedule.sigma_min, dtype=F64)))


def _diffusers_grid(schedule, n, kind, steps_offset=0, round=True):
    """diffusers' integer-index grids (DDIM/Euler conventions): n points, largest first."""
    T = schedule.num_train_timesteps
    if kind == "linspace":
        t = np.linspace(0, T - 1, n)[::-1]
        if round:
            t = t.round()
    elif kind == "leading":
        ratio = T // n
        t = (np.arange(0, n) * ratio).round()[::-1] + steps_offset
    else:  # trailing
        t = np.round(np.arange(T, 0, -T / n)) - 1
    return torch.tensor(t.copy(), dtype=F64)


_DIFFUSERS = ("linspace", "leading", "trailing")


def _lcm_grid(schedule: Schedule, steps: int, original_steps: int = 50) -> torch.Tensor:
    """LCM's timesteps (Luo et al. 2023; diffusers' LCMScheduler): ``steps`` points picked evenly
    from
    the distillation grid k - 1, 2k - 1, ..., T - 1 (k = T // original_steps), noise end first; on
    a flow schedule those training indices are the flow times (i + 1) / T (a flow-teacher student's
    grid)."""
    _indexed(schedule, "lcm")
    n_train = schedule.num_train_timesteps
    if not 1 <= steps <= original_steps <= n_train:
        raise ValueError(
            f"spacing 'lcm' needs 1 <= steps <= original_steps <= {n_train}, got steps={steps}, "
            f"original_steps={original_steps}"
        )
    k = n_train // int(original_steps)
    grid = (torch.arange(1, int(original_steps) + 1, dtype=torch.int64) * k - 1).flip(0)
    idx = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
    return schedule.index_time(grid[torch.from_numpy(idx)].to(F64))


def _scm_grid(
    schedule: Schedule, steps: int, intermediate: float = 1.3, sigma_data: float = 0.5
) -> torch.Tensor:
    """SCMScheduler's TrigFlow times (pi/2, ``intermediate``, 0 for two steps, else uniform in t).
    On
    another schedule each TrigFlow time t is the time with the same VE level sigma_data tan(t), the
    first being the schedule's own noise end (an sCM student of a VP or flow teacher)."""
    trig = (
        torch.tensor([math.pi / 2, float(intermediate), 0.0], dtype=F64)
        if steps == 2
        else torch.linspace(math.pi / 2, 0.0, steps + 1, dtype=F64)
    )
    if isinstance(schedule, TrigFlowSchedule):
        return trig.clamp(schedule.t_min, schedule.t_max)
    ts = schedule.t_of_ve(sigma_data * torch.tan(trig[1:-1]))
    return torch.cat(
        [
            torch.tensor([schedule.t_max], dtype=F64),
            ts.to(F64),
            torch.tensor([schedule.t_min], dtype=F64),
        ]
    )


# spacing -> (its options, one line for ``diffguide list``)
SPACING_OPTIONS = {
    "karras": ("rho", "sigma_min", "sigma_max"),
    "exponential": ("sigma_min", "sigma_max"),
    "beta": ("alpha", "beta", "sigma_min", "sigma_max"),
    "polyexponential": ("rho", "sigma_min", "sigma_max"),
    "kl_optimal": ("sigma_min", "sigma_max"),
    "simple": (),
    "sgm_uniform": (),
    "ays": ("model",),
    "normal": (),
    "ddim_uniform": ("trim",),
    "linear_quadratic": ("threshold_noise", "linear_steps", "sigma_max"),
    "laplace": ("mu", "beta", "sigma_min", "sigma_max"),
    "bong_tangent": ("start", "middle", "pivot_1", "pivot_2", "slope_1", "slope_2"),
    "optimal_steps": ("model",),
    "gits": ("coeff",),
    "kl_optimal_a1111": ("sigma_min", "sigma_max"),
    "ays_a1111": ("model",),
    "uniform_lam": ("sigma_min", "sigma_max"),
    "uniform_t": ("t_start", "t_end", "stop", "nudge"),
    "linspace": ("round",),
    "leading": ("steps_offset",),
    "trailing": (),
    "lcm": ("original_steps",),
    "scm": ("intermediate", "sigma_data"),
}
SPACINGS = tuple(SPACING_OPTIONS)
SPACING_DOCS = {
    "karras": "Karras et al. 2022: uniform in ve^(1/rho)",
    "exponential": "uniform in log ve (= uniform_lam)",
    "beta": "Beta(alpha, beta) quantiles of the ve range (diffusers' use_beta_sigmas)",
    "polyexponential": "k-diffusion's: log ve falls as a polynomial of degree rho",
    "kl_optimal": "ComfyUI's kl_optimal: uniform in arctan(ve)",
    "simple": "ComfyUI's simple: every T/n-th training level",
    "sgm_uniform": "ComfyUI's sgm_uniform: uniform in training time, endpoint excluded",
    "ays": "Align Your Steps' published tables (model sd1, sdxl), log-linear between (ComfyUI's)",
    "normal": "ComfyUI's normal: uniform in model timestep, both ends included",
    "ddim_uniform": "ComfyUI's ddim_uniform: every (T // n)-th level from index 1 (trim: n only)",
    "linear_quadratic": "ComfyUI's linear_quadratic (Mochi's): linear to threshold_noise, then "
    "quadratic",
    "laplace": "ComfyUI's Laplace (Tiankai et al. 2024) around mu; its node gives no final 0 (that "
    "is final='sigma_min' with one step fewer)",
    "bong_tangent": "RES4LYF's bong_tangent (ComfyUI node pack): two arctangent stages in "
    "ComfyUI's sigma units",
    "gits": "GITS' published SD 1.5 tables (coeff 0.80..1.50), log-linear between (ComfyUI's)",
    "optimal_steps": "OptimalSteps' published flow tables (model flux, wan, chroma), log-linear "
    "between (ComfyUI's)",
    "kl_optimal_a1111": "A1111's KL Optimal: uniform in arctan(ve) down to sigma_min, no step onto "
    "data",
    "ays_a1111": "A1111's Align Your Steps: its rounded tables interpolated onto the steps' levels",
    "uniform_lam": "uniform in logSNR (DPM-Solver's)",
    "uniform_t": "uniform in the schedule's time (SD3-like on flows)",
    "linspace": "diffusers' linspace grid",
    "leading": "diffusers' leading grid",
    "trailing": "diffusers' trailing grid",
    "lcm": "LCMScheduler's grid (original_steps)",
    "scm": "SCMScheduler's TrigFlow times",
}


def timesteps(
    schedule: Schedule,
    steps: int,
    spacing: str | None = None,
    final: str = "zero",
    drop_last: bool = False,
    **options,
) -> torch.Tensor:
    """Descending t grid of ``steps`` intervals for ``schedule``.

    spacing: ``karras`` (rho, sigma_min, sigma_max), ``exponential`` (uniform in log ve, which is
    ``uniform_lam``: uniform in logSNR), ``beta`` (alpha, beta, sigma_min, sigma_max),
    ``uniform_lam`` (sigma_min, sigma_max),
    ``uniform_t`` (t_start, t_end), or diffusers' ``linspace`` (round), ``leading`` (steps_offset),
    ``trailing``, or LCM's ``lcm`` (original_steps), or SCMScheduler's ``scm`` (intermediate), or
    the ComfyUI / k-diffusion schedules ``polyexponential`` (rho), ``kl_optimal``, ``simple``,
    ``sgm_uniform``
    and Align Your Steps' ``ays`` (model: sd1, sdxl), ComfyUI's ``normal``, ``ddim_uniform``
    (trim), ``linear_quadratic`` (threshold_noise, linear_steps, sigma_max), ``laplace`` (mu, beta,
    sigma_min, sigma_max), RES4LYF's ``bong_tangent`` (start, middle, pivot_1, pivot_2, slope_1,
    slope_2) and OptimalSteps' ``optimal_steps`` (model: flux, wan, chroma), whose levels are
    ComfyUI's sigmas (a flow's s, else the VE level), or A1111's own ``kl_optimal_a1111`` (which
    ends at sigma_min whatever ``final`` says) and ``ays_a1111`` (model). ``uniform_t`` with
    ``final="zero"``
    and no ``t_end`` spaces all steps evenly down to the data end; with a ``t_end`` it puts
    ``steps`` points on [t_start, t_end], then the data end
    (FlowMatchEulerDiscreteScheduler's grid is ``t_end`` = its shifted sigma_min).
    ``drop_last=True`` builds a diffusers grid for steps + 1 points and drops the last,
    the convention of diffusers' DPMSolverMultistepScheduler. Defaults to ``schedule.spacing``.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    spacing = spacing or getattr(schedule, "spacing", "uniform_t")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    if final not in FINALS:
        raise ValueError(f"unknown final {final!r}; choose one of: {', '.join(FINALS)}")
    allowed = set(SPACING_OPTIONS[spacing])
    bad = set(options) - allowed
    if bad:
        raise ValueError(
            f"spacing {spacing!r} takes no option {sorted(bad)[0]!r}; allowed: "
            f"{', '.join(sorted(allowed)) or 'none'}"
        )
    if drop_last and spacing not in _DIFFUSERS:
        raise ValueError(
            f"drop_last applies to the diffusers spacings {_DIFFUSERS}, not {spacing!r}"
        )

    if spacing == "lcm":
        end = (
            schedule.t_min if final == "zero" else 0.0
        )  # TCDScheduler ends on the table's first level
        ts = torch.cat([_lcm_grid(schedule, steps, **options), torch.tensor([end], dtype=F64)])
    elif spacing in ABOVE_DATA:  # A1111 takes no step onto data here, whatever final says
        ts = _kl_optimal_a1111(schedule, steps, **options)
    elif (
        spacing == "scm"
    ):  # SCMScheduler: two steps through an intermediate time, else uniform in t
        ts = _scm_grid(schedule, steps, **options)
    elif spacing in _DIFFUSERS:
        if not isinstance(schedule, VPSchedule):
            raise ValueError(
                f"spacing {spacing!r} indexes a discrete VP table; {type(schedule).__name__} "
                "supports: karras, exponential, beta, uniform_lam, uniform_t"
            )
        n = steps + 1 if drop_last else steps
        if n > schedule.num_train_timesteps:
            raise ValueError(
                f"steps={steps} exceeds the {schedule.num_train_timesteps} training "
                f"timesteps of this schedule"
            )
        points = _diffusers_grid(schedule, n, spacing, **options)[:steps]
        end = schedule.t_min if final == "zero" else 0.0
        ts = torch.cat([points, torch.tensor([end], dtype=F64)])
    elif (
        spacing == "uniform_t"
        and final == "zero"
        and options.get("t_end") is None
        and options.get("stop") is None
    ):
        # uniform in t all the way to the data end (trailing-like for VP, SD3-like for flow)
        ts = _uniform_t(schedule, steps + 1, t_start=options.get("t_start"), t_end=schedule.t_min)
    else:
        rule = {
            "karras": _karras,
            "uniform_lam": _uniform_lam,
            "exponential": _uniform_lam,
            "beta": _beta,
            "uniform_t": _uniform_t,
            "polyexponential": _polyexponential,
            "kl_optimal": _kl_optimal,
            "simple": _simple,
            "sgm_uniform": _sgm_uniform,
            "ays": _ays,
            "ays_a1111": _ays_a1111,
            "normal": _normal,
            "ddim_uniform": _ddim_uniform,
            "linear_quadratic": _linear_quadratic,
            "laplace": _laplace,
            "bong_tangent": _bong_tangent,
            "optimal_steps": _optimal_steps,
            "gits": _gits,
        }[spacing]
        if final == "sigma_min":
            ts = rule(schedule, steps + 1, **options)
        else:
            ts = torch.cat(
                [rule(schedule, steps, **options), torch.tensor([schedule.t_min], dtype=F64)]
            )
    schedule.check_t(ts, "timesteps")
    if torch.any(ts[1:] >= ts[:-1]):
        raise ValueError(
            f"spacing {spacing!r} with steps={steps} gives repeated or rising timesteps "
            f"{ts.tolist()}; use fewer steps or another spacing"
        )
    return ts


def check_timesteps(schedule: Schedule, ts) -> torch.Tensor:
    """Validate a user-provided grid: 1-D, at least two points, strictly descending, in range."""
    ts = torch.as_tensor(ts, dtype=F64).detach().cpu()
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(
            f"ts must be a 1-D grid with at least 2 points, got shape {tuple(ts.shape)}"
        )
    if torch.any(ts[1:] >= ts[:-1]):
        raise ValueError("ts must be strictly descending (noise end first)")
    schedule.check_t(ts, "ts")
    return ts

"""SA-Solver (sa_solver, sa_solver_pece) against an independent transcription of ComfyUI's
sample_sa_solver on the closed-form Gaussian mixture (VE sigmas on a VP model, flow time on a flow
model), with replayed noise; and GITS' levels against rows typed from ComfyUI's nodes_gits.py."""

import math

import numpy as np
import pytest
import torch

import diffguide as dg
from diffguide.core.gits import gits_sigmas
from diffguide.samplers import sa_solver  # noqa: F401  (registers the samplers)

F64 = torch.float64
SEEDS = [5, 6]
SHIFT = 3.0


def _setup(gmm, steps, flow, spacing="karras"):
    """(bound denoiser, grid, ComfyUI's sigmas, D(x, sigma), c0 with x = c0 x_comfy, lam)."""
    gm = dg.GaussianMixture(gmm.means, gmm.stds, gmm.weights, gmm.labels, dg.FlowSchedule(SHIFT))
    gm = gm if flow else gmm
    sc, labels = gm.schedule, torch.tensor([0, 2])
    ts = dg.timesteps(sc, steps, spacing)
    sigmas = [float(sc.sigma(t) if flow else sc.ve(t)) for t in ts]

    def D(x, sigma):
        t = sc.t_of_ve(torch.tensor(sigma / (1 - sigma) if flow else sigma, dtype=F64))
        return gm(x if flow else float(sc.alpha(t)) * x, t, labels).x0

    def lam(sigma):  # sigma_to_half_log_snr
        if sigma == 0:
            return math.inf
        return math.log((1 - sigma) / sigma) if flow else -math.log(sigma)

    bound = dg.guide(gm, dg.parse_spec("guidance", "none"), labels)
    return bound, ts, sigmas, D, 1.0 if flow else float(sc.alpha(ts[0])), lam


def _percent_to_sigma(gmm, flow, p):
    """ModelSamplingDiscrete / ModelSamplingDiscreteFlow.percent_to_sigma."""
    if flow:
        t = 1.0 - p
        return SHIFT * t / (1 + (SHIFT - 1) * t)
    ac = gmm.schedule.alphas_cumprod
    log_sigmas = (((1 - ac) / ac) ** 0.5).log()
    t = (1.0 - p) * 999.0
    lo, hi, w = math.floor(t), math.ceil(t), t - math.floor(t)
    return math.exp((1 - w) * float(log_sigmas[lo]) + w * float(log_sigmas[hi]))


class Tape:
    """A noise source that replays a fixed list of draws (and counts them)."""

    def __init__(self, n=400, seed=11):
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(2, 2, generator=g, dtype=F64) for _ in range(n)]
        self.used = 0

    def randn(self, shape, dtype=F64, device=None):
        z = self.draws[self.used]
        self.used += 1
        return z.to(dtype)

    def __call__(self, like, t=None, t_next=None):
        return self.randn(like.shape, like.dtype)


# -- ComfyUI's comfy/k_diffusion/sa_solver.py and sample_sa_solver, transcribed ------------------


def ref_exponential_coeffs(s, t, order, tau):
    tau_mul = 1 + tau**2
    h = t - s
    p = torch.arange(order, dtype=F64)
    product_terms = t**p - s**p * (-tau_mul * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_fact = (p + 1).lgamma()
    coeff = log_fact.unsqueeze(1) - log_fact.unsqueeze(0)
    if tau > 0:
        coeff = coeff - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0).to(F64)
    return (coeff.exp() * signs).tril() @ product_terms


def ref_b_coeffs(sigma_next, lams, lam_s, lam_t, tau, simple=False, corrector=False):
    n = lams.shape[0]
    alpha_t = sigma_next * lam_t.exp()
    if simple and n == 2:
        tau_mul, h = 1 + tau**2, lam_t - lam_s
        if corrector:
            b1 = alpha_t * (0.5 * tau_mul * h)
            b2 = alpha_t * (-h * tau_mul).expm1().neg() - b1
        else:
            b2 = alpha_t * (0.5 * tau_mul * h**2) / (lams[-2] - lam_s)
            b1 = alpha_t * (-h * tau_mul).expm1().neg() - b2
        return torch.stack([b2, b1])
    ints = ref_exponential_coeffs(lam_s, lam_t, n, tau)
    return alpha_t * torch.linalg.solve(torch.vander(lams, n, increasing=True).T, ints)


def ref_sa_solver(
    D,
    x,
    sigmas,
    flow,
    start,
    end,
    eta=1.0,
    s_noise=1.0,
    noise=None,
    predictor_order=3,
    corrector_order=4,
    use_pece=False,
    simple_order_2=False,
):
    sigmas = torch.tensor(sigmas, dtype=F64)
    if flow and sigmas[0] >= 1:  # offset_first_sigma_for_snr
        sigmas[0] = _percent_flow(1e-4)
    lambdas = sigmas.logit().neg() if flow else sigmas.log().neg()

    def tau_func(sigma):
        if eta <= 0:
            return 0.0
        return eta if start >= float(sigma) >= end else 0.0

    max_order = max(predictor_order, corrector_order)
    x_pred, h, tau_t, nz, preds = x, 0.0, 0.0, 0.0, []
    lower = float(sigmas[-1]) == 0
    n = len(sigmas)
    for i in range(n - 1):
        den = D(x_pred, float(sigmas[i]))
        preds = (preds + [den])[-max_order:]
        p_used = min(predictor_order, len(preds))
        c_used = (
            0
            if i == 0 or (sigmas[i + 1] == 0 and not use_pece)
            else min(corrector_order, len(preds))
        )
        if lower:
            p_used, c_used = min(p_used, n - 2 - i), min(c_used, n - 1 - i)
        if c_used == 0:
            x = x_pred
        else:
            b = ref_b_coeffs(
                sigmas[i],
                lambdas[i - c_used + 1 : i + 1],
                lambdas[i - 1],
                lambdas[i],
                tau_t,
                simple_order_2,
                corrector=True,
            )
            res = sum(bk * pk for bk, pk in zip(b, preds[-c_used:]))
            x = sigmas[i] / sigmas[i - 1] * math.exp(-(tau_t**2) * h) * x + res
            if tau_t > 0 and s_noise > 0:
                x = x + nz
            if use_pece:
                den = D(x, float(sigmas[i]))
                preds[-1] = den
        if sigmas[i + 1] == 0:
            x = den
        else:
            tau_t = tau_func(sigmas[i + 1])
            b = ref_b_coeffs(
                sigmas[i + 1],
                lambdas[i - p_used + 1 : i + 1],
                lambdas[i],
                lambdas[i + 1],
                tau_t,
                simple_order_2,
            )
            res = sum(bk * pk for bk, pk in zip(b, preds[-p_used:]))
            h = float(lambdas[i + 1] - lambdas[i])
            x_pred = sigmas[i + 1] / sigmas[i] * math.exp(-(tau_t**2) * h) * x + res
            if tau_t > 0 and s_noise > 0:
                nz = noise() * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * tau_t**2 * h)) * s_noise
                x_pred = x_pred + nz
    return x


def _percent_flow(p):
    t = 1.0 - p
    return SHIFT * t / (1 + (SHIFT - 1) * t)


def _compare(gmm, spec, opts, flow, steps=12, seed=11, spacing="karras"):
    bound, ts, sigmas, D, c0, _ = _setup(gmm, steps, flow, spacing)
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    x = z * (1.0 if flow else sigmas[0])
    start = _percent_to_sigma(gmm, flow, opts.pop("sde_start_percent", 0.2))
    end = _percent_to_sigma(gmm, flow, opts.pop("sde_end_percent", 0.8))
    ref_tape, tape = Tape(seed=seed), Tape(seed=seed)
    noise = lambda: ref_tape.randn((2, 2))  # noqa: E731
    expect = ref_sa_solver(D, x, sigmas, flow, start, end, noise=noise, **opts)
    got = dg.sample(bound, spec, ts, x * c0, tape)
    return got, expect, tape.used, ref_tape.used


DETERMINISTIC = [
    ("sa_solver:eta=0", {"eta": 0.0}),
    ("sa_solver_pece:eta=0", {"eta": 0.0, "use_pece": True}),
    (
        "sa_solver:eta=0,predictor_order=2,corrector_order=2",
        {"eta": 0.0, "predictor_order": 2, "corrector_order": 2},
    ),
    ("sa_solver:eta=0,corrector_order=0", {"eta": 0.0, "corrector_order": 0}),
    (
        "sa_solver:eta=0,predictor_order=2,corrector_order=1,simple_order_2=True",
        {"eta": 0.0, "predictor_order": 2, "corrector_order": 1, "simple_order_2": True},
    ),
]
STOCHASTIC = [
    ("sa_solver", {}),
    ("sa_solver_pece", {"use_pece": True}),
    (
        "sa_solver:eta=0.7,s_noise=0.8,sde_start_percent=0,sde_end_percent=0.9",
        {"eta": 0.7, "s_noise": 0.8, "sde_start_percent": 0.0, "sde_end_percent": 0.9},
    ),
    (
        "sa_solver:predictor_order=2,corrector_order=2,simple_order_2=True",
        {"predictor_order": 2, "corrector_order": 2, "simple_order_2": True},
    ),
]


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("spec,opts", DETERMINISTIC, ids=[c[0] for c in DETERMINISTIC])
def test_deterministic_sa_solver_matches_comfyui(gmm, spec, opts, flow):
    got, expect, used, ref_used = _compare(gmm, spec, dict(opts), flow)
    assert used == ref_used == 0
    assert (got - expect).abs().max() < 1e-6, (got, expect)


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("spec,opts", STOCHASTIC, ids=[c[0] for c in STOCHASTIC])
def test_stochastic_sa_solver_matches_comfyui_with_the_same_draws(gmm, spec, opts, flow):
    got, expect, used, ref_used = _compare(gmm, spec, dict(opts), flow)
    assert used == ref_used > 0
    assert (got - expect).abs().max() < 1e-6, (got, expect)
    other, expect_other, _, _ = _compare(gmm, spec, dict(opts), flow, seed=12)
    assert (other - expect_other).abs().max() < 1e-6
    assert (other - got).abs().max() > 1e-3  # the noise matters


@pytest.mark.parametrize("spec", ["sa_solver", "sa_solver_pece:eta=0"])
def test_from_flow_time_one_as_comfyui(gmm, spec):
    """A uniform_t grid from t = 1: ComfyUI moves the first sigma to 0.01% of the way in."""
    opts = {"use_pece": "pece" in spec, "eta": 0.0 if "eta=0" in spec else 1.0}
    got, expect, used, ref_used = _compare(gmm, spec, opts, True, spacing="uniform_t")
    assert used == ref_used
    assert (got - expect).abs().max() < 1e-6, (got, expect)


def test_evaluations_per_step(gmm):
    """One a step; PECE one more on every step but the first (ComfyUI's count)."""
    for spec, nfe in (("sa_solver", 8), ("sa_solver_pece", 15)):
        bound, ts, sigmas, _, c0, _ = _setup(gmm, 8, False)
        dg.sample(bound, spec, ts, torch.ones(2, 2, dtype=F64) * sigmas[0] * c0, Tape())
        assert bound.nfe == nfe, spec


def test_runs_on_a_flow_schedule_and_converges(gmm):
    fgm = dg.GaussianMixture(gmm.means, gmm.stds, gmm.weights, gmm.labels, dg.FlowSchedule(SHIFT))
    flow = fgm.schedule
    bound = dg.guide(fgm, dg.parse_spec("guidance", "none"), torch.tensor([0, 1]))
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    grid = dg.timesteps(flow, 80, "uniform_t")
    assert float(flow.alpha(grid[0])) == 0.0
    ref = dg.sample(bound, "dpmpp_3m", dg.timesteps(flow, 500, "uniform_t"), z)
    euler = float((dg.sample(bound, "euler", grid, z) - ref).abs().max())
    for spec in ("sa_solver:eta=0", "sa_solver_pece:eta=0"):
        out = dg.sample(bound, spec, grid, z)
        assert (out - ref).abs().max() < 0.6 * euler, spec  # 0.015, 0.008 vs 0.030
    for spec in ("sa_solver", "sa_solver_pece"):
        assert torch.isfinite(dg.sample(bound, spec, grid, z, dg.SeededNoise(SEEDS))).all()


@pytest.mark.parametrize(
    "bad", ["sa_solver:eta=-1", "sa_solver:predictor_order=0", "sa_solver:corrector_order=7"]
)
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        dg.parse_spec("sampler", bad)


# -- GITS: rows typed from ComfyUI's NOISE_LEVELS ------------------------------------------------

# NOISE_LEVELS[1.20][10 - 2], NOISE_LEVELS[0.85][5 - 2] and NOISE_LEVELS[1.45][-1] (20 steps)
ROW_120_10 = [
    14.61464119,
    5.85520077,
    2.84484982,
    1.67050016,
    1.08895338,
    0.74807048,
    0.50118381,
    0.32104823,
    0.19894916,
    0.09824532,
    0.02916753,
]
ROW_085_5 = [14.61464119, 11.54541874, 7.11996698, 3.07277966, 1.24153244, 0.02916753]
ROW_145_20 = [
    14.61464119,
    2.84484982,
    1.56271636,
    1.01931262,
    0.74807048,
    0.59516323,
    0.50118381,
    0.43325692,
    0.38853383,
    0.36617002,
    0.34370604,
    0.32104823,
    0.29807833,
    0.27464288,
    0.25053367,
    0.22545385,
    0.19894916,
    0.17026083,
    0.13792117,
    0.09824532,
    0.02916753,
]


def _loglinear_interp(t_steps, num_steps):  # nodes_gits.py
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    new_ys = np.interp(np.linspace(0, 1, num_steps), xs, ys)
    return np.exp(new_ys)[::-1].copy()


def _gits_node(row, steps, denoise=1.0):  # GITSScheduler.execute after the table look-up
    total = steps if denoise >= 1.0 else round(steps * denoise)
    sig = list(row) if steps <= 20 else list(_loglinear_interp(row, steps + 1))
    sig = sig[-(total + 1) :]
    sig[-1] = 0
    return torch.FloatTensor(sig).double()


@pytest.mark.parametrize(
    "coeff,steps,denoise,row",
    [
        (1.20, 10, 1.0, ROW_120_10),
        (0.85, 5, 1.0, ROW_085_5),
        (1.45, 20, 1.0, ROW_145_20),
        (1.45, 33, 1.0, ROW_145_20),  # interpolated from the 20-step row
        (1.20, 10, 0.45, ROW_120_10),
        (1.45, 27, 0.6, ROW_145_20),
    ],
)
def test_gits_sigmas_match_comfyui(coeff, steps, denoise, row):
    got = torch.tensor(gits_sigmas(steps, coeff, denoise), dtype=F64)
    expect = _gits_node(row, steps, denoise)
    assert got.shape == expect.shape and got[-1] == 0
    assert (got - expect).abs().max() < 1e-6, (got, expect)


def test_gits_default_and_refusals():
    assert gits_sigmas(10) == gits_sigmas(10, 1.2)
    assert len(gits_sigmas(7, 0.8)) == 8 and gits_sigmas(3, 1.0, 0.0) == []
    for bad in ({"coeff": 1.23}, {"coeff": 0.75}, {"steps": 0}, {"steps": 2.0}):
        with pytest.raises(ValueError):
            gits_sigmas(**{"steps": 10, **bad})


def test_gits_is_a_spacing_on_vp_models_only():
    """spacing="gits" gives the table's levels (then the data end) on SD's table; flows refuse."""
    import diffguide as dg
    from diffguide.core.gits import gits_sigmas

    sd = dg.VPSchedule.from_betas()
    ts = dg.timesteps(sd, 10, "gits")
    levels = [float(sd.ve(t)) for t in ts[:-1]]
    assert levels == pytest.approx(gits_sigmas(10, 1.20)[:-1], rel=1e-6)
    with pytest.raises(ValueError, match="no.* for a flow schedule|none for a flow"):
        dg.timesteps(dg.FlowSchedule(shift=3.0), 10, "gits")

"""The samplers A1111 and ComfyUI users pick (issue 24), each against an independent reference on
the closed-form Gaussian mixture: transcriptions of k-diffusion's sample_lms, sample_dpm_2 and
sample_dpm_2_ancestral (VE sigmas, a denoiser D(x, sigma)); diffusers' own schedulers in a plain
loop
are in test_parity.py. CFG++ runs on each and, with equal conditional and unconditional predictions,
gives exactly the sampler's own result."""

import math

import numpy as np
import pytest
import torch

import diffguide as dg

SEEDS = [5, 6]


def _setup(gmm, steps):
    sc = gmm.schedule
    ts = dg.timesteps(sc, steps, "karras")
    sigmas = [float(sc.ve(t)) for t in ts]
    labels = torch.tensor([0, 2])

    def D(xt, sigma):  # k-diffusion's denoiser: x~ in VE coordinates at level sigma
        if sigma == 0:
            return xt
        t = sc.t_of_ve(torch.tensor(sigma, dtype=torch.float64))
        return gmm(float(sc.alpha(t)) * xt, t, labels).x0

    return sc, ts, sigmas, labels, D


def _lms_coeff(order, t, i, j):
    """k-diffusion's linear_multistep_coeff, with the Lagrange basis integrated exactly."""
    nodes = [t[i - k] for k in range(order)]
    p = np.poly1d([1.0])
    for k, tk in enumerate(nodes):
        if k != j:
            p = p * np.poly1d([1.0, -tk]) / (nodes[j] - tk)
    q = p.integ()
    return q(t[i + 1]) - q(t[i])


def ref_lms(D, x, sigmas, order=4):
    ds = []
    for i in range(len(sigmas) - 1):
        den = D(x, sigmas[i])
        ds.append((x - den) / sigmas[i])
        ds = ds[-order:]
        cur = min(i + 1, order)
        coeffs = [_lms_coeff(cur, sigmas, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def ref_ipndm(D, x, sigmas, order=4):
    """k-diffusion's sample_ipndm."""
    ds = []
    for i in range(len(sigmas) - 1):
        d = (x - D(x, sigmas[i])) / sigmas[i]
        k = min(order, i + 1)
        w = {
            1: [1],
            2: [3 / 2, -1 / 2],
            3: [23 / 12, -16 / 12, 5 / 12],
            4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
        }[k]
        hist = [d] + ds[::-1][: k - 1]
        x = x + (sigmas[i + 1] - sigmas[i]) * sum(c * v for c, v in zip(w, hist))
        ds = (ds + [d])[-(order - 1) :]
    return x


def _ancestral(s, s1, eta):
    if not eta:
        return s1, 0.0
    up = min(s1, eta * math.sqrt(s1**2 * (s**2 - s1**2) / s**2))
    return math.sqrt(s1**2 - up**2), up


def ref_dpm2(D, x, sigmas, eta=0.0, noise=None):
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        down, up = _ancestral(s, sigmas[i + 1], eta)
        d = (x - D(x, s)) / s
        if down == 0:
            x = x + d * (down - s)
        else:
            mid = math.exp(0.5 * (math.log(s) + math.log(down)))
            x2 = x + d * (mid - s)
            d2 = (x2 - D(x2, mid)) / mid
            x = x + d2 * (down - s)
        if up > 0:
            x = x + noise.randn(x.shape).double() * up
    return x


@pytest.mark.parametrize(
    "spec,ref",
    [
        ("lms", ref_lms),
        ("lms:order=2", lambda D, x, s: ref_lms(D, x, s, 2)),
        ("dpm2", ref_dpm2),
        ("ipndm", ref_ipndm),
    ],
)
def test_deterministic_samplers_match_k_diffusion(gmm, spec, ref):
    sc, ts, sigmas, labels, D = _setup(gmm, 12)
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expect = ref(D, z * sigmas[0], sigmas)
    got = dg.sample(_bound(gmm, labels), spec, ts, z * sigmas[0] * float(sc.alpha(ts[0])))
    assert (got - expect).abs().max() < 1e-5, (got, expect)


def _bound(gmm, labels):
    return dg.guide(gmm, dg.parse_spec("guidance", "none"), labels)


def ref_restart(D, x, sigmas, rmin, rmax, rsteps, rtimes, noise):
    """Restart sampling (Xu et al. 2023, Alg. 1) as ComfyUI's sample_restart runs it, with the
    restart interval [the grid level that reaches rmin, rmax] and Karras levels inside it."""

    def heun(x, s, s1):
        d = (x - D(x, s)) / s
        if s1 == 0:
            return x + d * (s1 - s)
        x2 = x + d * (s1 - s)
        return x + 0.5 * (d + (x2 - D(x2, s1)) / s1) * (s1 - s)

    for i in range(len(sigmas) - 1):
        x = heun(x, sigmas[i], sigmas[i + 1])
        if sigmas[i] > rmin >= sigmas[i + 1] > 0:
            ramp = torch.linspace(0, 1, rsteps, dtype=torch.float64)
            lv = (rmax ** (1 / 7) + ramp * (sigmas[i + 1] ** (1 / 7) - rmax ** (1 / 7))) ** 7
            for _ in range(rtimes):
                x = x + noise.randn(x.shape).double() * math.sqrt(rmax**2 - sigmas[i + 1] ** 2)
                for k in range(rsteps - 1):
                    x = heun(x, float(lv[k]), float(lv[k + 1]))
    return x


def test_restart_matches_the_papers_algorithm(gmm):
    sc, ts, sigmas, labels, D = _setup(gmm, 14)
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expect = ref_restart(D, z * sigmas[0], sigmas, 0.5, 3.0, 5, 2, dg.SeededNoise(SEEDS))
    bound = _bound(gmm, labels)
    got = dg.sample(
        bound,
        "restart:restart_min=0.5,restart_max=3.0,restart_steps=5,restart_times=2",
        ts,
        z * sigmas[0] * float(sc.alpha(ts[0])),
        dg.SeededNoise(SEEDS),
    )
    assert (got - expect).abs().max() < 1e-5
    plain = dg.sample(bound, "heun", ts, z * sigmas[0] * float(sc.alpha(ts[0])))
    assert (got - plain).abs().max() > 1e-3  # the restarts did something
    with pytest.raises(ValueError, match="restart_min < restart_max"):
        dg.parse_spec("sampler", "restart:restart_min=3,restart_max=2")


def ref_dpmpp_sde(D, x, sigmas, tree, eta=1.0, r=0.5):
    """k-diffusion's sample_dpmpp_sde, its noise_sampler(sigma, sigma_next) the same Brownian
    tree."""
    for i in range(len(sigmas) - 1):
        den = D(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + (x - den) / sigmas[i] * (0 - sigmas[i])
            continue
        t, tn = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
        h = tn - t
        s = t + h * r
        sd, su = _ancestral(math.exp(-t), math.exp(-s), eta)
        x2 = (sd / math.exp(-t)) * x - math.expm1(t + math.log(sd)) * den
        x2 = x2 + tree.increment(math.exp(-t), math.exp(-s)) * su
        den2 = D(x2, math.exp(-s))
        sd, su = _ancestral(math.exp(-t), math.exp(-tn), eta)
        dd = (1 - 1 / (2 * r)) * den + 1 / (2 * r) * den2
        x = (sd / math.exp(-t)) * x - math.expm1(t + math.log(sd)) * dd
        x = x + tree.increment(math.exp(-t), math.exp(-tn)) * su
    return x


def test_dpmpp_sde_matches_k_diffusion_with_the_same_brownian_noise(gmm):
    import struct

    from diffguide.core.sample import BrownianTree

    sc, ts, sigmas, labels, D = _setup(gmm, 10)
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    first = dg.SeededNoise(SEEDS).randn(
        (2, 2), torch.float64
    )  # the draw the sampler turns into the trees' seeds
    seeds = [int.from_bytes(struct.pack("<d", float(v)), "little") for v in first[:, 0].double()]
    tree = BrownianTree(seeds, float(sc.sigma_min), float(sc.sigma_max), (2,))
    expect = ref_dpmpp_sde(D, z * sigmas[0], sigmas, tree)
    got = dg.sample(
        _bound(gmm, labels),
        "dpmpp_sde",
        ts,
        z * sigmas[0] * float(sc.alpha(ts[0])),
        dg.SeededNoise(SEEDS),
    )
    assert (got - expect).abs().max() < 1e-5


def test_brownian_tree_is_a_brownian_motion_fixed_by_its_seed():
    from diffguide.core.sample import BrownianTree

    tree = BrownianTree(list(range(4000)), 0.0, 4.0, ())
    w1, w2, w3 = tree(1.0), tree(2.5), tree(4.0)
    assert (
        abs(float(w1.var()) - 1.0) < 0.08 and abs(float((w2 - w1).var()) - 1.5) < 0.12
    )  # Var W(t) = t
    assert (
        abs(float(torch.corrcoef(torch.stack([w1, w2 - w1]))[0, 1])) < 0.05
    )  # independent increments
    assert abs(float(w3.var()) - 4.0) < 0.3
    again = BrownianTree(list(range(4000)), 0.0, 4.0, ())
    assert torch.equal(again(2.5), w2) and torch.equal(
        again(1.0), w1
    )  # any order, any other queries
    inc = tree.increment(1.0, 2.5)
    torch.testing.assert_close(inc, (w2 - w1) / math.sqrt(1.5))


def test_dpm2_ancestral_matches_k_diffusion(gmm):
    sc, ts, sigmas, labels, D = _setup(gmm, 10)
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expect = ref_dpm2(D, z * sigmas[0], sigmas, eta=1.0, noise=dg.SeededNoise(SEEDS))
    got = dg.sample(
        _bound(gmm, labels),
        "dpm2_ancestral",
        ts,
        z * sigmas[0] * float(sc.alpha(ts[0])),
        dg.SeededNoise(SEEDS),
    )
    assert (got - expect).abs().max() < 1e-5


@pytest.mark.parametrize(
    "spec",
    [
        "lms",
        "dpm2",
        "dpm2_ancestral",
        "unipc",
        "unipc:order=3,solver_type=bh1",
        "plms",
        "tcd",
        "deis",
        "restart",
        "dpmpp_sde",
        "dpmpp_2s_singlestep",
        "deis:order=3",
        "ipndm",
        # ComfyUI's samplers (samplers/comfy.py) and SA-Solver
        "res_multistep",
        "res_multistep_ancestral",
        "gradient_estimation",
        "heunpp2",
        "heunpp2:churn=3",
        "exp_heun_2_x0",
        "exp_heun_2_x0_sde",
        "er_sde",
        "seeds_2",
        "seeds_2:solver_type=phi_2",
        "seeds_3",
        "sa_solver",
        "sa_solver_pece",
        "sa_solver:simple_order_2=True",
    ],
)
def test_cfgpp_with_equal_branches_is_the_sampler(gmm, spec):
    sc = gmm.schedule
    ts = dg.timesteps(sc, 8, "karras")
    labels = torch.tensor([1, 3])
    z = (
        torch.randn(2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        * float(sc.ve(ts[0]))
        * float(sc.alpha(ts[0]))
    )
    plain = dg.sample(
        dg.guide(gmm, dg.parse_spec("guidance", "none"), labels, labels),
        spec,
        ts,
        z,
        dg.SeededNoise(SEEDS),
    )
    cfgpp = dg.sample(
        dg.guide(gmm, dg.parse_spec("guidance", "cfgpp:scale=0.6"), labels, labels),
        spec,
        ts,
        z,
        dg.SeededNoise(SEEDS),
    )
    assert torch.allclose(plain, cfgpp, atol=1e-9)


def test_lms_on_a_flow_schedule_converges_at_high_order(gmm):
    """In flow coordinates (dy/ds = eps - x0) LMS converges to the ODE's solution (a 2000-step
    DPM-Solver++(3M) run), its error falling more than 8x when the steps double."""
    flow = dg.FlowSchedule(shift=2.0)
    fgm = dg.GaussianMixture(gmm.means, gmm.stds, gmm.weights, gmm.labels, flow)
    bound = _bound(fgm, torch.tensor([0, 1]))
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = dg.sample(bound, "dpmpp_3m", dg.timesteps(flow, 2000, "uniform_t"), z)
    e40, e80 = (
        float((dg.sample(bound, "lms", dg.timesteps(flow, n, "uniform_t"), z) - ref).abs().max())
        for n in (40, 80)
    )
    assert e80 < 1e-3 and e80 < e40 / 8, (e40, e80)
    with pytest.raises(ValueError, match="order must be an integer"):
        dg.parse_spec("sampler", "lms:order=0")


# -- a diffusers folder's scheduler decides the sampler (pipeline parity: test_pipelines.py's
# default cases)


@pytest.mark.parametrize("name", ["SASolverScheduler"])
def test_schedulers_without_a_sampler_say_so(name):
    from diffguide.pipelines import GuidedPipeline
    from diffguide.pipelines import tiny as tm

    gp = GuidedPipeline.from_pipe(tm.sd(scheduler=name), progress=False)
    out = gp("a red circle", steps=3, seed=0, output_type="np")
    assert out.notices == [
        f"{name} has no diffguide sampler yet; sampling with dpmpp_2m on its grid"
    ]
    assert gp("a red circle", steps=3, seed=0, sampler="euler", output_type="np").notices == []


@pytest.mark.parametrize(
    "name,cfg,expect",
    [
        ("DPMSolverMultistepScheduler", {}, ("dpmpp_2m", None)),
        ("DPMSolverMultistepScheduler", {"solver_order": 3}, ("dpmpp_3m_published", None)),
        (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++"},
            ("dpmpp_2m_sde", None),
        ),
        (
            "DPMSolverMultistepScheduler",
            {"solver_type": "heun", "euler_at_final": True},
            ("dpmpp_2m:solver_type=heun,euler_at_final=True", None),
        ),
        ("EulerAncestralDiscreteScheduler", {}, ("euler_ancestral", None)),
        ("KDPM2AncestralDiscreteScheduler", {}, ("dpm2_ancestral", None)),
        ("DDPMScheduler", {}, ("ddim:eta=1", None)),
        ("UniPCMultistepScheduler", {}, ("unipc", None)),
        ("PNDMScheduler", {"skip_prk_steps": True}, ("plms", None)),
        ("DEISMultistepScheduler", {"solver_order": 3}, ("deis:order=3", None)),
        ("DPMSolverSinglestepScheduler", {}, ("dpmpp_2s_singlestep", None)),
        (
            "UniPCMultistepScheduler",
            {"solver_order": 3, "solver_type": "bh1", "disable_corrector": [0, 2]},
            ("unipc:order=3,solver_type=bh1,disable_corrector=0|2", None),
        ),
    ],
)
def test_scheduler_to_sampler_map(name, cfg, expect):
    from diffguide.pipelines.schedulers import own_sampler

    assert own_sampler(name, cfg) == expect
    dg.parse_spec("sampler", expect[0])  # a valid spec
    sampler, notice = own_sampler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"})
    assert sampler == "dpmpp_2m" and "algorithm_type 'dpmsolver'" in notice


# -- the schedules (spacings) ComfyUI and k-diffusion users pick -----------------------------------


def test_new_spacings_follow_their_formulas(sd):
    n, ve = 12, lambda ts: sd.ve(ts[:-1])
    lo, hi = sd.sigma_min, sd.sigma_max
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** 2.0
    expect = torch.exp(
        ramp * (math.log(hi) - math.log(lo)) + math.log(lo)
    )  # k-diffusion polyexponential, rho 2
    torch.testing.assert_close(
        ve(dg.timesteps(sd, n, "polyexponential", rho=2.0)), expect, rtol=1e-9, atol=0
    )
    w = torch.arange(n, dtype=torch.float64) / (n - 1)  # ComfyUI kl_optimal
    expect = torch.tan(w * math.atan(lo) + (1 - w) * math.atan(hi))
    torch.testing.assert_close(ve(dg.timesteps(sd, n, "kl_optimal")), expect, rtol=1e-9, atol=0)
    T = (
        sd.num_train_timesteps
    )  # ComfyUI simple: ss = len(sigmas) / steps; sigmas[-(1 + int(x * ss))]
    table = sd.ve(torch.arange(T, dtype=torch.float64))
    expect = torch.stack([table[-(1 + int(x * (T / n)))] for x in range(n)])
    torch.testing.assert_close(ve(dg.timesteps(sd, n, "simple")), expect, rtol=1e-12, atol=0)
    ts = dg.timesteps(
        sd, n, "sgm_uniform"
    )  # ComfyUI sgm_uniform: indices linspace(T - 1, 0, n + 1)[:-1],
    idx = torch.linspace(T - 1, 0, n + 1, dtype=torch.float64)[
        :-1
    ]  # levels log-linear between entries
    low = idx.floor().long().clamp(max=T - 2)
    w = idx - low
    expect = torch.exp((1 - w) * table[low].log() + w * table[low + 1].log())
    torch.testing.assert_close(ve(ts), expect, rtol=1e-12, atol=0)
    assert float(ts[-1]) == sd.t_min


def test_ays_tables_and_their_interpolation(sd):
    from diffguide.core.spacing import AYS_LEVELS

    for model in ("sd1", "sdxl"):
        got = sd.ve(dg.timesteps(sd, 10, "ays", model=model)[:-1])
        torch.testing.assert_close(
            got, torch.tensor(AYS_LEVELS[model][:-1], dtype=torch.float64), rtol=1e-6, atol=0
        )
    t20 = sd.ve(dg.timesteps(sd, 20, "ays")[:-1])
    levels = AYS_LEVELS["sd1"]
    # 21 log-linear points on the 11-point table: every other one is a table level, the others
    # geometric means
    torch.testing.assert_close(
        t20[::2], torch.tensor(levels[:-1], dtype=torch.float64), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        t20[1],
        torch.tensor(math.sqrt(levels[0] * levels[1]), dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )
    with pytest.raises(ValueError, match="tables for sd1, sdxl"):
        dg.timesteps(sd, 10, "ays", model="svd3")


def test_every_new_sampler_runs_on_a_flow_schedule_and_new_spacings_on_flow(gmm):
    flow = dg.FlowSchedule(shift=3.0)
    fgm = dg.GaussianMixture(gmm.means, gmm.stds, gmm.weights, gmm.labels, flow)
    bound = _bound(fgm, torch.tensor([0, 1]))
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = dg.sample(bound, "dpmpp_3m", dg.timesteps(flow, 500, "uniform_t"), z)
    for spec in ("lms", "dpm2", "unipc", "plms", "ipndm"):
        out = dg.sample(bound, spec, dg.timesteps(flow, 60, "uniform_t"), z)
        assert (out - ref).abs().max() < 0.02, spec  # dpmpp_2m: 0.011 here
    for spacing in ("simple", "sgm_uniform", "kl_optimal", "polyexponential"):
        out = dg.sample(bound, "dpmpp_2m", dg.timesteps(flow, 30, spacing), z)
        assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.1, spacing


def test_list_shows_the_new_samplers_and_spacings_with_options(capsys):
    from diffguide.cli.main import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "unipc",
        "deis",
        "lms",
        "plms",
        "ipndm",
        "dpm2",
        "dpm2_ancestral",
        "tcd",
        "restart",
        "dpmpp_sde",
    ):
        assert f"  {name} " in out, name
    assert "options: order=2, solver_type=bh2" in out and "options: gamma=0.3" in out
    spacings = out.split("spacings (--spacing, spacing=):")[1]
    for name in ("ays", "kl_optimal", "sgm_uniform", "simple", "polyexponential"):
        assert f"  {name} " in spacings, name
    assert "options: model" in spacings and "options: rho, sigma_min, sigma_max" in spacings


def test_deis_on_sigma_grids_says_where_it_differs_from_diffusers():
    import diffusers

    from diffguide.pipelines.schedulers import from_scheduler

    info = from_scheduler(diffusers.DEISMultistepScheduler(use_karras_sigmas=True))
    assert info.sampler == "deis" and "zero-length step" in info.notice
    assert from_scheduler(diffusers.DEISMultistepScheduler()).notice is None

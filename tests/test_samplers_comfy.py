"""ComfyUI's own samplers (res_multistep, gradient_estimation, heunpp2, exp_heun_2_x0, er_sde,
seeds_2, seeds_3), each against an independent transcription of its comfy/k_diffusion/sampling.py
function on the closed-form Gaussian mixture, as ComfyUI runs it: on a VP model in VE coordinates
(sigma the VE level, x / a), on a flow (CONST) model with sigma the flow time and its half log-SNR.
Stochastic samplers get the same draws from a noise source that replays a fixed list."""

import math

import pytest
import torch

import diffguide as dg
from helpers import Tape, comfy_setup, flow_mixture, k_ancestral_step

F64 = torch.float64
SEEDS = [5, 6]


# -- references: ComfyUI's functions transcribed (sigmas a list, D(x, sigma) the model) ------------


def ref_res_multistep(D, x, sigmas, eta=0.0, s_noise=1.0, noise=None, **_):
    """res_multistep (ComfyUI draws a zero-weighted sample when eta = 0: not drawn here)."""
    old = old_down = None
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        den = D(x, s)
        down, up = k_ancestral_step(s, s1, eta)
        if down == 0 or old is None:
            x = x + (x - den) / s * (down - s)
        else:
            t, t_old, t_next = -math.log(s), -math.log(old_down), -math.log(down)
            t_prev = -math.log(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            x = math.exp(-h) * x + h * (b1 * den + b2 * old)
        if s1 > 0 and up > 0:
            x = x + noise() * s_noise * up
        old, old_down = den, down
    return x


def ref_gradient_estimation(D, x, sigmas, ge_gamma=2.0, **_):
    old_d = None
    for i in range(len(sigmas) - 1):
        den = D(x, sigmas[i])
        d = (x - den) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = den
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def ref_heunpp2(D, x, sigmas, churn=0.0, s_tmin=0.0, s_tmax=math.inf, noise=None, **_):
    end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        ok = s_tmin <= sigmas[i] <= s_tmax
        gamma = min(churn / (len(sigmas) - 1), 2**0.5 - 1) if ok else 0.0
        hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + noise() * (hat**2 - sigmas[i] ** 2) ** 0.5
        d = (x - D(x, hat)) / hat
        dt = sigmas[i + 1] - hat
        if sigmas[i + 1] == end:
            x = x + d * dt
            continue
        x2 = x + d * dt
        d2 = (x2 - D(x2, sigmas[i + 1])) / sigmas[i + 1]
        if sigmas[i + 2] == end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d2 * w2) * dt
            continue
        x3 = x2 + d2 * (sigmas[i + 2] - sigmas[i + 1])
        d3 = (x3 - D(x3, sigmas[i + 2])) / sigmas[i + 2]
        w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
        x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d3) * dt
    return x


def ref_seeds_2(D, x, sigmas, lam, sig, eta=1.0, s_noise=1.0, r=0.5, solver="phi_1", noise=None):
    inject = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        den = D(x, s)
        if s1 == 0:
            x = den
            continue
        ls, lt = lam(s), lam(s1)
        h = lt - ls
        he = h * (eta + 1)
        l1 = ls + r * (lt - ls)
        sg1 = sig(l1)
        a1, at = sg1 * math.exp(l1), s1 * math.exp(lt)
        x2 = sg1 / s * math.exp(-r * h * eta) * x - a1 * math.expm1(-r * he) * den
        if inject:
            n = math.sqrt(-math.expm1(-2 * r * h * eta)) * noise()
            x2 = x2 + n * sg1 * s_noise
        den2 = D(x2, sg1)
        if solver == "phi_1":
            dd = den + (den2 - den) / (2 * r)
            x = s1 / s * math.exp(-h * eta) * x - at * math.expm1(-he) * dd
        else:
            b2 = (math.expm1(-he) + he) / -he / r
            b1 = math.expm1(-he) - b2
            x = s1 / s * math.exp(-h * eta) * x - at * (b1 * den + b2 * den2)
        if inject:
            seg = (r - 1) * h * eta
            n = n * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * noise()
            x = x + n * s1 * s_noise
    return x


def ref_seeds_3(D, x, sigmas, lam, sig, eta=1.0, s_noise=1.0, r1=1 / 3, r2=2 / 3, noise=None):
    inject = eta > 0 and s_noise > 0

    def p1(z):
        return math.expm1(z)

    def p2(z):
        return (math.expm1(z) - z) / z

    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        den = D(x, s)
        if s1 == 0:
            x = den
            continue
        ls, lt = lam(s), lam(s1)
        h = lt - ls
        he = h * (eta + 1)
        l1, l2 = ls + r1 * (lt - ls), ls + r2 * (lt - ls)
        g1, g2 = sig(l1), sig(l2)
        a1, a2, at = g1 * math.exp(l1), g2 * math.exp(l2), s1 * math.exp(lt)
        x2 = g1 / s * math.exp(-r1 * h * eta) * x - a1 * p1(-r1 * he) * den
        if inject:
            n = math.sqrt(-math.expm1(-2 * r1 * h * eta)) * noise()
            x2 = x2 + n * g1 * s_noise
        den2 = D(x2, g1)
        a32 = r2 / r1 * p2(-r2 * he)
        a31 = p1(-r2 * he) - a32
        x3 = g2 / s * math.exp(-r2 * h * eta) * x - a2 * (a31 * den + a32 * den2)
        if inject:
            seg = (r1 - r2) * h * eta
            n = n * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * noise()
            x3 = x3 + n * g2 * s_noise
        den3 = D(x3, g2)
        b3 = p2(-he) / r2
        b1 = p1(-he) - b3
        x = s1 / s * math.exp(-h * eta) * x - at * (b1 * den + b3 * den3)
        if inject:
            seg = (r2 - 1) * h * eta
            n = n * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * noise()
            x = x + n * s1 * s_noise
    return x


def ref_er_sde(D, x, sigmas, lam, s_noise=1.0, max_stage=3, noise=None):
    def scale(v):
        return v * (math.exp(v**0.3) + 10.0)

    ers = [math.exp(-lam(s)) for s in sigmas]  # sigma / alpha
    old = old_d = None
    for i in range(len(sigmas) - 1):
        den = D(x, sigmas[i])
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = den
        else:
            es, et = ers[i], ers[i + 1]
            a_s, a_t = sigmas[i] / es, sigmas[i + 1] / et
            r = scale(et) / scale(es)
            x = a_t / a_s * r * x + a_t * (1 - r) * den
            if stage >= 2:
                dt = et - es
                step = -dt / 200
                pos = [et + k * step for k in range(200)]
                sm = sum(1 / scale(p) for p in pos) * step
                dd = (den - old) / (es - ers[i - 1])
                x = x + a_t * (dt + sm * scale(et)) * dd
                if stage >= 3:
                    su = sum((p - es) / scale(p) for p in pos) * step
                    du = (dd - old_d) / ((es - ers[i - 2]) / 2)
                    x = x + a_t * (dt**2 / 2 + su * scale(et)) * du
                old_d = dd
            if s_noise > 0:
                std = math.sqrt(max(et**2 - es**2 * r**2, 0.0))
                x = x + a_t * noise() * s_noise * std
        old = den
    return x


def _ref(name, D, x, sigmas, lam, sig, noise, **opts):
    if name.startswith("seeds_2") or name.startswith("exp_heun"):
        return ref_seeds_2(D, x, sigmas, lam, sig, noise=noise, **opts)
    if name == "seeds_3":
        return ref_seeds_3(D, x, sigmas, lam, sig, noise=noise, **opts)
    if name == "er_sde":
        return ref_er_sde(D, x, sigmas, lam, noise=noise, **opts)
    refs = {
        "res_multistep": ref_res_multistep,
        "gradient_estimation": ref_gradient_estimation,
        "heunpp2": ref_heunpp2,
    }
    return refs[name](D, x, sigmas, noise=noise, **opts)


# (diffguide spec, ComfyUI function, its arguments)
DETERMINISTIC = [
    ("res_multistep", "res_multistep", {}),
    ("gradient_estimation", "gradient_estimation", {}),
    ("gradient_estimation:ge_gamma=2.5", "gradient_estimation", {"ge_gamma": 2.5}),
    ("heunpp2", "heunpp2", {}),
    ("exp_heun_2_x0", "exp_heun", {"eta": 0.0, "s_noise": 0.0, "r": 1.0, "solver": "phi_2"}),
    (
        "exp_heun_2_x0:solver_type=phi_1",
        "exp_heun",
        {"eta": 0.0, "s_noise": 0.0, "r": 1.0, "solver": "phi_1"},
    ),
    ("seeds_2:eta=0", "seeds_2", {"eta": 0.0}),  # the eta = 0 limits: deterministic
    ("seeds_2:eta=0,r=0.3,solver_type=phi_2", "seeds_2", {"eta": 0.0, "r": 0.3, "solver": "phi_2"}),
    ("seeds_3:eta=0", "seeds_3", {"eta": 0.0}),
    ("er_sde:s_noise=0", "er_sde", {"s_noise": 0.0}),
    ("res_multistep_ancestral:eta=0", "res_multistep", {}),
]
STOCHASTIC = [
    ("res_multistep_ancestral", "res_multistep", {"eta": 1.0}),
    ("res_multistep_ancestral:eta=0.5,s_noise=0.8", "res_multistep", {"eta": 0.5, "s_noise": 0.8}),
    ("er_sde", "er_sde", {}),
    ("er_sde:max_stage=2,s_noise=0.7", "er_sde", {"max_stage": 2, "s_noise": 0.7}),
    ("seeds_2", "seeds_2", {}),
    (
        "seeds_2:solver_type=phi_2,eta=0.6,r=0.4",
        "seeds_2",
        {"solver": "phi_2", "eta": 0.6, "r": 0.4},
    ),
    ("seeds_3", "seeds_3", {}),
    ("seeds_3:s_noise=0.5,r_1=0.25,r_2=0.5", "seeds_3", {"s_noise": 0.5, "r1": 0.25, "r2": 0.5}),
    ("exp_heun_2_x0_sde", "exp_heun", {"r": 1.0, "solver": "phi_2"}),
    ("heunpp2:churn=2,s_tmax=3", "heunpp2", {"churn": 2.0, "s_tmax": 3.0}),
]
NEW = [
    "res_multistep",
    "res_multistep_ancestral",
    "gradient_estimation",
    "heunpp2",
    "exp_heun_2_x0",
    "exp_heun_2_x0_sde",
    "er_sde",
    "seeds_2",
    "seeds_3",
]


def _compare(gmm, spec, name, opts, flow, steps=12, seed=11):
    bound, ts, sigmas, D, c0, lam, sig = comfy_setup(gmm, steps, flow)
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    x = z * sigmas[0]
    ref_tape, tape = Tape(seed=seed), Tape(seed=seed)
    expect = _ref(name, D, x, sigmas, lam, sig, lambda: ref_tape.randn((2, 2)), **opts)
    got = dg.sample(bound, spec, ts, x * c0, tape)
    return got, expect, tape.used, ref_tape.used


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("spec,name,opts", DETERMINISTIC, ids=[c[0] for c in DETERMINISTIC])
def test_deterministic_samplers_match_comfyui(gmm, spec, name, opts, flow):
    got, expect, used, ref_used = _compare(gmm, spec, name, opts, flow)
    assert used == ref_used == 0
    assert (got - expect).abs().max() < 1e-6, (got, expect)


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("spec,name,opts", STOCHASTIC, ids=[c[0] for c in STOCHASTIC])
def test_stochastic_samplers_match_comfyui_with_the_same_draws(gmm, spec, name, opts, flow):
    if flow and "churn" in spec:
        pytest.skip("churn raises the VE level (EDM's rule); ComfyUI raises the flow time")
    got, expect, used, ref_used = _compare(gmm, spec, name, opts, flow)
    assert used == ref_used > 0  # the same number of draws, in the same order
    assert (got - expect).abs().max() < 1e-6, (got, expect)
    other, expect_other, _, _ = _compare(gmm, spec, name, opts, flow, seed=12)
    assert (other - expect_other).abs().max() < 1e-6
    assert (other - got).abs().max() > 1e-3  # the noise matters


def test_the_samplers_differ_from_each_other_and_from_euler(gmm):
    bound, ts, sigmas, _, c0, _, _ = comfy_setup(gmm, 8, False)
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(4), dtype=F64) * sigmas[0] * c0
    outs = {s: dg.sample(bound, s, ts, z, Tape()) for s in ["euler", "heun", *NEW]}
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (outs[a] - outs[b]).abs().max() > 1e-4, (a, b)


def test_heunpp2_evaluates_as_comfyui_does(gmm):
    """Three evaluations a step, two on the one before the last, one on the last (the look-ahead
    evaluations are made one step later, so the count per step shifts, not the total)."""
    for steps in (1, 2, 3, 7):
        bound, ts, sigmas, _, c0, _, _ = comfy_setup(gmm, steps, False)
        dg.sample(bound, "heunpp2", ts, torch.ones(2, 2, dtype=F64) * sigmas[0] * c0)
        assert bound.nfe == (1 if steps == 1 else 3 * (steps - 2) + 3), steps


@pytest.mark.parametrize(
    "spec,nfe",
    [
        ("res_multistep", 1),
        ("gradient_estimation", 1),
        ("er_sde", 1),
        ("seeds_2", 2),
        ("exp_heun_2_x0", 2),
        ("seeds_3", 3),
    ],
)
def test_evaluations_per_step(gmm, spec, nfe):
    """As ComfyUI: the step onto sigma = 0 is one evaluation (x = denoised)."""
    bound, ts, sigmas, _, c0, _, _ = comfy_setup(gmm, 6, False)
    dg.sample(bound, spec, ts, torch.ones(2, 2, dtype=F64) * sigmas[0] * c0, Tape())
    assert bound.nfe == 5 * nfe + 1


def test_every_new_sampler_runs_on_a_flow_schedule(gmm):
    """From flow t = 1 (lambda = -inf at the first point). The deterministic ones come closer to
    the ODE's solution than Euler (0.040 at 60 steps here; gradient_estimation and heunpp2 are
    first order too, res_multistep and exp_heun_2_x0 second order)."""
    fgm = flow_mixture(gmm)
    flow = fgm.schedule
    bound = dg.guide(fgm, dg.parse_spec("guidance", "none"), torch.tensor([0, 1]))
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    grid = dg.timesteps(flow, 60, "uniform_t")
    assert float(flow.alpha(grid[0])) == 0.0
    ref = dg.sample(bound, "dpmpp_3m", dg.timesteps(flow, 500, "uniform_t"), z)
    euler = float((dg.sample(bound, "euler", grid, z) - ref).abs().max())
    for spec in NEW:
        out = dg.sample(bound, spec, grid, z, dg.SeededNoise(SEEDS))
        assert torch.isfinite(out).all(), spec
        if spec in ("res_multistep", "gradient_estimation", "heunpp2", "exp_heun_2_x0"):
            assert (out - ref).abs().max() < 0.9 * euler, spec


def test_cfgpp_changes_them(gmm):
    """With different branches CFG++ moves each (its guided x0 reaches the update)."""
    sc = gmm.schedule
    ts = dg.timesteps(sc, 8, "karras")
    labels, null = torch.tensor([1, 3]), torch.tensor([-1, -1])
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    z = z * float(sc.ve(ts[0])) * float(sc.alpha(ts[0]))
    for spec in NEW:
        a, b = (
            dg.sample(dg.guide(gmm, g, labels, null), spec, ts, z, dg.SeededNoise(SEEDS))
            for g in ("cfgpp:scale=0", "cfgpp:scale=0.8")
        )
        assert (a - b).abs().max() > 1e-3, spec


def test_cfgpp_gradient_estimation_is_comfyuis_cfg_pp_variant(gmm):
    """ComfyUI's sample_gradient_estimation_cfg_pp (VE): the slope from the unconditional x0, the
    guided x0 as the anchor, x' = D_lam + sigma' d_u + (gamma - 1)(d_u - d_u,prev)(sigma' -
    sigma)."""
    sc = gmm.schedule
    ts = dg.timesteps(sc, 10, "karras")
    sigmas = [float(sc.ve(t)) for t in ts]
    labels, null = torch.tensor([1, 3]), torch.tensor([-1, -1])

    def D(x, sigma, cond):
        t = sc.t_of_ve(torch.tensor(sigma, dtype=F64))
        return gmm(float(sc.alpha(t)) * x, t, cond).x0

    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(9), dtype=F64) * sigmas[0]
    x, old_d, lam = z, None, 0.7
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        unc = D(x, s, null)
        den = unc + lam * (D(x, s, labels) - unc)
        d = (x - unc) / s
        if s1 == 0:
            x = den
        else:
            x = den + d * s1
            if i >= 1:
                x = x + (d - old_d) * (s1 - s)
        old_d = d
    bound = dg.guide(gmm, dg.parse_spec("guidance", f"cfgpp:scale={lam}"), labels, null)
    got = dg.sample(bound, "gradient_estimation", ts, z * float(sc.alpha(ts[0])))
    assert (got - x).abs().max() < 1e-6


def test_list_shows_them_with_their_options(capsys):
    from diffguide.cli.main import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in NEW:
        assert f"  {name} " in out, name
    for opts in (
        "options: ge_gamma=2.0",
        "options: s_noise=1.0, max_stage=3",
        "options: eta=1.0, s_noise=1.0, r=0.5, solver_type=phi_1",
        "options: solver_type=phi_2",
    ):
        assert opts in out, opts


@pytest.mark.parametrize(
    "spec,match",
    [
        ("er_sde:max_stage=4", "max_stage must be 1, 2 or 3"),
        ("seeds_2:solver_type=phi_3", "unknown solver_type"),
        ("seeds_2:r=0", "r must be in"),
        ("seeds_2:eta=-1", "eta must be >= 0"),
        ("seeds_3:r_1=0.7", "need 0 < r_1 < r_2 <= 1"),
        ("res_multistep_ancestral:eta=-0.5", "eta must be >= 0"),
        ("exp_heun_2_x0:solver_type=x", "unknown solver_type"),
    ],
)
def test_bad_options_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        dg.parse_spec("sampler", spec)

"""dpm_fast and dpm_adaptive against an independent transcription of k-diffusion's DPMSolver
(dpm_solver_fast, dpm_solver_adaptive, PIDStepSizeController) as ComfyUI's sample_dpm_fast and
sample_dpm_adaptive call it: sigma_max = sigmas[0], sigma_min = the smallest nonzero sigma, n = the
step count. On the closed-form Gaussian mixture, on a VP model in VE coordinates and on a flow
(CONST) model with sigma the flow time; stochastic variants get the same draws."""

import math

import pytest
import torch

import diffguide as dg
from helpers import Tape, comfy_setup, flow_mixture, k_ancestral_step, sd_schedule

F64 = torch.float64


# -- k-diffusion's DPMSolver, transcribed (t = -log sigma; eps = (x - D) / sigma) ------------------


class RefDPMSolver:
    def __init__(self, D):
        self.D = D

    def eps(self, cache, key, x, t):
        if key not in cache:
            cache[key] = (x - self.D(x, math.exp(-t))) / math.exp(-t)
        return cache[key]

    def step_1(self, x, t, t1, cache):
        return x - math.exp(-t1) * math.expm1(t1 - t) * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t1, cache, r1=0.5):
        h, sig = t1 - t, lambda v: math.exp(-v)
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - sig(s1) * math.expm1(r1 * h) * eps
        e1 = self.eps(cache, "eps_r1", u1, s1)
        return x - sig(t1) * math.expm1(h) * eps - sig(t1) / (2 * r1) * math.expm1(h) * (e1 - eps)

    def step_3(self, x, t, t1, cache, r1=1 / 3, r2=2 / 3):
        h, sig = t1 - t, lambda v: math.exp(-v)
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - sig(s1) * math.expm1(r1 * h) * eps
        e1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (
            x
            - sig(s2) * math.expm1(r2 * h) * eps
            - sig(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - eps)
        )
        e2 = self.eps(cache, "eps_r2", u2, s2)
        return (
            x - sig(t1) * math.expm1(h) * eps - sig(t1) / r2 * (math.expm1(h) / h - 1) * (e2 - eps)
        )

    def fast(self, x, t_start, t_end, nfe, eta=0.0, s_noise=1.0, noise=None):
        m = math.floor(nfe / 3) + 1
        ts = [t_start + (t_end - t_start) * k / m for k in range(m)] + [t_end]
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        for i, order in enumerate(orders):
            cache, t, t1 = {}, ts[i], ts[i + 1]
            if eta:
                sd, su = k_ancestral_step(math.exp(-t), math.exp(-t1), eta)
                t1_ = min(t_end, -math.log(sd))
                su = (math.exp(-t1) ** 2 - math.exp(-t1_) ** 2) ** 0.5
            else:
                t1_, su = t1, 0.0
            x = [self.step_1, self.step_2, self.step_3][order - 1](x, t, t1_, cache)
            if su > 0:  # k-diffusion draws a zero-weighted sample otherwise: not drawn here
                x = x + su * s_noise * noise()
        return x

    def adaptive(self, x, t_start, t_end, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
                 pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0,
                 noise=None):  # fmt: skip
        atol, rtol = torch.tensor(atol), torch.tensor(rtol)  # float32, as k-diffusion's
        k = 1.5 if eta else order
        b1, b2, b3 = (pcoeff + icoeff + dcoeff) / k, -(pcoeff + 2 * dcoeff) / k, dcoeff / k
        h, errs, s, x_prev, info = h_init, [], t_start, x, {"nfe": 0, "n_reject": 0}
        while s < t_end - 1e-5:
            cache = {}
            t = min(t_end, s + h)
            if eta:
                sd, su = k_ancestral_step(math.exp(-s), math.exp(-t), eta)
                t_ = min(t_end, -math.log(sd))
                su = (math.exp(-t) ** 2 - math.exp(-t_) ** 2) ** 0.5
            else:
                t_, su = t, 0.0
            if order == 2:
                x_low, x_high = self.step_1(x, s, t_, cache), self.step_2(x, s, t_, cache)
            else:
                x_low = self.step_2(x, s, t_, cache, r1=1 / 3)
                x_high = self.step_3(x, s, t_, cache)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            inv = 1 / (float(error) + 1e-8)
            if not errs:
                errs = [inv, inv, inv]
            errs[0] = inv
            factor = 1 + math.atan(errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3 - 1)
            accept = factor >= accept_safety
            if accept:
                errs[2], errs[1] = errs[1], errs[0]
            h *= factor
            if accept:
                x_prev = x_low
                x = x_high + su * s_noise * noise() if su > 0 else x_high
                s = t
            else:
                info["n_reject"] += 1
            info["nfe"] += order
        return x, info


def _comfy(name, D, x, sigmas, noise, **opts):
    """ComfyUI's ksampler wrappers: sigma_min is the last nonzero sigma, n the step count."""
    lo, hi = sigmas[-1] if sigmas[-1] > 0 else sigmas[-2], sigmas[0]
    ref = RefDPMSolver(D)
    if name == "dpm_fast":
        return ref.fast(x, -math.log(hi), -math.log(lo), len(sigmas) - 1, noise=noise, **opts), 0
    out, info = ref.adaptive(x, -math.log(hi), -math.log(lo), noise=noise, **opts)
    return out, info["n_reject"]


def _compare(gmm, spec, opts, flow, steps=10, seed=11, **grid):
    bound, ts, sigmas, D, c0, _, _ = comfy_setup(gmm, steps, flow, **grid)
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * sigmas[0]
    ref_tape, tape = Tape(seed), Tape(seed)
    expect, rejected = _comfy(spec.split(":")[0], D, x, sigmas, ref_tape.randn, **opts)
    got = dg.sample(bound, spec, ts, x * c0, tape)
    got = got if flow else got / float(bound.schedule.alpha(ts[-1]))  # ComfyUI's x: x / a
    assert tape.used == ref_tape.used  # the same draws, in the same order
    assert bound.nfe == D.calls - rejected  # a rejected try reuses its first evaluation
    return got, expect, tape.used


DETERMINISTIC = [
    ("dpm_fast", {}, 10),  # 10 = 3 * 3 + 1: orders 3, 3, 3, 1
    ("dpm_fast", {}, 8),  # 3, 3, 2
    ("dpm_fast", {}, 9),  # 3, 3, 2, 1
    ("dpm_fast", {}, 2),  # one DPM-Solver-2 step
    ("dpm_adaptive", {}, 10),
    ("dpm_adaptive:rtol=0.2,atol=0.03", {"rtol": 0.2, "atol": 0.03}, 10),
    ("dpm_adaptive:order=2", {"order": 2}, 10),
    (
        "dpm_adaptive:pcoeff=0.3,icoeff=0.8,dcoeff=0.2,h_init=0.3,accept_safety=0.9",
        {"pcoeff": 0.3, "icoeff": 0.8, "dcoeff": 0.2, "h_init": 0.3, "accept_safety": 0.9},
        10,
    ),
]
STOCHASTIC = [
    ("dpm_fast:eta=1", {"eta": 1.0}, 10),
    ("dpm_fast:eta=0.5,s_noise=0.8", {"eta": 0.5, "s_noise": 0.8}, 8),
    ("dpm_adaptive:eta=1", {"eta": 1.0}, 10),
    ("dpm_adaptive:eta=0.6,s_noise=0.7,rtol=0.1", {"eta": 0.6, "s_noise": 0.7, "rtol": 0.1}, 10),
]


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize(
    "spec,opts,steps", DETERMINISTIC, ids=[f"{c[0]}-{c[2]}" for c in DETERMINISTIC]
)
def test_matches_comfyui(gmm, spec, opts, steps, flow):
    got, expect, used = _compare(gmm, spec, opts, flow, steps)
    assert used == 0
    assert (got - expect).abs().max() < 1e-6, (got, expect)


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("spec,opts,steps", STOCHASTIC, ids=[c[0] for c in STOCHASTIC])
def test_ancestral_matches_comfyui_with_the_same_draws(gmm, spec, opts, steps, flow):
    got, expect, used = _compare(gmm, spec, opts, flow, steps)
    assert used > 0
    assert (got - expect).abs().max() < 1e-6, (got, expect)
    other, expect_other, _ = _compare(gmm, spec, opts, flow, steps, seed=12)
    assert (other - expect_other).abs().max() < 1e-6
    assert (other - got).abs().max() > 1e-3  # the noise matters


def test_a_grid_that_ends_above_data_is_solved_to_its_end(gmm):
    """sigmas[-1] > 0: ComfyUI solves down to it, and so does diffguide (no relabelling)."""
    for spec, opts in (("dpm_fast", {}), ("dpm_adaptive", {})):
        got, expect, _ = _compare(gmm, spec, opts, False, 7, final="sigma_min")
        assert (got - expect).abs().max() < 1e-6


def test_dpm_adaptive_rejects_and_the_controller_matters(gmm):
    """The parity cases are not trivial: tries are rejected, and the options move the result."""
    bound, ts, sigmas, D, c0, _, _ = comfy_setup(gmm, 10, False)
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * sigmas[0]
    _, info = RefDPMSolver(D).adaptive(x, -math.log(sigmas[0]), -math.log(sigmas[-2]), h_init=0.3)
    assert info["n_reject"] > 0
    outs = [dg.sample(bound, s, ts, x * c0) for s in ("dpm_adaptive", "dpm_adaptive:rtol=0.2")]
    assert (outs[0] - outs[1]).abs().max() > 1e-4


def test_evaluations(gmm):
    """dpm_fast spends exactly ``steps`` evaluations, none before the last step; dpm_adaptive
    ignores ``steps``: the same ends give the same sample whatever lies between."""
    for flow in (False, True):
        for steps in (2, 5, 9, 13):
            bound, ts, sigmas, _, c0, _, _ = comfy_setup(gmm, steps, flow)
            seen = []
            dg.sample(bound, "dpm_fast", ts, torch.ones(2, 2, dtype=F64) * sigmas[0] * c0,
                      callback=lambda st, x: seen.append(bound.nfe))  # fmt: skip
            assert bound.nfe == steps and seen == [0] * (steps - 1) + [steps]
    a, ts_a, sigmas, _, c0, _, _ = comfy_setup(gmm, 6, False)
    b, ts_b, *_ = comfy_setup(gmm, 25, False)
    c, ts_c, *_ = comfy_setup(gmm, 25, False, spacing="exponential")
    assert ts_c[1] != ts_b[1] and torch.allclose(ts_c[[0, -2]], ts_b[[0, -2]], rtol=0, atol=1e-12)
    x = torch.ones(2, 2, dtype=F64) * sigmas[0] * c0
    out = [dg.sample(d, "dpm_adaptive", ts, x) for d, ts in ((a, ts_a), (b, ts_b), (c, ts_c))]
    assert (out[0] - out[1]).abs().max() < 1e-12 and (out[0] - out[2]).abs().max() < 1e-9
    assert a.nfe == b.nfe > 6


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
def test_denoise_to_zero_lands_on_the_last_prediction(gmm, flow):
    """One more evaluation at the last nonzero level, its x0 the sample (on a grid ending there,
    nothing changes)."""
    for name in ("dpm_fast", "dpm_adaptive"):
        bound, ts, sigmas, D, c0, _, _ = comfy_setup(gmm, 9, flow)
        x = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * sigmas[0]
        y, rejected = _comfy(name, D, x, sigmas, None)
        got = dg.sample(bound, f"{name}:denoise_to_zero=True", ts, x * c0)
        assert bound.nfe == D.calls - rejected + 1
        assert (got - D(y, sigmas[-2])).abs().max() < 1e-6
        bound, ts, *_ = comfy_setup(gmm, 9, flow, final="sigma_min")
        a, b = (dg.sample(bound, f"{name}:denoise_to_zero={v}", ts, x * c0) for v in (0, 1))
        assert torch.equal(a, b)


def test_a_callback_change_carries_over(gmm):
    bound, ts, sigmas, _, c0, _, _ = comfy_setup(gmm, 6, False)
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * sigmas[0] * c0
    plain = dg.sample(bound, "dpm_fast", ts, x)
    moved = dg.sample(
        bound, "dpm_fast", ts, x, callback=lambda st, y: y + 0.5 if st.i == 0 else None
    )
    assert (plain - moved).abs().max() > 1e-3
    assert (moved - dg.sample(bound, "dpm_fast", ts, x + 0.5)).abs().max() < 1e-12


def test_from_infinite_noise_the_first_step_is_ddim(gmm):
    """A zero-terminal-SNR VP grid starts at VE level inf: one DDIM step to the next level, then
    the solve with the rest of the budget; the sample equals that DDIM step followed by dpm_fast
    on the rest of the grid."""
    from helpers import sd_schedule

    sc = sd_schedule(rescale_betas_zero_snr=True)
    gm = dg.GaussianMixture.ring(sc)
    bound = dg.guide(gm, None, torch.tensor([0, 2]))
    ts = dg.timesteps(sc, 8, "uniform_t")
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    out = dg.sample(bound, "dpm_fast", ts, z)
    assert bound.nfe == 8 and torch.isfinite(out).all()
    x1 = dg.sample(bound, "ddim", ts[:2], z)
    assert (out - dg.sample(bound, "dpm_fast", ts[1:], x1)).abs().max() < 1e-12
    for spec in ("dpm_fast", "dpm_adaptive"):  # two steps: the DDIM step reaches the last level
        ts2 = dg.timesteps(sc, 2, "uniform_t")
        x1 = dg.sample(bound, "ddim", ts2[:2], z) / float(sc.alpha(ts2[1]))  # VE coordinates
        assert (dg.sample(bound, spec, ts2, z) - x1).abs().max() < 1e-12 and bound.nfe == 1


@pytest.mark.parametrize("spec", ["dpm_fast:eta=1", "dpm_adaptive:eta=1", "dpm_adaptive:rtol=1e-3"])
def test_moments_of_a_gaussian(spec, sd):
    """The ancestral variants (not checked by the default-options moment test) and a tight
    dpm_adaptive sample N(mean, 0.4^2) from the exact p(x_T) (the defaults' rtol 0.05 gives std
    0.413, as k-diffusion's function does: tests/test_distribution.py)."""
    mean, std, n = torch.tensor([0.5, -0.3], dtype=F64), 0.4, 20000
    gaussian = dg.GaussianMixture(mean[None], [std], [1.0], [0], sd)
    ts = dg.timesteps(sd, 200, "karras")
    noise = dg.RandomNoise(torch.Generator().manual_seed(0))
    a, s = float(sd.alpha(ts[0])), float(sd.sigma(ts[0]))
    x = a * mean + (a * a * std * std + s * s) ** 0.5 * noise(torch.empty(n, 2, dtype=F64))
    out = dg.sample(dg.guide(gaussian, None, None), spec, ts, x, noise)
    assert torch.allclose(out.mean(0), mean, atol=0.012), out.mean(0)
    assert torch.allclose(out.std(0), torch.full((2,), std, dtype=F64), atol=0.01), out.std(0)


def test_cfgpp_reaches_them(gmm):
    sc = gmm.schedule
    ts = dg.timesteps(sc, 8, "karras")
    labels, null = torch.tensor([1, 3]), torch.tensor([-1, -1])
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    z = z * float(sc.ve(ts[0])) * float(sc.alpha(ts[0]))
    for spec in ("dpm_fast", "dpm_adaptive"):
        a, b = (
            dg.sample(dg.guide(gmm, g, labels, null), spec, ts, z)
            for g in ("cfgpp:scale=0", "cfgpp:scale=0.8")
        )
        assert (a - b).abs().max() > 1e-3, spec


def _grid_step(ts, t) -> int:
    """The step i of the grid ts whose interval holds t: ts[i] >= t > ts[i + 1] (0 from ts[0] up;
    a t within rounding of a grid point is that point)."""
    n, t = len(ts) - 1, float(t)
    near = [k for k in range(n + 1) if abs(t - float(ts[k])) <= 1e-9 * max(1.0, abs(t))]
    if near:
        return min(near[0], n - 1)
    return min(max(sum(float(ts[k]) > t for k in range(n + 1)) - 1, 0), n - 1)


class _Seen(dg.Guidance):
    """The conditional prediction, recording (t, step, steps) of every evaluation."""

    def __init__(self):
        self.seen = []

    def branches(self, pt, state=None):
        self.seen.append((float(pt.t), pt.step, pt.steps))
        return {"c": dg.Branch("pos")}

    def combine(self, x, pt, preds, state):
        return preds["c"], state


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("spec", ["dpm_fast", "dpm_adaptive", "dpm_adaptive:denoise_to_zero=1"])
def test_each_evaluation_sees_the_step_of_its_level(gmm, spec, flow):
    """The solve runs inside the grid's last step, but guidance that reads the step (start/stop
    windows) sees, at each evaluation, the step whose interval holds its level."""
    gm, n = flow_mixture(gmm) if flow else gmm, 9
    ts = dg.timesteps(gm.schedule, n, "karras")
    seen = _Seen()
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    x = z * float(gm.schedule.sigma(ts[0]))
    dg.sample(dg.guide(gm, seen, torch.tensor([0, 2])), spec, ts, x)
    assert len(seen.seen) > n // 2
    assert [(i, m) for _, i, m in seen.seen] == [(_grid_step(ts, t), n) for t, _, _ in seen.seen]
    assert seen.seen[0][1] == 0 and len({i for _, i, _ in seen.seen}) > 2


def test_from_infinite_noise_the_steps_start_after_the_ddim_step():
    sc = sd_schedule(rescale_betas_zero_snr=True)
    ts = dg.timesteps(sc, 8, "uniform_t")
    seen = _Seen()
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    dg.sample(dg.guide(dg.GaussianMixture.ring(sc), seen, torch.tensor([0, 2])), "dpm_fast", ts, z)
    assert [i for _, i, _ in seen.seen] == [_grid_step(ts, t) for t, _, _ in seen.seen]
    assert [i for _, i, _ in seen.seen[:2]] == [0, 1]


@pytest.mark.parametrize("spec", ["dpm_fast", "dpm_adaptive"])
def test_a_step_window_acts_on_the_levels_in_its_steps(gmm, spec):
    """cfg_renorm's truncation (the unconditional branch on steps i with (i + 1) / n <= 0.5):
    exactly the evaluations whose level lies in those steps run it, and the window matters (it
    used to see the last step only, so it equalled the conditional prediction alone)."""
    labels, null = torch.tensor([1, 3]), torch.tensor([-1, -1])
    calls = []

    class Recorded:  # the mixture, recording each forward's t and whether it had the neg branch
        schedule = gmm.schedule

        def __call__(self, x, t, cond):
            calls.append((float(t), bool((cond == -1).any())))
            return gmm(x, t, cond)

    n = 10
    ts = dg.timesteps(gmm.schedule, n, "karras")
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    z = z * float(gmm.schedule.ve(ts[0])) * float(gmm.schedule.alpha(ts[0]))
    out = {}
    for g in ("none", "cfg_renorm:scale=5,normalize=0", "cfg_renorm:scale=5,trunc_ratio=0.5"):
        calls.clear()
        out[g] = dg.sample(dg.guide(Recorded(), g, labels, null), spec, ts, z)
    on = [(_grid_step(ts, t) + 1) / n <= 0.5 for t, _ in calls]
    assert [neg for _, neg in calls] == on and 0 < sum(on) < len(on)
    windowed = out["cfg_renorm:scale=5,trunc_ratio=0.5"]
    assert (windowed - out["none"]).abs().max() > 1e-3
    assert (windowed - out["cfg_renorm:scale=5,normalize=0"]).abs().max() > 1e-3


def test_dpm_adaptive_with_atol_0_solves_a_channel_at_exactly_0():
    """atol=0 and a channel at exactly 0 in y_low, y_prev and y_high: it adds no error (not
    0 / 0 = NaN, which stopped the solve at its first level and returned the noise)."""
    sc = sd_schedule()
    gm = dg.GaussianMixture(torch.zeros(1, 2, dtype=F64), [0.5], [1.0], [0], sc)
    ts = dg.timesteps(sc, 10, "karras")
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = x * float(sc.ve(ts[0]) * sc.alpha(ts[0]))
    x[:, 1] = 0.0
    runs = {}
    for spec in ("dpm_adaptive:atol=0", "dpm_adaptive:atol=1e-30"):
        den = dg.guide(gm, None, None)
        runs[spec] = (dg.sample(den, spec, ts, x), den.nfe)
    (out, nfe), (same, nfe_same) = runs.values()
    assert nfe == nfe_same > 6 and torch.equal(out, same)  # a tolerance too small to matter
    assert (out[:, 1] == 0).all() and abs(float(out[:, 0].std()) - 0.5) < 0.15


@pytest.mark.parametrize(
    "spec,match",
    [
        ("dpm_adaptive:order=4", "order must be 2 or 3"),
        ("dpm_adaptive:rtol=0,atol=0", "not both 0"),
        ("dpm_adaptive:h_init=0", "h_init must be > 0"),
        ("dpm_adaptive:eta=-1", "eta must be >= 0"),
        ("dpm_fast:eta=-0.5", "eta must be >= 0"),
    ],
)
def test_bad_options_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        dg.parse_spec("sampler", spec)


def test_what_they_cannot_run_is_refused(gmm):
    bound, ts, sigmas, _, c0, _, _ = comfy_setup(gmm, 1, False)
    x = torch.ones(2, 2, dtype=F64) * sigmas[0] * c0
    for spec in ("dpm_fast", "dpm_adaptive"):  # one step onto data: nothing between the ends
        with pytest.raises(ValueError, match="needs a nonzero level below the first"):
            dg.sample(bound, spec, ts, x)
    ts = dg.timesteps(gmm.schedule, 6, "karras")
    stitched = dg.guide(gmm, None, torch.tensor([0, 2]), models={"small": gmm}, stitch=dg.Stitch())
    with pytest.raises(ValueError, match="T-Stitch switches by step"):
        dg.sample(stitched, "dpm_fast", ts, x)

    class Cached:  # a run with a step cache (the mixture has no blocks to cache)
        schedule, cache = gmm.schedule, object()

        def __call__(self, x, t):
            return gmm(x, t, torch.tensor([0, 2]))

    for spec in ("dpm_fast", "dpm_adaptive"):  # a cache would see every evaluation in one step
        with pytest.raises(ValueError, match="a step cache plans by step"):
            dg.sample(Cached(), spec, ts, x)


def test_list_shows_them_with_their_options(capsys):
    from diffguide.cli.main import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "  dpm_fast " in out and "  dpm_adaptive " in out
    assert "options: eta=0.0, s_noise=1.0, denoise_to_zero=False" in out
    assert (
        "options: order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, "
        "dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0" in out
    )

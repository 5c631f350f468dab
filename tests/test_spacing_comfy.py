"""ComfyUI's remaining schedulers as spacings (normal, ddim_uniform, linear_quadratic, laplace,
RES4LYF's bong_tangent, OptimalSteps), each against a plain transcription of the ComfyUI function
written here. The references take ComfyUI's own inputs (its model_sampling: the 1000 VE levels of a
VP table, or a flow's shifted levels s and its timestep/sigma maps; sigma_min/sigma_max; steps) and
compute in float64 (ComfyUI rounds to float32); diffguide's grid is compared in VE levels, a flow's
s read as VE s / (1 - s)."""

import math

import numpy as np
import pytest
import torch

import diffguide as dg

F64 = torch.float64
RTOL = 1e-6
NEW = ("normal", "ddim_uniform", "linear_quadratic", "laplace", "bong_tangent", "optimal_steps")


# -- ComfyUI's model_sampling, transcribed -----------------------------------------------------


class Discrete:
    """ModelSamplingDiscrete on a table of VE levels: timestep(sigma) is the nearest entry in log
    sigma, sigma(timestep) log-linear between entries."""

    def __init__(self, sigmas):
        self.sigmas = torch.as_tensor(sigmas, dtype=F64)
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        dists = torch.as_tensor(sigma, dtype=F64).log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(torch.as_tensor(sigma).shape)

    def sigma(self, timestep):
        t = torch.clamp(torch.as_tensor(timestep, dtype=F64), 0, len(self.sigmas) - 1)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()


class Flow:
    """ModelSamplingDiscreteFlow: sigmas s = shift(i / T) for i = 1..T, timestep(s) = 1000 s and
    sigma(timestep) = shift(timestep / 1000)."""

    def __init__(self, shift, timesteps=1000, multiplier=1000):
        self.shift, self.multiplier = shift, multiplier
        self.sigmas = self.sigma(torch.arange(1, timesteps + 1, dtype=F64) / timesteps * multiplier)

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        t = torch.as_tensor(timestep, dtype=F64) / self.multiplier
        return self.shift * t / (1 + (self.shift - 1) * t)


# -- the ComfyUI schedulers, transcribed -------------------------------------------------------


def ref_normal(ms, steps):
    """comfy.samplers.normal_scheduler (sgm=False)."""
    start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    append_zero = True
    if math.isclose(float(ms.sigma(end)), 0, abs_tol=1e-5):
        steps += 1
        append_zero = False
    ts = torch.linspace(float(start), float(end), steps, dtype=F64)
    sigs = [float(ms.sigma(t)) for t in ts]
    return sigs + [0.0] if append_zero else sigs


def ref_ddim(ms, steps):
    """comfy.samplers.ddim_scheduler."""
    x = 1
    if math.isclose(float(ms.sigmas[x]), 0, abs_tol=1e-5):
        steps += 1
        sigs = []
    else:
        sigs = [0.0]
    ss = max(len(ms.sigmas) // steps, 1)
    while x < len(ms.sigmas):
        sigs.append(float(ms.sigmas[x]))
        x += ss
    return sigs[::-1]


def ref_linear_quadratic(ms, steps, threshold_noise=0.025, linear_steps=None):
    """comfy.samplers.linear_quadratic_schedule."""
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * steps
        quad_steps = steps - linear_steps
        quad_coef = diff / (linear_steps * quad_steps**2)
        lin_coef = threshold_noise / linear_steps - 2 * diff / (quad_steps**2)
        const = quad_coef * (linear_steps**2)
        quad = [quad_coef * (i**2) + lin_coef * i + const for i in range(linear_steps, steps)]
        sched = [1.0 - x for x in lin + quad + [1.0]]
    return [x * float(ms.sigma_max) for x in sched]


def ref_laplace(n, sigma_min, sigma_max, mu=0.0, beta=0.5):
    """comfy.k_diffusion.sampling.get_sigmas_laplace (n levels, no final 0)."""
    x = torch.linspace(0, 1, n, dtype=F64)
    lmb = mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)
    return torch.clamp(torch.exp(lmb), min=float(sigma_min), max=float(sigma_max)).tolist()


def ref_bong_arc(steps, slope, pivot, start, end):
    smax = ((2 / math.pi) * math.atan(-slope * (0 - pivot)) + 1) / 2
    smin = ((2 / math.pi) * math.atan(-slope * ((steps - 1) - pivot)) + 1) / 2
    srange, sscale = smax - smin, start - end
    return [
        ((((2 / math.pi) * math.atan(-slope * (x - pivot)) + 1) / 2) - smin) * (1 / srange) * sscale
        + end
        for x in range(steps)
    ]


def ref_bong_tangent(
    steps, start=1.0, middle=0.5, end=0.0, pivot_1=0.6, pivot_2=0.6, slope_1=0.2, slope_2=0.2
):
    """RES4LYF's bong_tangent_scheduler (pad=False): steps + 1 levels ending at ``end``."""
    steps += 2
    midpoint = int((steps * pivot_1 + steps * pivot_2) / 2)
    p1, p2 = int(steps * pivot_1), int(steps * pivot_2)
    s1, s2 = slope_1 / (steps / 40), slope_2 / (steps / 40)
    stage_2_len = steps - midpoint
    stage_1_len = steps - stage_2_len
    one = ref_bong_arc(stage_1_len, s1, p1, start, middle)
    two = ref_bong_arc(stage_2_len, s2, p2 - stage_1_len, middle, end)
    return one[:-1] + two


OPTIMAL = {  # comfy_extras/nodes_optimalsteps.py NOISE_LEVELS
    "flux": [0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001],
    "wan": [1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968]
    + [0.96, 0.946, 0.927, 0.902, 0.864, 0.776, 0.539, 0.208, 0.001],
    "chroma": [0.992, 0.99, 0.988, 0.985, 0.982, 0.978, 0.973, 0.968, 0.961, 0.953, 0.943]
    + [0.931, 0.917, 0.9, 0.881, 0.858, 0.832, 0.802, 0.769, 0.731, 0.69, 0.646, 0.599]
    + [0.55, 0.501, 0.451, 0.402, 0.355, 0.311, 0.27, 0.232, 0.199, 0.169, 0.143, 0.12]
    + [0.101, 0.084, 0.07, 0.058, 0.048, 0.001],
}


def ref_optimal_steps(model, steps):
    """OptimalStepsScheduler.execute (denoise 1) with its loglinear_interp."""
    sigmas = OPTIMAL[model][:]
    if steps + 1 != len(sigmas):
        xs = np.linspace(0, 1, len(sigmas))
        ys = np.log(sigmas[::-1])
        sigmas = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, ys))[::-1].copy()
    sigmas[-1] = 0
    return [float(s) for s in sigmas]


# -- comparison --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow():
    return dg.FlowSchedule(shift=3.0)


def comfy_model(schedule):
    """ComfyUI's model_sampling for a diffguide schedule: the VP table's 1000 VE levels, or the
    flow model with the same shift."""
    if isinstance(schedule, dg.FlowSchedule):
        return Flow(schedule.shift)
    return Discrete(schedule.ve(torch.arange(schedule.num_train_timesteps, dtype=F64)))


def as_ve(schedule, sigmas):
    """ComfyUI sigmas as VE levels: a flow's s -> s / (1 - s), anything else as it is."""
    s = torch.tensor(sigmas, dtype=F64)
    if isinstance(schedule, dg.FlowSchedule):
        return torch.where(s >= 1, torch.full_like(s, math.inf), s / (1 - s))
    return s


def check(schedule, spacing, steps, expect, **options):
    ts = dg.timesteps(schedule, steps, spacing, **options)
    got = schedule.ve(ts)
    want = as_ve(schedule, expect)
    assert got.shape == want.shape, (spacing, steps, got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0, msg=f"{spacing} steps={steps}")
    return ts


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 50])
def test_normal_is_comfyuis_normal_scheduler(sd, flow, kind, steps):
    sc = sd if kind == "vp" else flow
    check(sc, "normal", steps, ref_normal(comfy_model(sc), steps))


def test_normal_on_a_flow_ends_where_comfyui_reads_s_as_a_timestep(flow):
    """ComfyUI's flow timestep(s) is 1000 s and sigma() shifts it again: the lowest level is the
    shift applied twice to 1/T, not the flow's first training level."""
    ts = dg.timesteps(flow, 10, "normal")
    s_min = flow.flow_time(torch.tensor(1 / 1000, dtype=F64))
    assert float(ts[-2]) == pytest.approx(float(s_min), rel=1e-12)
    assert float(flow.flow_time(ts[-2])) > 2.9 * float(s_min)


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("steps", [1, 3, 7, 10, 20, 30, 64, 333, 999, 1200])
def test_ddim_uniform_is_comfyuis_ddim_scheduler(sd, flow, kind, steps):
    sc = sd if kind == "vp" else flow
    ref = ref_ddim(comfy_model(sc), steps)
    check(sc, "ddim_uniform", steps, ref)
    # BasicScheduler keeps the last steps + 1 of them
    check(sc, "ddim_uniform", steps, ref[-(steps + 1) :], trim=True)


def test_ddim_uniform_can_run_more_steps_than_asked_as_comfyuis_does(sd):
    assert len(dg.timesteps(sd, 30, "ddim_uniform")) == 32  # 31 levels, then data
    assert len(dg.timesteps(sd, 20, "ddim_uniform")) == 21
    assert len(dg.timesteps(sd, 30, "ddim_uniform", trim=True)) == 31
    assert float(sd.ve(dg.timesteps(sd, 20, "ddim_uniform")[-2])) == float(sd.ve(1))  # index 1


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize(
    "steps, options",
    [(1, {}), (2, {}), (3, {}), (10, {}), (20, {}), (31, {}), (50, {})]
    + [(20, {"threshold_noise": 0.1}), (12, {"linear_steps": 9}), (7, {"linear_steps": 2})],
)
def test_linear_quadratic_is_comfyuis_linear_quadratic_schedule(sd, flow, kind, steps, options):
    sc = sd if kind == "vp" else flow
    check(
        sc,
        "linear_quadratic",
        steps,
        ref_linear_quadratic(comfy_model(sc), steps, **options),
        **options,
    )


def test_linear_quadratic_reads_sigma_max_and_refuses_an_infinite_one():
    zsnr = dg.VPSchedule.from_betas(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="finite sigma_max"):
        dg.timesteps(zsnr, 10, "linear_quadratic")
    ms = Discrete([0.03, 10.0])  # only its sigma_max is read
    check(zsnr, "linear_quadratic", 10, ref_linear_quadratic(ms, 10), sigma_max=10.0)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20, 50, 200])
def test_laplace_is_comfyuis_get_sigmas_laplace_on_a_vp_table(sd, steps):
    ms = comfy_model(sd)
    check(sd, "laplace", steps, ref_laplace(steps, ms.sigma_min, ms.sigma_max) + [0.0])


@pytest.mark.parametrize("steps", [2, 10, 30])
def test_laplace_options_and_a_flow(sd, flow, steps):
    ms = comfy_model(sd)
    ref = ref_laplace(steps, ms.sigma_min, ms.sigma_max, 0.3, 0.8)
    check(sd, "laplace", steps, ref + [0.0], mu=0.3, beta=0.8)
    opts = dict(mu=0.3, beta=0.4, sigma_min=0.1, sigma_max=10.0)
    check(sd, "laplace", steps, ref_laplace(steps, 0.1, 10.0, 0.3, 0.4) + [0.0], **opts)
    # on a flow ComfyUI's sigmas are s in [s(1/T), 1]; mu = 0 would pin half the grid at s = 1
    ms = comfy_model(flow)
    ref = ref_laplace(steps, ms.sigma_min, ms.sigma_max, mu=-3.0)
    check(flow, "laplace", steps, ref + [0.0], mu=-3.0)


def test_laplace_node_output_is_final_sigma_min_with_one_step_fewer(sd):
    """ComfyUI's LaplaceScheduler node gives n levels and no final 0 (n - 1 steps down to the
    clamped sigma_min); node defaults sigma_max 14.614642, sigma_min 0.0291675."""
    ref = ref_laplace(20, 0.0291675, 14.614642)
    check(sd, "laplace", 19, ref, final="sigma_min", sigma_min=0.0291675, sigma_max=14.614642)


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("steps", [2, 3, 4, 5, 10, 20, 30, 60])
def test_bong_tangent_is_res4lyfs_bong_tangent_scheduler(sd, flow, kind, steps):
    sc = sd if kind == "vp" else flow
    check(sc, "bong_tangent", steps, ref_bong_tangent(steps))


def test_bong_tangent_options(sd, flow):
    opts = dict(start=0.9, middle=0.3, pivot_1=0.5, pivot_2=0.7, slope_1=0.3, slope_2=0.1)
    for sc in (sd, flow):
        check(sc, "bong_tangent", 25, ref_bong_tangent(25, **opts), **opts)
    check(
        sd, "bong_tangent", 12, ref_bong_tangent(12, start=14.0, middle=1.0), start=14.0, middle=1.0
    )
    with pytest.raises(ValueError, match="two stages"):
        dg.timesteps(flow, 1, "bong_tangent")  # RES4LYF divides by zero there


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("model", ["flux", "wan", "chroma"])
@pytest.mark.parametrize("steps", [1, 3, 10, 20, 28, 40, 64])
def test_optimal_steps_is_comfyuis_optimal_steps_scheduler(sd, flow, kind, model, steps):
    sc = sd if kind == "vp" else flow
    check(sc, "optimal_steps", steps, ref_optimal_steps(model, steps), model=model)


def test_optimal_steps_tables_are_the_published_ones():
    from diffguide.core.spacing import OPTIMAL_STEPS_LEVELS

    assert OPTIMAL_STEPS_LEVELS == OPTIMAL
    with pytest.raises(ValueError, match="tables for flux, wan, chroma"):
        dg.timesteps(dg.FlowSchedule(), 10, "optimal_steps", model="sd3")


def test_final_sigma_min_takes_one_more_comfyui_level_and_no_zero(sd, flow):
    for sc in (sd, flow):
        check(sc, "normal", 12, ref_normal(comfy_model(sc), 13)[:-1], final="sigma_min")
        check(sc, "bong_tangent", 12, ref_bong_tangent(13)[:-1], final="sigma_min")
        check(
            sc,
            "optimal_steps",
            12,
            ref_optimal_steps("wan", 13)[:-1],
            final="sigma_min",
            model="wan",
        )


def test_the_references_would_catch_a_wrong_constant(sd, flow):
    """The comparisons are tighter than the changes a slip would make: each nearby variant of a
    ComfyUI constant moves some level by far more than RTOL."""

    def moved(schedule, spacing, steps, wrong, **options):
        got = schedule.ve(dg.timesteps(schedule, steps, spacing, **options))
        want = as_ve(schedule, wrong)
        finite = torch.isfinite(want) & torch.isfinite(got)
        return bool(
            len(got) != len(want) or ((got - want).abs()[finite] > 1e-4 * want[finite]).any()
        )

    ms_vp = comfy_model(sd)
    assert moved(sd, "linear_quadratic", 20, ref_linear_quadratic(ms_vp, 20, threshold_noise=0.026))
    assert moved(sd, "linear_quadratic", 20, ref_linear_quadratic(ms_vp, 20, linear_steps=11))
    assert moved(
        sd, "laplace", 20, ref_laplace(20, ms_vp.sigma_min, ms_vp.sigma_max, beta=0.51) + [0.0]
    )
    assert moved(sd, "bong_tangent", 20, ref_bong_tangent(20, slope_1=0.21))
    assert moved(sd, "bong_tangent", 20, ref_bong_tangent(20, pivot_2=0.65))
    naive = [float(v) for v in Flow(3.0).sigma(torch.linspace(1000, 1, 10, dtype=F64))] + [0.0]
    assert moved(flow, "normal", 10, naive)  # 1/T instead of ComfyUI's s(1/T) as the last time
    assert moved(
        sd, "ddim_uniform", 20, [float(ms_vp.sigmas[i]) for i in range(950, -1, -50)] + [0.0]
    )
    assert moved(flow, "optimal_steps", 30, ref_optimal_steps("chroma", 30), model="flux")


# -- they sample, and diffguide list shows them --------------------------------------------------


def _sample(mixture, ts):
    bound = dg.guide(mixture, dg.parse_spec("guidance", "none"), torch.tensor([0, 1]))
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    return dg.sample(bound, "dpmpp_2m", ts, z * float(mixture.schedule.sigma(ts[:1])))


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_every_new_spacing_samples_the_exact_mixture(sd, flow, kind):
    """Every new grid runs dpmpp_2m on the closed-form mixture; those that start from pure noise
    and suit the schedule land near a 400-step solution from the same noise (linear_quadratic
    spends half its steps near sigma_max on a VP table, and laplace on a flow jumps from s = 1 to
    s = 0.19: both farther off at 30 steps, as they are in ComfyUI)."""
    sc = sd if kind == "vp" else flow
    mixture = dg.GaussianMixture.ring(sc)
    ref = _sample(mixture, dg.timesteps(sc, 400, "karras" if kind == "vp" else "uniform_t"))
    close = {"normal"} if kind == "vp" else {"normal", "linear_quadratic", "bong_tangent"}
    options = {"laplace": {"mu": -3.0}} if kind == "flow" else {}
    for spacing in NEW:
        ts = dg.timesteps(sc, 30, spacing, **options.get(spacing, {}))
        out = _sample(mixture, ts)
        assert torch.isfinite(out).all(), spacing
        if spacing in close:  # the same start, so the same ODE solution
            assert float(ts[0]) == sc.t_max and (out - ref).abs().max() < 0.1, spacing


def test_list_shows_the_new_spacings_with_their_options(capsys):
    from diffguide.cli.main import main

    assert main(["list"]) == 0
    spacings = capsys.readouterr().out.split("spacings (--spacing, spacing=):")[1]
    for name in NEW:
        assert f"  {name} " in spacings, name
    for options in (
        "options: trim",
        "options: threshold_noise, linear_steps, sigma_max",
        "options: mu, beta, sigma_min, sigma_max",
        "options: start, middle, pivot_1, pivot_2, slope_1, slope_2",
    ):
        assert options in spacings, options
    assert "RES4LYF" in spacings and "OptimalSteps" in spacings


def test_spacings_that_read_training_levels_refuse_a_schedule_without_them():
    edm = dg.core.EDMSchedule()
    for spacing in ("normal", "ddim_uniform"):
        with pytest.raises(ValueError, match="reads training timesteps"):
            dg.timesteps(edm, 10, spacing)
    assert torch.isfinite(edm.ve(dg.timesteps(edm, 10, "laplace"))).all()

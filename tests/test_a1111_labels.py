"""The A1111 names diffguide writes into a PNG's ``parameters`` (issue 29), each checked against a
transcription of what A1111 runs under it, on the closed-form Gaussian mixture with SD's table.

Transcribed (in this file's own code, from reading them) from AUTOMATIC1111/stable-diffusion-webui:
modules/sd_schedulers.py (the schedule functions), modules/sd_samplers_kdiffusion.py (which
k-diffusion
function runs under each label, A1111's options: eta 1 from eta_ancestral, s_noise 1, the
next-to-last
level dropped for DPM2, DPM2 a and DPM++ 3M SDE), modules/sd_samplers_extra.py (Restart),
modules/sd_samplers_timesteps.py and _impl.py (DDIM's own timesteps); and from
crowsonkb/k-diffusion's
k_diffusion/sampling.py (the sample_* functions, get_sigmas_*) and external.py (t_to_sigma).
ComfyUI's comfy/samplers.py (normal_scheduler, kl_optimal_scheduler) and
comfy_extras/nodes_align_your_steps.py are the other side of the sgm_uniform, KL Optimal and AYS
checks.

A sampler label is A1111's where diffguide's spec runs the same function on the same VE grid; a
schedule label where diffguide's spacing gives the same levels as A1111's function at the same
steps."""

import math

import numpy as np
import pytest
import torch

import diffguide as dg
from diffguide import images

TOL = 1e-6  # the samplers' agreement on the mixture (float64 on both sides)


# -- A1111's schedules: VE levels, the last one 0 except KL Optimal's ------------------------------


def ref_karras(n, lo, hi, rho=7.0):
    ramp = np.linspace(0, 1, n)
    return list((hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho) + [0.0]


def ref_exponential(n, lo, hi):
    return list(np.exp(np.linspace(math.log(hi), math.log(lo), n))) + [0.0]


def ref_polyexponential(n, lo, hi, rho=1.0):
    ramp = np.linspace(1, 0, n) ** rho
    return list(np.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo))) + [0.0]


def table_level(table, index):
    """k-diffusion's DiscreteSchedule.t_to_sigma: log-linear between the two nearest entries."""
    low, high = math.floor(index), math.ceil(index)
    w = index - low
    return math.exp((1 - w) * math.log(table[low]) + w * math.log(table[high]))


def ref_sgm_uniform(n, table):
    """A1111's sgm_uniform and ComfyUI's normal_scheduler(sgm=True): n indices from the top one (the
    index of sigma_max) towards 0, the endpoint excluded, each level read off the table."""
    return [table_level(table, i) for i in np.linspace(len(table) - 1, 0, n + 1)[:-1]] + [0.0]


def ref_uniform(n, table):
    """A1111's Uniform (k-diffusion's DiscreteSchedule.get_sigmas): n indices from the top to 0."""
    return [table_level(table, i) for i in np.linspace(len(table) - 1, 0, n)] + [0.0]


def ref_kl_optimal(n, lo, hi):
    """A1111's kl_optimal: n + 1 levels, i / n of the way in arctan, the last one sigma_min (no
    zero)."""
    return [math.tan(i / n * math.atan(lo) + (1 - i / n) * math.atan(hi)) for i in range(n + 1)]


def ref_comfy_kl_optimal(n, lo, hi):
    """ComfyUI's kl_optimal_scheduler: n levels i / (n - 1) of the way in arctan, then 0."""
    return [
        math.tan(i / (n - 1) * math.atan(lo) + (1 - i / (n - 1)) * math.atan(hi)) for i in range(n)
    ] + [0.0]


REF_AYS = {
    "sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def _loglinear(levels, points):
    """The NVIDIA how-to page's loglinear_interp, as A1111 and ComfyUI copy it."""
    rising = np.log(np.asarray(levels)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, points), np.linspace(0, 1, len(levels)), rising))[
        ::-1
    ]


def ref_align_your_steps(n, model="sd1"):
    """A1111's get_align_your_steps_sigmas: the table itself at its own length, else n interpolated
    levels; then 0."""
    levels = REF_AYS[model]
    return (list(levels) if n == len(levels) else list(_loglinear(levels, n))) + [0.0]


def ref_comfy_align_your_steps(n, levels):
    """ComfyUI's AlignYourStepsScheduler: n + 1 interpolated levels, the last one replaced by 0."""
    out = list(levels) if n + 1 == len(levels) else list(_loglinear(levels, n + 1))
    return out[:-1] + [0.0]


def ref_simple(n, table):
    step = len(table) / n
    return [table[-(1 + int(x * step))] for x in range(n)] + [0.0]


def ref_beta(n, lo, hi, alpha=0.6, beta=0.6):
    """A1111's beta_scheduler with its default options (beta_dist_alpha = beta_dist_beta = 0.6)."""
    from scipy import stats

    return [lo + stats.beta.ppf(q, alpha, beta) * (hi - lo) for q in 1 - np.linspace(0, 1, n)] + [
        0.0
    ]


def a1111_grid(label, n, table, discard=False):
    """KDiffusionSampler.get_sigmas: the schedule at n levels (n + 1 where the sampler discards the
    next-to-last level, which it then drops)."""
    lo, hi = table[0], table[-1]
    n = n + 1 if discard else n
    sigmas = {
        "Karras": lambda: ref_karras(n, lo, hi),
        "Exponential": lambda: ref_exponential(n, lo, hi),
        "Polyexponential": lambda: ref_polyexponential(n, lo, hi),
        "SGM Uniform": lambda: ref_sgm_uniform(n, table),
        "KL Optimal": lambda: ref_kl_optimal(n, lo, hi),
        "Align Your Steps": lambda: ref_align_your_steps(n),
        "Simple": lambda: ref_simple(n, table),
        "Beta": lambda: ref_beta(n, lo, hi),
        "Uniform": lambda: ref_uniform(n, table),
    }[label]()
    return sigmas[:-2] + sigmas[-1:] if discard else sigmas


# -- k-diffusion's samplers as A1111 calls them (x in VE coordinates, D(x, sigma) the denoiser)
# ------


def ancestral_step(s, s1, eta=1.0):
    if not eta:
        return s1, 0.0
    up = min(s1, eta * math.sqrt(s1**2 * (s**2 - s1**2) / s**2))
    return math.sqrt(s1**2 - up**2), up


def ref_euler(D, x, sigmas, noise):
    for s, s1 in zip(sigmas[:-1], sigmas[1:]):
        x = x + (x - D(x, s)) / s * (s1 - s)
    return x


def ref_euler_ancestral(D, x, sigmas, noise, eta=1.0):
    for s, s1 in zip(sigmas[:-1], sigmas[1:]):
        den = D(x, s)
        down, up = ancestral_step(s, s1, eta)
        x = x + (x - den) / s * (down - s)
        if s1 > 0:
            x = x + noise(s, s1) * up
    return x


def ref_heun(D, x, sigmas, noise):
    for s, s1 in zip(sigmas[:-1], sigmas[1:]):
        d = (x - D(x, s)) / s
        if s1 == 0:
            x = x + d * (s1 - s)
        else:
            x2 = x + d * (s1 - s)
            x = x + 0.5 * (d + (x2 - D(x2, s1)) / s1) * (s1 - s)
    return x


def _lagrange_integral(nodes, j, a, b):
    """The integral over [a, b] of the Lagrange basis polynomial j through nodes (k-diffusion's
    linear_multistep_coeff integrates it by quadrature, exact for these degrees)."""
    p = np.poly1d([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            p = p * np.poly1d([1.0, -node]) / (nodes[j] - node)
    q = p.integ()
    return q(b) - q(a)


def ref_lms(D, x, sigmas, noise, order=4):
    ds = []
    for i in range(len(sigmas) - 1):
        ds = (ds + [(x - D(x, sigmas[i])) / sigmas[i]])[-order:]
        nodes = [sigmas[i - k] for k in range(len(ds))]
        x = x + sum(
            _lagrange_integral(nodes, j, sigmas[i], sigmas[i + 1]) * d
            for j, d in enumerate(reversed(ds))
        )
    return x


def _dpm2_step(D, x, s, den, target):
    mid = math.exp(0.5 * (math.log(s) + math.log(target)))
    x2 = x + (x - den) / s * (mid - s)
    return x + (x2 - D(x2, mid)) / mid * (target - s)


def ref_dpm2(D, x, sigmas, noise):
    for s, s1 in zip(sigmas[:-1], sigmas[1:]):
        den = D(x, s)
        x = x + (x - den) / s * (s1 - s) if s1 == 0 else _dpm2_step(D, x, s, den, s1)
    return x


def ref_dpm2_ancestral(D, x, sigmas, noise, eta=1.0):
    for s, s1 in zip(sigmas[:-1], sigmas[1:]):
        den = D(x, s)
        down, up = ancestral_step(s, s1, eta)
        if down == 0:
            x = x + (x - den) / s * (down - s)
        else:  # k-diffusion adds the noise inside this branch only
            x = _dpm2_step(D, x, s, den, down) + noise(s, s1) * up
    return x


def ref_dpmpp_2s_ancestral(D, x, sigmas, noise, eta=1.0):
    for s, s1 in zip(sigmas[:-1], sigmas[1:]):
        den = D(x, s)
        down, up = ancestral_step(s, s1, eta)
        if down == 0:
            x = x + (x - den) / s * (down - s)
        else:
            h = math.log(s) - math.log(down)
            mid = s * math.exp(-h / 2)
            x2 = (mid / s) * x - math.expm1(-h / 2) * den
            x = (down / s) * x - math.expm1(-h) * D(x2, mid)
        if s1 > 0:
            x = x + noise(s, s1) * up
    return x


def ref_dpmpp_sde(D, x, sigmas, noise, eta=1.0, r=0.5):
    for s, s1 in zip(sigmas[:-1], sigmas[1:]):
        den = D(x, s)
        if s1 == 0:
            x = x + (x - den) / s * (s1 - s)
            continue
        mid = s * math.exp(-r * (math.log(s) - math.log(s1)))
        down, up = ancestral_step(s, mid, eta)
        x2 = (down / s) * x - math.expm1(math.log(down) - math.log(s)) * den + noise(s, mid) * up
        blend = (1 - 1 / (2 * r)) * den + 1 / (2 * r) * D(x2, mid)
        down, up = ancestral_step(s, s1, eta)
        x = (down / s) * x - math.expm1(math.log(down) - math.log(s)) * blend + noise(s, s1) * up
    return x


def ref_dpmpp_2m(D, x, sigmas, noise):
    old, h_last = None, None
    for s, s1 in zip(sigmas[:-1], sigmas[1:]):
        den = D(x, s)
        h = math.log(s) - math.log(s1) if s1 > 0 else math.inf
        if old is None or s1 == 0:
            x = (s1 / s) * x - math.expm1(-h) * den
        else:
            r = h_last / h
            x = (s1 / s) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * den - 1 / (2 * r) * old)
        old, h_last = den, h
    return x


def ref_dpmpp_2m_sde(D, x, sigmas, noise, eta=1.0, solver_type="midpoint"):
    old, h_last = None, None
    for s, s1 in zip(sigmas[:-1], sigmas[1:]):
        den = D(x, s)
        if s1 == 0:
            x, h = den, None
        else:
            h = math.log(s) - math.log(s1)
            big = h + eta * h
            x = (s1 / s) * math.exp(-eta * h) * x - math.expm1(-big) * den
            if old is not None:
                r = h_last / h
                scale = (
                    (-math.expm1(-big) / -big + 1)
                    if solver_type == "heun"
                    else 0.5 * -math.expm1(-big)
                )
                x = x + scale * (1 / r) * (den - old)
            if eta:
                x = x + noise(s, s1) * s1 * math.sqrt(-math.expm1(-2 * eta * h))
        old, h_last = den, h
    return x


def ref_dpmpp_3m_sde(D, x, sigmas, noise, eta=1.0):
    """k-diffusion's sample_dpmpp_3m_sde (the published third-order term)."""
    d_1 = d_2 = h_1 = h_2 = None
    for s, s1 in zip(sigmas[:-1], sigmas[1:]):
        den = D(x, s)
        h = None
        if s1 == 0:
            x = den
        else:
            h = math.log(s) - math.log(s1)
            big = h * (eta + 1)
            x = math.exp(-big) * x - math.expm1(-big) * den
            phi_2 = math.expm1(-big) / big + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (den - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / big - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (den - d_1) / (h_1 / h)
            if eta:
                x = x + noise(s, s1) * s1 * math.sqrt(-math.expm1(-2 * h * eta))
        d_1, d_2, h_1, h_2 = den, d_1, h, h_1
    return x


def ref_a1111_restart(D, x, sigmas, noise):
    """A1111's restart_sampler with its automatic restart list: from 20 steps the grid becomes
    Karras
    levels between its ends with restart_steps * restart_times fewer steps, and one restart (two
    from
    36 steps) at the level nearest 0.1, up to the level nearest 2; below 20 steps plain Heun."""
    steps = len(sigmas) - 1
    restarts = {}
    if steps >= 20:
        r_steps, r_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = ref_karras(steps - r_steps * r_times, sigmas[-2], sigmas[0])
        restarts = {0.1: (r_steps + 1, r_times, 2.0)}
    near = lambda v: int(np.argmin([abs(s - v) for s in sigmas]))
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        for key, (r_steps, r_times, r_max) in restarts.items():
            if near(key) == i + 1 and near(r_max) < i + 1:
                levels = ref_karras(r_steps, sigmas[i + 1], sigmas[near(r_max)])[:-1]
                pairs += list(zip(levels[:-1], levels[1:])) * r_times
    last = None
    for s, s1 in pairs:
        if last is not None and last < s:
            x = x + noise(s, s1) * math.sqrt(s**2 - last**2)
        x = ref_heun(D, x, [s, s1], noise)
        last = s1
    return x


REF_SAMPLERS = {
    "Euler": ref_euler,
    "Euler a": ref_euler_ancestral,
    "Heun": ref_heun,
    "LMS": ref_lms,
    "DPM2": ref_dpm2,
    "DPM2 a": ref_dpm2_ancestral,
    "DPM++ 2S a": ref_dpmpp_2s_ancestral,
    "DPM++ SDE": ref_dpmpp_sde,
    "DPM++ 2M": ref_dpmpp_2m,
    "DPM++ 2M SDE": ref_dpmpp_2m_sde,
    "DPM++ 2M SDE Heun": lambda D, x, s, n: ref_dpmpp_2m_sde(D, x, s, n, solver_type="heun"),
    "DPM++ 3M SDE": ref_dpmpp_3m_sde,
    "Restart": ref_a1111_restart,
}
BROWNIAN = {"DPM++ SDE"}  # diffguide draws this one's noise from its Brownian tree


# -- running both sides on the mixture
# ----------------------------------------------------------------


class Draws:
    """Standard normal draws handed out in call order: two of these with one seed give diffguide and
    a transcription the same noise, step by step (the calls are counted to prove it)."""

    def __init__(self, seed, shape=(2, 2)):
        self.gen, self.shape, self.calls = torch.Generator().manual_seed(seed), shape, 0

    def __call__(self, *_):
        self.calls += 1
        return torch.randn(self.shape, generator=self.gen, dtype=torch.float64)


def _brownian(sc, draws, shape=(2,)):
    """The Brownian tree diffguide's dpmpp_sde builds from its first draw, as noise(s, s')
    increments."""
    import struct

    from diffguide.core.sample import BrownianTree

    seeds = [int.from_bytes(struct.pack("<d", float(v)), "little") for v in draws()[:, 0]]
    tree = BrownianTree(seeds, float(sc.sigma_min), float(sc.sigma_max), shape)
    return lambda s, s1: tree.increment(s, s1)


@pytest.fixture(scope="module")
def world(gmm):
    sc = gmm.schedule
    labels = torch.tensor([0, 2])
    table = sc.ve(torch.arange(sc.num_train_timesteps, dtype=torch.float64)).tolist()

    def D(x, sigma):  # the exact E[x0 | x0 + sigma z] at any level, off the table too
        return gmm.posterior_mean(x, 1.0, float(sigma), labels)

    bound = dg.guide(gmm, dg.parse_spec("guidance", "none"), labels)
    return sc, table, D, bound


def run_reference(world, label, sigmas, seed=3):
    sc, _, D, _ = world
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    draws = Draws(seed)
    noise = _brownian(sc, draws) if label in BROWNIAN else draws
    return REF_SAMPLERS[label](D, z * sigmas[0], sigmas, noise), draws.calls


def run_diffguide(world, spec, ts, seed=3):
    """diffguide's sampler from the same start, the result in VE coordinates (x / alpha at the
    end)."""
    sc, _, _, bound = world
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    draws = Draws(seed)
    x = dg.sample(bound, spec, ts, z * float(sc.ve(ts[0]) * sc.alpha(ts[0])), draws)
    return x / float(sc.alpha(ts[-1])), draws.calls


def grid_of(sc, ve_levels):
    """diffguide times for VE levels (the last one 0: the data end)."""
    return torch.cat(
        [
            sc.t_of_ve(torch.tensor(ve_levels[:-1], dtype=torch.float64)),
            torch.tensor(
                [
                    sc.t_min
                    if ve_levels[-1] == 0
                    else float(sc.t_of_ve(torch.tensor(ve_levels[-1], dtype=torch.float64)))
                ],
                dtype=torch.float64,
            ),
        ]
    )


def sampler_gap(world, label, spec, sigmas, same_draws=True):
    """max |diffguide - A1111| of one sampler run on one VE grid (same start, same noise)."""
    ref, ref_calls = run_reference(world, label, sigmas)
    got, calls = run_diffguide(world, spec, grid_of(world[0], sigmas))
    if same_draws and label not in BROWNIAN:  # one draw per noisy step on both sides
        assert calls == ref_calls, (label, spec, calls, ref_calls)
    return float((got - ref).abs().max())


def schedule_gap(world, label, spacing, n):
    """max relative |diffguide level - A1111 level| of a schedule at n steps."""
    sc, table = world[0], world[1]
    ref = torch.tensor(a1111_grid(label, n, table), dtype=torch.float64)
    got = sc.ve(dg.timesteps(sc, n, spacing))
    if got.numel() != ref.numel():
        return math.inf
    return float(((got - ref).abs() / ref.clamp(min=1e-300)).nan_to_num(0.0).max())


# -- every entry of the mappings against its transcription ---------------------------------------


@pytest.mark.parametrize("label", sorted(images.A1111_SAMPLERS))
def test_every_sampler_label_runs_what_a1111_runs(world, label):
    """The spec written (and read) for each A1111 sampler label makes A1111's steps, on a grid that
    ends
    on data (Karras) and on one that stops above it (A1111's KL Optimal), few steps and more."""
    _, table, _, _ = world
    lo, hi = table[0], table[-1]
    spec = images.A1111_SAMPLERS[label]
    for steps in (9, 16):
        for sigmas, above in (
            (ref_karras(steps, lo, hi), False),
            (ref_kl_optimal(steps, lo, hi), True),
        ):
            read, notice = images.a1111_sampler_spec(label, steps, above)
            assert notice is None and images.a1111_sampler_name(read, steps, above) == label
            assert sampler_gap(world, label, read, sigmas) < TOL, (label, read, steps, above)
    assert images.a1111_sampler_name(spec, 10) == label


@pytest.mark.parametrize("label", sorted(images.A1111_SCHEDULES))
def test_every_schedule_label_gives_a1111s_levels(world, label):
    """The spacing written (and read) for each A1111 schedule label has A1111's levels at every step
    count tried (AYS: but for its first level, see below)."""
    spacing = images.A1111_SCHEDULES[label]
    for n in (1, 2, 9, 10, 11, 16, 25, 38, 50):
        gap = schedule_gap(world, label, spacing, n)
        assert gap < (2.5e-5 if label == "Align Your Steps" and n > 1 else 1e-12), (label, n, gap)
    assert images.a1111_schedule_name(spacing, "sd") == label
    assert images.a1111_spacing(label, "Euler")[0] == spacing


def test_align_your_steps_is_a1111s_up_to_the_table_top(world):
    """A1111's AYS starts at 14.615, above SD's largest trained level 14.6146, where diffguide's
    grid
    stops (2.4e-5 relative); the samples still agree to 1e-6 on the mixture (measured 2e-7 for Euler
    and DPM++ 2M, 1e-6 for DPM++ 2M SDE at 10 steps, whose noise carries the start further)."""
    sc, table, _, _ = world
    assert REF_AYS["sd1"][0] > table[-1] and abs(REF_AYS["sd1"][0] / table[-1] - 1) < 2.5e-5
    for steps in (10, 20):
        for label in ("Euler", "DPM++ 2M", "DPM++ 2M SDE"):
            ref, _ = run_reference(world, label, ref_align_your_steps(steps))
            got, _ = run_diffguide(
                world, images.A1111_SAMPLERS[label], dg.timesteps(sc, steps, "ays_a1111")
            )
            assert float((got - ref).abs().max()) < 2 * TOL, (label, steps)
    assert (
        images.a1111_schedule_name("ays_a1111", "sdxl") == "ays_a1111"
    )  # A1111 takes its SDXL table there
    assert images.a1111_schedule_name("ays_a1111") == "ays_a1111"  # unknown family: no claim


@pytest.mark.parametrize(
    "label,spacing",
    [
        ("SGM Uniform", "sgm_uniform"),
        ("Beta", "beta"),
        ("Simple", "simple"),
        ("KL Optimal", "kl_optimal_a1111"),
        ("Polyexponential", "polyexponential"),
    ],
)
def test_labels_together_run_what_a1111_runs(world, label, spacing):
    """Whole A1111 runs (schedule function, then sampler function) against diffguide's pair."""
    sc, table, _, _ = world
    for sampler in ("Euler a", "DPM++ 2M SDE"):
        for steps in (9, 16):
            spec, _ = images.a1111_sampler_spec(sampler, steps, spacing in ("kl_optimal_a1111",))
            ref, _ = run_reference(world, sampler, a1111_grid(label, steps, table))
            got, _ = run_diffguide(world, spec, dg.timesteps(sc, steps, spacing))
            assert float((got - ref).abs().max()) < TOL, (label, sampler, steps)


# -- the labels that are not written, and why
# ----------------------------------------------------------


@pytest.mark.parametrize("label", ["DPM2", "DPM2 a", "DPM++ 3M SDE"])
def test_a1111_drops_the_next_to_last_level_for_these(world, label):
    """Their update is diffguide's nearest spec exactly, on the same levels, but A1111 makes the
    grid for steps + 1 and drops its next-to-last level: no spacing gives that at the same steps."""
    sc, table, _, _ = world
    spec = images.A1111_SAMPLERS_NEAREST[label][0]
    assert sampler_gap(world, label, spec, ref_karras(10, table[0], table[-1])) < TOL
    for schedule, spacing in (("Karras", "karras"), ("Exponential", "exponential")):
        ref, _ = run_reference(world, label, a1111_grid(schedule, 10, table, discard=True))
        got, _ = run_diffguide(world, spec, dg.timesteps(sc, 10, spacing))
        assert float((got - ref).abs().max()) > 1e-3
    assert images.a1111_sampler_name(spec, 10) == spec and label not in images.A1111_SAMPLERS


def test_diffguides_3m_sde_is_not_a1111s(world):
    """dpmpp_3m_sde (the corrected third-order term, a 2S start) was written as 'DPM++ 3M SDE';
    A1111's is k-diffusion's published one, heun-type second order, no lower order at the end."""
    _, table, _, _ = world
    lo, hi = table[0], table[-1]
    assert (
        sampler_gap(world, "DPM++ 3M SDE", "dpmpp_3m_sde", ref_kl_optimal(9, lo, hi)) > 0.5
    )  # 0.72
    assert sampler_gap(world, "DPM++ 3M SDE", "dpmpp_3m_sde", ref_karras(10, lo, hi)) > 0.05  # 0.12
    assert images.a1111_sampler_name("dpmpp_3m_sde", 10) == "dpmpp_3m_sde"


def test_restart_is_heun_below_20_steps_and_its_own_above(world):
    sc, table, _, _ = world
    lo, hi = table[0], table[-1]
    assert images.a1111_sampler_spec("Restart", 12) == ("heun", None)
    assert sampler_gap(world, "Restart", "heun", ref_karras(12, lo, hi)) < TOL
    for spec in ("heun", "restart"):
        assert sampler_gap(world, "Restart", spec, ref_karras(24, lo, hi), same_draws=False) > 0.1
    assert images.a1111_sampler_spec("Restart", 24)[1] is not None
    assert images.a1111_sampler_name("restart", 24) == "restart"


def test_a1111s_timestep_samplers_run_grids_no_spacing_gives(world):
    """DDIM and PLMS run timesteps 1 + k (1000 // n) and stop at timestep 1 (19 evaluations for 20
    steps); UniPC a grid uniform in index with levels log-linear in alpha, stopping at index 0; LCM
    a grid on its own 50-level table. No diffguide spacing ends at timestep 1, and none gives the
    others' levels."""
    sc, table, _, _ = world
    steps = 20
    ddim = np.clip(np.arange(0, 1000, 1000 // steps) + 1, 0, 999)
    assert len(ddim) - 1 == steps - 1 and ddim[0] == 1
    log_alpha = 0.5 * np.log(1 / (1 + np.asarray(table) ** 2))
    idx = np.linspace(999, 0, steps + 1)
    unipc = np.sqrt(
        np.expm1(-2 * np.interp(idx, np.arange(1000), log_alpha))
    )  # ve = sqrt(1/alpha^2 - 1)
    valid = [table[19 + 20 * j] for j in range(50)]
    lcm = [table_level(valid, (t - 19) / 20) for t in np.linspace(999, 19, 4)]
    for spacing in dg.core.spacing.SPACINGS:
        for n, levels in ((steps, unipc), (4, lcm)):
            try:
                ts = dg.timesteps(sc, n, spacing)
            except ValueError:
                continue
            assert float(ts[-1]) != 1.0
            ve = sc.ve(ts).numpy()
            assert len(ve) != len(levels) or np.abs(ve - np.asarray(levels)).max() > 1e-3, (
                spacing,
                n,
            )
    for label in ("DDIM", "PLMS", "UniPC", "LCM"):
        spec, notice = images.a1111_sampler_spec(label, steps)
        assert notice and images.a1111_sampler_name(spec, steps) == spec


@pytest.mark.parametrize(
    "spec",
    [
        "ipndm",
        "deis",
        "tcd",
        "dpmpp_2s_singlestep",
        "dpmpp_3m",
        "unipc",
        "plms",
        "ddim",
        "consistency",
        "restart",
        "dpm2",
        "dpm2_ancestral",
    ],
)
def test_samplers_a1111_lacks_or_runs_otherwise_keep_their_own_names(spec):
    assert images.a1111_sampler_name(spec, 20) == spec


def test_comfyuis_kl_optimal_and_ays_are_not_a1111s(world):
    """diffguide's kl_optimal and ays are ComfyUI's (transcribed here too); A1111's differ: its KL
    Optimal
    has n + 1 levels down to sigma_min and no step onto data, its AYS interpolates onto n levels."""
    sc, table, _, _ = world
    lo, hi = table[0], table[-1]
    from diffguide.core.spacing import AYS_LEVELS

    as_tensor = lambda levels: torch.tensor(levels, dtype=torch.float64)
    for n in (9, 10, 20):
        torch.testing.assert_close(
            sc.ve(dg.timesteps(sc, n, "kl_optimal")),
            as_tensor(ref_comfy_kl_optimal(n, lo, hi)),
            rtol=1e-12,
            atol=0,
        )
        torch.testing.assert_close(
            sc.ve(dg.timesteps(sc, n, "ays")),
            as_tensor(ref_comfy_align_your_steps(n, AYS_LEVELS["sd1"])),
            rtol=1e-9,
            atol=0,
        )
        for label, spacing in (("KL Optimal", "kl_optimal"), ("Align Your Steps", "ays")):
            ref, _ = run_reference(world, "Euler", a1111_grid(label, n, table))
            got, _ = run_diffguide(world, "euler", dg.timesteps(sc, n, spacing))
            assert float((got - ref).abs().max()) > 1e-3, (label, n)
    assert images.a1111_schedule_name("kl_optimal", "sd") == "kl_optimal"
    assert images.a1111_schedule_name("ays", "sd") == "ays"


def test_sgm_uniform_reads_the_table_log_linearly(world):
    """A1111's and ComfyUI's sgm_uniform read a fractional index's level log-linearly between
    entries
    (t_to_sigma, model_sampling.sigma); diffguide's VP time is linear in ve there: the spacing puts
    its times where the levels are theirs. Before, the levels were up to 1e-4 apart (3e-6 at 20
    steps)."""
    sc, table, _, _ = world
    worst = 0.0
    for n in range(1, 60):
        ref = torch.tensor(ref_sgm_uniform(n, table), dtype=torch.float64)
        torch.testing.assert_close(
            sc.ve(dg.timesteps(sc, n, "sgm_uniform")), ref, rtol=1e-12, atol=0
        )
        linear = sc.ve(torch.linspace(len(table) - 1, 0, n + 1, dtype=torch.float64)[:-1])
        worst = max(worst, float(((linear - ref[:-1]) / ref[:-1]).abs().max()))
    assert worst > 5e-5  # what the old times gave
    flow = dg.FlowSchedule(
        shift=3.0
    )  # a flow's levels are a formula of t: its grid stays uniform in t
    torch.testing.assert_close(
        dg.timesteps(flow, 8, "sgm_uniform")[:-1],
        torch.linspace(1, 1 / 1000, 9, dtype=torch.float64)[:-1],
    )


def test_simple_rounds_as_a1111_and_comfyui_do(world):
    """int(x * (T / n)), not int(x * T / n): they differ at 70 step counts up to 1000 (38 the
    first)."""
    for n in (12, 38, 76, 122):
        assert schedule_gap(world, "Simple", "simple", n) == 0.0


# -- what the files say ----------------------------------------------------------------------------

BASE = dict(prompt="p", steps=9, seed=0, width=8, height=8, model="m", guidance="cfg", version="0")


def fields_of(text):
    return images.parse_parameters(text)


def test_parameters_carry_a1111_names_only_where_checked():
    def names(sampler, spacing=None, steps=9, family="sd", grid=None):
        f = fields_of(
            images.parameters_text(
                {**BASE, "sampler": sampler, "spacing": spacing, "steps": steps}, family, grid
            )
        )
        return f["Sampler"], f.get("Schedule type")

    assert names("dpmpp_2m", "karras") == ("DPM++ 2M", "Karras")
    assert names("dpmpp_2m:lower_order_final=False", "karras") == ("DPM++ 2M", "Karras")
    assert names("dpmpp_2m", "kl_optimal_a1111") == (
        "dpmpp_2m",
        "KL Optimal",
    )  # its last step lowered
    assert names("dpmpp_2m", "kl_optimal_a1111", steps=16) == ("DPM++ 2M", "KL Optimal")
    assert names("dpmpp_2m:lower_order_final=False", "kl_optimal_a1111") == (
        "DPM++ 2M",
        "KL Optimal",
    )
    assert names("dpmpp_2m_sde:solver_type=heun", "uniform_lam") == (
        "DPM++ 2M SDE Heun",
        "Exponential",
    )
    assert names("dpmpp_3m_sde", "exponential") == ("dpmpp_3m_sde", "Exponential")
    assert names("euler_ancestral:eta=0.5", "sgm_uniform") == (
        "euler_ancestral:eta=0.5",
        "SGM Uniform",
    )
    assert names("ipndm", "kl_optimal") == ("ipndm", "kl_optimal")
    assert names("euler", "ays_a1111") == ("Euler", "Align Your Steps")
    assert names("euler", "ays_a1111", family="sdxl") == ("Euler", "ays_a1111")
    assert names("euler", grid={"spacing": "linspace", "drop_last": True}) == (
        "Euler",
        "linspace:drop_last=True",
    )
    assert names("euler", grid={"spacing": "karras"}) == ("Euler", "Karras")
    assert names("euler") == ("Euler", None)  # no grid known: no Schedule type


def _a1111_png(path, text):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return str(path)


def test_an_image_a1111_wrote_reads_as_the_specs_that_reproduce_it(tmp_path):
    png = _a1111_png(
        tmp_path / "a.png",
        "a cat, sitting\nNegative prompt: blurry\nSteps: 12, Sampler: DPM++ 2M, "
        "Schedule type: KL Optimal, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: "
        "6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Version: v1.10.1",
    )
    meta, notices = images.read_settings(png)
    assert meta == {
        "prompt": "a cat, sitting",
        "negative_prompt": "blurry",
        "steps": 12,
        "sampler": "dpmpp_2m:lower_order_final=False",
        "spacing": "kl_optimal_a1111",
        "seed": 1234,
        "width": 512,
        "height": 768,
        "guidance": "cfg",
        "scale": 7.0,
    }
    said = " ".join(notices)
    assert "Clip skip" in said and "v1-5-pruned-emaonly" in said and "own generator" in said
    assert "Model hash" not in said and "Version" not in said
    # A1111 before 1.9 named the schedule in the sampler; Eta is the sampler's eta
    meta, _ = images.read_settings(
        _a1111_png(
            tmp_path / "b.png",
            "x\nSteps: 20, Sampler: Euler a Karras, Eta: 0.5, CFG scale: 5, Seed: 1, Size: 8x8",
        )
    )
    assert (meta["sampler"], meta["spacing"]) == ("euler_ancestral:eta=0.5", "karras")
    meta, notices = images.read_settings(
        _a1111_png(
            tmp_path / "c.png",
            "x\nSteps: 20, Sampler: DPM++ 3M SDE, "
            "Schedule type: Exponential, CFG scale: 5, Seed: 1, Size: 8x8",
        )
    )
    assert meta["sampler"] == "dpmpp_3m_published:eta=1,solver_type=heun,lower_order_final=False"
    assert any("next-to-last level" in n for n in notices)
    _, notices = images.read_settings(
        _a1111_png(
            tmp_path / "d.png", "x\nSteps: 20, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 8x8"
        )
    )
    assert any("Uniform" in n for n in notices)  # no Schedule type: A1111 ran its Uniform levels
    from PIL import Image  # A1111's JPEG: the text in EXIF UserComment, 'UNICODE\0' + UTF-16

    exif = Image.Exif()
    text = (
        "x\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 1, Size: 8x8"
    )
    exif[images.EXIF_IFD] = {images.EXIF_USER_COMMENT: b"UNICODE\0" + text.encode("utf-16-be")}
    Image.new("RGB", (8, 8)).save(tmp_path / "g.jpg", exif=exif)
    meta, _ = images.read_settings(str(tmp_path / "g.jpg"))
    assert (meta["sampler"], meta["spacing"], meta["steps"]) == ("dpmpp_2m", "karras", 20)
    with pytest.raises(ValueError, match="no sampler for A1111's 'DPM adaptive'"):
        images.read_settings(
            _a1111_png(
                tmp_path / "e.png",
                "x\nSteps: 20, Sampler: DPM adaptive, CFG scale: 5, Seed: 1, Size: 8x8",
            )
        )
    with pytest.raises(ValueError, match="without Seed"):
        images.read_settings(
            _a1111_png(tmp_path / "f.png", "x\nSteps: 20, Sampler: Euler, Size: 8x8, CFG scale: 5")
        )


def test_what_is_written_reads_back_as_the_same_run():
    """Every label pair diffguide writes reads back (as from an A1111 image) to specs that make the
    same steps on the same levels."""
    for sampler in list(images.A1111_SAMPLERS.values()):
        for spacing in images.A1111_SCHEDULES.values():
            for steps in (9, 16):
                f = fields_of(
                    images.parameters_text(
                        {**BASE, "sampler": sampler, "spacing": spacing, "steps": steps}, "sd"
                    )
                )
                if f["Sampler"] not in images.A1111_SAMPLERS:
                    continue
                above = spacing in dg.core.spacing.ABOVE_DATA
                meta, _ = images.a1111_settings({**f, "Prompt": "p", "Negative prompt": ""})
                assert meta["spacing"] == spacing
                assert images._same_sampler(meta["sampler"], sampler, steps, above)


def test_cli_cfgpp_hint_quotes_the_runs_own_grid(tmp_path, capsys):
    """On the built-in model the command line's CFG++ error quotes that model's grid (4.2 at 25
    steps), as the Python call does, not SD's default one (6.8)."""
    from diffguide.cli.main import main
    from diffguide.guidance.cfgpp import equivalence

    gp = dg.GuidedPipeline.from_pretrained("builtin", progress=False)
    expect = equivalence(gp.info.schedule.ve(gp.info.timesteps(25)).tolist())
    for flags in (["--guidance", "cfgpp:scale=5"], ["--guidance", "cfgpp", "--scale", "5"]):
        code = main(["generate", "a cat", *flags, "--quiet", "-o", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        # the error line alone: a loading bar's rate (26.81it/s) may hold "6.8" too
        (line,) = [ln for ln in err.splitlines() if ln.startswith("diffguide: error:")]
        assert code == 2 and "on this run's grid (25 steps)" in line and expect in line, err
        assert "s / 4.2" in line and "6.8" not in line
    assert not (tmp_path / "x.png").exists()

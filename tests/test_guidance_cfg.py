"""CFG's schedules, interval and rescale; dynamic thresholding against diffusers and the formula."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import diffguide as dg
from helpers import SD, diffusers_loop


def _point(sc, t):
    return dg.Point(torch.as_tensor(t, dtype=torch.float64), sc)


@pytest.mark.parametrize(
    "sched,expected",
    [
        ("constant", lambda w, p: w),
        ("linear", lambda w, p: 2 * w * p),
        ("cosine", lambda w, p: w * (1 - math.cos(math.pi * p))),
        ("clamp_linear", lambda w, p: max(1.0, 2 * w * p)),
        ("clamp_cosine", lambda w, p: max(1.0, w * (1 - math.cos(math.pi * p)))),
    ],
)
def test_weight_schedules(sd, sched, expected):
    cfg = dg.CFG(scale=7.0, weight_schedule=sched)
    ts = torch.linspace(999, -1, 201, dtype=torch.float64)
    got = [float(cfg.scale_at(_point(sd, t))) for t in ts]
    want = [1 + expected(6.0, (999 - float(t)) / 1000) for t in ts]
    assert got == pytest.approx(want, abs=1e-12)
    if sched in ("linear", "cosine"):  # the mean over the run equals the static guidance
        assert sum(g - 1 for g in got[:-1]) / 200 == pytest.approx(6.0, rel=0.02)


def test_interval_uses_ve_sigma_and_skips_uncond(gmm, sd):
    cfg = dg.CFG(scale=4.0, sigma_lo=0.5, sigma_hi=3.0)
    ts = dg.timesteps(sd, 20, "karras")
    seen = []
    den = dg.guide(gmm, cfg, torch.arange(4), torch.full((4,), -1))
    dg.sample(den, "euler", ts, torch.randn(4, 2) * 14, callback=lambda st, x: seen.append(st.ve))
    inside = sum(0.5 <= v <= 3.0 for v in seen)
    assert den.nfe == 20 + inside and 0 < inside < 20
    for v in (0.49, 3.01):
        assert set(cfg.branches(_point(sd, sd.t_of_ve(torch.tensor(v))))) == {"c"}
    assert set(cfg.branches(_point(sd, sd.t_of_ve(torch.tensor(1.0))))) == {"c", "u"}


@pytest.mark.parametrize("space", ["x0", "eps", "v"])
def test_rescale(sd, space):
    sc = sd
    pt = _point(sc, 400.0)
    x = torch.randn(3, 4, 8, 8)
    c = dg.Pred.from_x0(x, torch.randn(3, 4, 8, 8), pt.a, pt.s)
    u = dg.Pred.from_x0(x, 0.3 * torch.randn(3, 4, 8, 8), pt.a, pt.s)
    get = {"x0": lambda p: p.x0, "eps": lambda p: p.eps, "v": lambda p: p.v(pt.a, pt.s)}[space]
    plain, _ = dg.CFG(scale=5.0).combine(x, pt, {"c": c, "u": u}, None)
    full, _ = dg.CFG(scale=5.0, rescale=1.0, rescale_space=space).combine(
        x, pt, {"c": c, "u": u}, None
    )
    half, _ = dg.CFG(scale=5.0, rescale=0.7, rescale_space=space).combine(
        x, pt, {"c": c, "u": u}, None
    )
    dims = (1, 2, 3)
    assert torch.allclose(get(full).std(dims), get(c).std(dims), rtol=1e-4)
    assert torch.allclose(get(half), 0.7 * get(full) + 0.3 * get(plain), atol=1e-4)
    assert torch.allclose(pt.a * full.x0 + pt.s * full.eps, x, atol=1e-4)


def test_rescale_eps_matches_diffusers_formula(sd):
    """In eps space our rescale is diffusers' rescale_noise_cfg (per-sample std over all dims)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    pt = _point(sd, 300.0)
    x = torch.randn(2, 4, 8, 8)
    ec, eu = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ours, _ = dg.CFG(scale=7.5, rescale=0.7, rescale_space="eps").combine(
        x,
        pt,
        {"c": dg.Pred.from_eps(x, ec, pt.a, pt.s), "u": dg.Pred.from_eps(x, eu, pt.a, pt.s)},
        None,
    )
    ref = rescale_noise_cfg(eu + 7.5 * (ec - eu), ec, guidance_rescale=0.7)
    assert torch.allclose(ours.eps, ref, atol=1e-5)


# --- dynamic thresholding ------------------------------------------------------------------------


def test_threshold_diffusers_mode_matches_diffusers():
    x0 = 1.7 * torch.randn(4, 3, 8, 8)
    ref = DDIMScheduler(thresholding=True, sample_max_value=1.5)._threshold_sample(x0.clone())
    p = dg.DynamicThreshold(max_value=1.5)(dg.Pred(x0, torch.zeros_like(x0)), x0, 0.6, 0.8)
    assert torch.allclose(p.x0, ref, atol=1e-6)


def test_threshold_imagen_mode_is_a_floor():
    x0 = torch.tensor([[0.1, -3.0, 2.0, 0.5]]).repeat(2, 1)
    x0[1] *= 0.1  # every |x0| < 1
    p = dg.DynamicThreshold(ratio=1.0, max_value=1.0, mode="imagen")(
        dg.Pred(x0, 0 * x0), x0, 0.6, 0.8
    )
    assert torch.allclose(p.x0[0], x0[0].clamp(-3, 3) / 3)  # s = 3 (no cap, unlike diffusers)
    assert torch.allclose(p.x0[1], x0[1])  # s = max(0.3, 1) = 1
    capped = dg.DynamicThreshold(ratio=1.0, max_value=1.5)(dg.Pred(x0, 0 * x0), x0, 0.6, 0.8)
    assert torch.allclose(capped.x0[0], x0[0].clamp(-1.5, 1.5) / 1.5)


def test_thresholded_dpmpp_matches_diffusers(gmm, sd):
    """Pixel-space style run: diffusers' DPM-Solver++ with thresholding=True, same exact model."""
    labels = torch.tensor([0, 1, 2, 3])

    def model(
        x, t, lab
    ):  # diffusers' thresholding wants (B, C, ...): the 2-D points ride as [B, 2, 1]
        t = torch.as_tensor(t, dtype=torch.float64)
        a, s = sd.alpha(t), sd.sigma(t)
        x = x[..., 0]
        return ((x.double() - a * 1.8 * gmm.posterior_mean(x, a, s, lab)) / s).float()[..., None]

    class Scaled:  # a mixture of radius 1.8 so that thresholding at 1.2 bites
        schedule = sd

        def __call__(self, x, t, cond):
            p = gmm(x, t, cond)
            return dg.Pred.from_x0(
                x,
                1.8 * p.x0,
                *(f(torch.as_tensor(t, dtype=torch.float64)) for f in (sd.alpha, sd.sigma)),
            )

    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    sched = DPMSolverMultistepScheduler(
        **SD, thresholding=True, sample_max_value=1.2, dynamic_thresholding_ratio=0.9
    )
    ref = diffusers_loop(sched, model, z[..., None], 12, labels, torch.full((4,), -1), 3.0)[..., 0]
    den = dg.guide(
        Scaled(),
        dg.CFG(scale=3.0),
        labels,
        torch.full((4,), -1),
        threshold=dg.DynamicThreshold(ratio=0.9, max_value=1.2),
    )
    x = dg.sample(den, "dpmpp_2m", dg.timesteps(sd, 12, "linspace", drop_last=True), z)
    assert (x - ref).abs().max() < 1e-5
    assert ref.abs().max() <= 1.0 + 1e-6  # thresholding really was active

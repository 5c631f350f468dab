"""Schedules and spacings, checked against closed forms and against diffusers' own tables and
grids."""

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

import diffguide as dg
from helpers import SD

F64 = torch.float64


@pytest.mark.parametrize(
    "cfg",
    [
        dict(SD),
        dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(SD, rescale_betas_zero_snr=True),
    ],
)
def test_vp_table_matches_diffusers(cfg):
    ours = dg.VPSchedule.from_betas(**cfg)
    ref = DDIMScheduler(**cfg).alphas_cumprod.double()
    assert torch.equal(ours.alphas_cumprod, ref)


@pytest.mark.parametrize("ztsnr", [False, True])
def test_vp_identities(ztsnr):
    sc = dg.VPSchedule.from_betas(**SD, rescale_betas_zero_snr=ztsnr)
    t = torch.linspace(-1, 999, 2001, dtype=F64)
    a, s = sc.alpha(t), sc.sigma(t)
    assert torch.allclose(a * a + s * s, torch.ones_like(a), atol=1e-12)
    assert a[0] == 1 and s[0] == 0 and math.isinf(float(sc.lam(t[0])))
    # at integer t the table values are exact
    idx = torch.arange(1000, dtype=F64)
    assert torch.allclose(sc.alpha(idx) ** 2, sc.alphas_cumprod, rtol=1e-12, atol=1e-15)
    if ztsnr:
        assert sc.alpha(999.0) == 0 and sc.sigma(999.0) == 1
    # t_of_lam inverts lam wherever lam is finite
    inner = t[1:-1] if ztsnr else t[1:]
    assert torch.allclose(sc.t_of_lam(sc.lam(inner)), inner, atol=1e-7)
    assert torch.all(sc.lam(t[1:]) < sc.lam(t[:-1]))  # strictly decreasing towards noise


def test_vp_interpolates_like_diffusers_euler(sd):
    """Between table entries diffusers interpolates the VE sigma linearly (np.interp)."""
    ac = DDIMScheduler(**SD).alphas_cumprod
    table = (((1 - ac) / ac) ** 0.5).numpy()
    t = np.array([0.25, 10.5, 123.456, 998.9])
    ref = np.interp(t, np.arange(1000), table.astype(np.float64))
    assert np.allclose(sd.ve(torch.tensor(t)).numpy(), ref, rtol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_identities(shift):
    sc = dg.FlowSchedule(shift=shift)
    t = torch.linspace(0, 1, 101, dtype=F64)
    sf = shift * t / (1 + (shift - 1) * t)
    assert torch.allclose(sc.sigma(t), sf) and torch.allclose(sc.alpha(t), 1 - sf)
    assert torch.allclose(sc.model_time(t), 1000 * sf)
    inner = t[1:-1]
    assert torch.allclose(sc.t_of_lam(sc.lam(inner)), inner, atol=1e-12)
    assert sc.alpha(1.0) == 0 and sc.sigma(0.0) == 0


# --- spacings versus diffusers' set_timesteps
# --------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 10, 20, 50])
@pytest.mark.parametrize(
    "spacing,opts", [("linspace", {}), ("leading", {"steps_offset": 1}), ("trailing", {})]
)
def test_ddim_grids(sd, n, spacing, opts):
    ref = DDIMScheduler(**SD, timestep_spacing=spacing, **opts)
    ref.set_timesteps(n)
    # diffusers' DDIM linspace grid evaluates at t = 0 itself (and then steps to t - T//N, not to
    # the next grid point), so here the grid can only end at the data end.
    final = "zero" if spacing == "linspace" else "sigma_min"
    if spacing == "linspace" and n == 1:  # diffusers' grid is [0]
        assert dg.timesteps(sd, 1, spacing, final=final).tolist() == [0.0, -1.0]
        return
    ts = dg.timesteps(sd, n, spacing, final=final, **opts)
    assert ts[:-1].tolist() == ref.timesteps.double().tolist()
    assert ts[-1] == (-1 if final == "zero" else 0)


@pytest.mark.parametrize("n", [5, 10, 20, 25])
@pytest.mark.parametrize(
    "spacing,opts", [("linspace", {}), ("leading", {"steps_offset": 1}), ("trailing", {})]
)
def test_dpmsolver_grids(sd, n, spacing, opts):
    ref = DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing, **opts)
    ref.set_timesteps(n)
    ts = dg.timesteps(sd, n, spacing, drop_last=spacing != "trailing", **opts)
    assert ts[:-1].tolist() == ref.timesteps.double().tolist()
    assert torch.allclose(sd.ve(ts).float(), ref.sigmas, rtol=1e-6)  # ends in 0


@pytest.mark.parametrize("n", [4, 10, 30])
def test_euler_fractional_linspace(sd, n):
    ref = EulerDiscreteScheduler(**SD)
    ref.set_timesteps(n)
    ts = dg.timesteps(sd, n, "linspace", round=False)
    assert torch.allclose(ts[:-1].float(), ref.timesteps)
    assert torch.allclose(sd.ve(ts).float(), ref.sigmas, rtol=1e-6)


def test_karras_sigmas_match_diffusers(sd):
    ref = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    ref.set_timesteps(12)
    ts = dg.timesteps(sd, 12, "karras")
    assert torch.allclose(sd.ve(ts).float(), ref.sigmas, rtol=1e-5)


def test_uniform_lam_is_uniform(sd):
    ts = dg.timesteps(sd, 10, "uniform_lam", final="sigma_min")
    lam = sd.lam(ts)
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(10), atol=1e-9)
    assert math.isclose(float(sd.ve(ts[0])), sd.sigma_max, rel_tol=1e-9)
    assert math.isclose(float(sd.ve(ts[-1])), sd.sigma_min, rel_tol=1e-9)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_grid_matches_flowmatch_euler(shift):
    """FlowMatchEulerDiscreteScheduler's grid, its double shift of sigma_min included."""
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(8)
    sc = dg.FlowSchedule(shift=shift)
    ts = dg.timesteps(sc, 8, "uniform_t", t_end=ref.sigma_min)
    assert torch.allclose(sc.sigma(ts).float(), ref.sigmas, atol=1e-6)
    assert torch.allclose(sc.model_time(ts[:-1]).float(), ref.timesteps, atol=1e-3)


def test_uniform_t_ends_at_data(sd):
    ts = dg.timesteps(sd, 10, "uniform_t")
    ref = DDIMScheduler(**SD, timestep_spacing="trailing")
    ref.set_timesteps(10)
    assert ts[:-1].tolist() == ref.timesteps.double().tolist() and ts[-1] == sd.t_min
    flow = dg.timesteps(dg.FlowSchedule(), 4, "uniform_t")
    assert flow.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_beta_spacing_is_diffusers_beta_sigmas_and_its_quantile_is_scipys():
    """use_beta_sigmas: ve_i = lo + F^-1(1 - i/(n-1)) (hi - lo) with Beta(0.6, 0.6) (diffusers
    computes F^-1 with scipy; diffguide has its own, checked here against scipy's)."""
    import numpy as np
    import scipy.stats
    from diffusers import EulerDiscreteScheduler

    from diffguide.core.spacing import beta_cdf, beta_quantile

    for p in (1e-6, 0.01, 0.3, 0.5, 0.77, 0.999999):
        for a, b in ((0.6, 0.6), (2.0, 5.0), (0.5, 3.0)):
            assert abs(beta_quantile(p, a, b) - scipy.stats.beta.ppf(p, a, b)) < 1e-11
            assert abs(beta_cdf(p, a, b) - scipy.stats.beta.cdf(p, a, b)) < 1e-11
    s = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_beta_sigmas=True
    )
    sched = dg.VPSchedule.from_betas(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    for n in (4, 10, 30):
        s.set_timesteps(n)
        ours = sched.ve(dg.timesteps(sched, n, "beta")).numpy()
        assert np.allclose(ours, s.sigmas.numpy(), rtol=1e-5, atol=1e-6)
    ours = sched.ve(dg.timesteps(sched, 10, "exponential"))
    assert torch.allclose(ours, sched.ve(dg.timesteps(sched, 10, "uniform_lam")))

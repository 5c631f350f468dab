"""Bad input gets one clear message naming the bad value and what is allowed."""

import pytest
import torch

import diffguide as dg


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown sampler 'dpm_2m'; choose one of: consistency, ddim, .*dpmpp_2m, .*heun",
    ):
        dg.get_sampler("dpm_2m")
    with pytest.raises(
        ValueError,
        match=r"unknown guidance 'cgf'; choose one of: ag, apg, apg_mix, autoguidance, cfg, "
        r"cfg_renorm, cfg_zero_star, cfgpp, fdg, fresca, icg, .*, tsg",
    ):
        dg.get_guidance("cgf")
    with pytest.raises(ValueError, match=r"unknown sampler 'nope'"):
        dg.sample(
            dg.guide(dg.GaussianMixture.ring(dg.VPSchedule.from_betas()), None, None),
            "nope",
            [999.0, -1.0],
            torch.zeros(1, 2),
        )


def test_unknown_and_bad_options():
    with pytest.raises(
        ValueError, match=r"sampler 'dpmpp_2m' has no option 'order'; allowed: solver_type, eta"
    ):
        dg.get_sampler("dpmpp_2m", order=3)
    with pytest.raises(
        ValueError, match=r"unknown solver_type 'bogus'; choose one of: midpoint, heun"
    ):
        dg.get_sampler("dpmpp_2m", solver_type="bogus")
    with pytest.raises(ValueError, match=r"eta must be >= 0, got -1"):
        dg.get_sampler("ddim", eta=-1)
    with pytest.raises(
        ValueError, match=r"unknown weight_schedule 'cos'; choose one of: constant, linear"
    ):
        dg.get_guidance("cfg", weight_schedule="cos")
    with pytest.raises(ValueError, match=r"rescale must be in \[0, 1\], got 2"):
        dg.get_guidance("cfg", rescale=2)
    with pytest.raises(ValueError, match=r"r must be in \(0, 1\], got 0"):
        dg.get_sampler("dpmpp_2s", r=0)


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("cfg:scale", r"malformed guidance spec 'cfg:scale': 'scale' is not key=value"),
        ("cfg:scale=high", r"guidance 'cfg' option scale: expected a number, got 'high'"),
        ("cfg:size=3", r"guidance 'cfg' has no option 'size'; allowed: scale, weight_schedule"),
        ("", r"empty guidance spec"),
        ("xyz:scale=1", r"unknown guidance 'xyz'"),
    ],
)
def test_bad_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        dg.parse_spec("guidance", spec)


def test_spec_round_trip():
    cfg = dg.parse_spec("guidance", "cfg:scale=7.5,rescale=0.7,weight_schedule=cosine")
    assert cfg == dg.CFG(scale=7.5, rescale=0.7, weight_schedule="cosine")
    assert dg.parse_spec("guidance", dg.to_spec(cfg)) == cfg
    s = dg.parse_spec("sampler", "dpmpp_2m:solver_type=heun,lower_order_final=false")
    assert s == dg.get_sampler("dpmpp_2m", solver_type="heun", lower_order_final=False)
    assert dg.to_spec(s) == "dpmpp_2m:solver_type=heun,lower_order_final=False"


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10"])
def test_bad_steps(sd, steps):
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got"):
        dg.timesteps(sd, steps)


def test_spacing_that_does_not_fit(sd):
    with pytest.raises(
        ValueError,
        match=r"unknown spacing 'cosine'; choose one of: karras, exponential, beta, .*uniform_lam",
    ):
        dg.timesteps(sd, 10, "cosine")
    with pytest.raises(
        ValueError, match=r"spacing 'leading' indexes a discrete VP table; FlowSchedule supports"
    ):
        dg.timesteps(dg.FlowSchedule(), 10, "leading")
    with pytest.raises(ValueError, match=r"steps=2000 exceeds the 1000 training timesteps"):
        dg.timesteps(sd, 2000, "leading")
    with pytest.raises(
        ValueError, match=r"spacing 'karras' takes no option 'steps_offset'; allowed: rho"
    ):
        dg.timesteps(sd, 10, "karras", steps_offset=1)
    with pytest.raises(ValueError, match=r"drop_last applies to the diffusers spacings"):
        dg.timesteps(sd, 10, "karras", drop_last=True)
    with pytest.raises(ValueError, match=r"unknown final 'none'; choose one of: zero, sigma_min"):
        dg.timesteps(sd, 10, final="none")
    ztsnr = dg.VPSchedule.from_betas(rescale_betas_zero_snr=True)
    with pytest.raises(
        ValueError, match=r"zero-terminal-SNR schedule must be given a finite sigma_max"
    ):
        dg.timesteps(ztsnr, 10, "karras")


def test_bad_grids_and_samples(sd, gmm):
    den = dg.guide(gmm, None, torch.zeros(2, dtype=torch.long))
    x = torch.randn(2, 2)
    with pytest.raises(ValueError, match="ts must be strictly descending"):
        dg.sample(den, "euler", [10.0, 500.0], x)
    with pytest.raises(
        ValueError, match=r"ts has values outside this schedule's range \[-1.0, 999.0\]"
    ):
        dg.sample(den, "euler", [1500.0, 10.0], x)
    with pytest.raises(ValueError, match="at least 2 points"):
        dg.sample(den, "euler", [10.0], x)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        dg.sample(den, "euler", [10.0, -1.0], torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"denoise must be an \(x, t\) -> Pred callable with a .schedule"
    ):
        dg.sample(lambda x, t: None, "euler", [10.0, -1.0], x)


def test_shape_mismatches(sd, gmm):
    with pytest.raises(
        ValueError, match=r"condition 'pos' has batch \(3,\) but the sample has batch 4"
    ):
        dg.guide(gmm, None, torch.zeros(3, dtype=torch.long))(
            torch.randn(4, 2), torch.tensor(500.0)
        )
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2\], got \(4, 3\)"):
        dg.guide(gmm, None, None)(torch.randn(4, 3), torch.tensor(500.0))
    with pytest.raises(ValueError, match=r"unknown class label 9; this mixture has \[0, 1, 2, 3\]"):
        dg.guide(gmm, None, torch.tensor([9]))(torch.randn(1, 2), torch.tensor(500.0))
    net = dg.NetDenoiser(lambda x, t, c: torch.cat([x, x], 1), sd, "eps")  # learned-sigma output
    with pytest.raises(
        ValueError,
        match=r"network output shape \(1, 8, 2, 2\) does not match the sample shape \(1, 4, 2, 2\)",
    ):
        net(torch.randn(1, 4, 2, 2), torch.tensor(500.0))
    ok = dg.NetDenoiser(lambda x, t, c: torch.cat([x, x], 1), sd, "eps", learned_sigma=True)
    assert ok(torch.randn(1, 4, 2, 2), torch.tensor(500.0)).x0.shape == (1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"t must be a scalar or have one entry per sample \(4\)"):
        net(torch.randn(4, 4, 2, 2), torch.ones(3))


def test_missing_condition(gmm):
    den = dg.guide(gmm, dg.CFG(scale=5.0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"CFG needs condition 'neg'; this run has: pos \(pass uncond= for 'neg'\)"
    ):
        den(torch.randn(2, 2), torch.tensor(500.0))


def test_bad_schedules():
    with pytest.raises(ValueError, match="alphas_cumprod must be strictly decreasing"):
        dg.VPSchedule(torch.linspace(0.1, 0.9, 10))
    with pytest.raises(ValueError, match=r"FlowSchedule shift must be a positive number, got -1"):
        dg.FlowSchedule(shift=-1)
    with pytest.raises(ValueError, match=r"unknown beta_schedule 'cosine'; choose one of: linear"):
        dg.VPSchedule.from_betas(beta_schedule="cosine")
    with pytest.raises(ValueError, match=r"unknown prediction kind 'noise'"):
        dg.NetDenoiser(lambda *a: None, dg.FlowSchedule(), "noise")

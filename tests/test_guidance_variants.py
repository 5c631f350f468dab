"""CFG++, APG, ICG, TSG and Adaptive Guidance: identities, paper-equation references, NFE, state."""

import math

import numpy as np

import pytest
import torch

import diffguide as dg
from helpers import WellPosed, tiny_unet

F64 = torch.float64
LABELS = torch.arange(8) % 4
NULL = torch.full((8,), -1)


def _x(gm, ts, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=F64) * float(gm.schedule.sigma(ts[0]))


def _run(gm, guidance, sampler, ts, x, **kw):
    d = dg.guide(gm, guidance, LABELS, NULL, **kw)
    out = dg.sample(d, sampler, ts, x.clone(), dg.SeededNoise(range(x.shape[0])))
    return out, d


def _same(gm, sd, a, b, sampler="dpmpp_2m", tol=0.0):
    """Specs a and b give the same samples (within tol) from the same noise; their denoisers."""
    ts = dg.timesteps(sd, 10, "karras")
    x = _x(gm, ts)
    (ra, da), (rb, db) = _run(gm, a, sampler, ts, x), _run(gm, b, sampler, ts, x)
    assert (ra - rb).abs().max() <= tol, (a, b)
    return da, db


# -- CFG++ -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", dg.list_samplers())
def test_cfgpp_lambda_zero_is_the_unconditional_sampler(spec, gmm, sd):
    ts = dg.timesteps(sd, 8, "karras")
    x = _x(gmm, ts)
    a, _ = _run(gmm, "cfgpp:scale=0", spec, ts, x)
    b = dg.sample(dg.guide(gmm, "none", NULL), spec, ts, x.clone(), dg.SeededNoise(range(8)))
    assert torch.equal(a, b)


def test_cfgpp_ddim_matches_the_paper_update(gmm, sd):
    """Chung et al. 2024, Alg. 1 written out: x0 from eps_lam, x_prev = sqrt(ab') x0 + sqrt(1-ab')
    eps_u."""
    ts = dg.timesteps(sd, 10, "leading")
    x = _x(gmm, ts)
    lam = 0.7
    ref = x.clone()
    for t, t1 in zip(ts[:-1], ts[1:]):
        a, s = float(sd.alpha(t)), float(sd.sigma(t))
        a1, s1 = float(sd.alpha(t1)), float(sd.sigma(t1))
        eps_c = (ref - a * gmm.posterior_mean(ref, a, s, LABELS)) / s
        eps_u = (ref - a * gmm.posterior_mean(ref, a, s, NULL)) / s
        eps_l = eps_u + lam * (eps_c - eps_u)
        x0 = (ref - s * eps_l) / a
        ref = a1 * x0 + s1 * eps_u
    out, d = _run(gmm, f"cfgpp:scale={lam}", "ddim", ts, x)
    assert (out - ref).abs().max() < 1e-10
    assert d.nfe == 2 * 10


@pytest.mark.parametrize("history", ["uncond", "guided"])
def test_cfgpp_dpmpp_2m_matches_comfyui_formulation(gmm, sd, history):
    """ComfyUI's / the authors' dpm++_2m_cfg++ in VE coordinates:
    y' = D_lam + e^-h (y - D_u) + (1 - e^-h)/(2r) (D_lam - D_u,prev); history="guided" uses
    D_lam,prev."""
    ts = dg.timesteps(sd, 12, "karras")
    x = _x(gmm, ts)
    lam = 0.5
    y = x / float(sd.alpha(ts[0]))
    prev, h_prev = None, None
    for i, (t, t1) in enumerate(zip(ts[:-1], ts[1:])):
        a, s, ve, ve1 = float(sd.alpha(t)), float(sd.sigma(t)), float(sd.ve(t)), float(sd.ve(t1))
        du = gmm.posterior_mean(y * a, a, s, NULL)
        dl = du + lam * (gmm.posterior_mean(y * a, a, s, LABELS) - du)
        if ve1 == 0:  # onto data: the x0 estimate
            y = dl
            break
        h = math.log(ve / ve1)
        step = dl + math.exp(-h) * (y - du)
        # diffusers' lower_order_final (< 15 steps): the last step is first order
        if prev is not None and i < len(ts) - 2:
            r = h_prev / h
            step = step + (-math.expm1(-h)) / (2 * r) * (dl - prev)
        prev, h_prev = (du if history == "uncond" else dl), h
        y = step
    ref = y * float(sd.alpha(ts[-1]))
    out, _ = _run(gmm, f"cfgpp:scale={lam},history={history}", "dpmpp_2m", ts, x)
    assert (out - ref).abs().max() < 1e-9


def test_cfgpp_flow_renoises_with_the_unconditional_eps():
    """Flow variant (b) of the authors: x_t' = (1 - t') x0_lam + t' eps_u."""
    fs = dg.FlowSchedule()
    gm = dg.GaussianMixture.ring(fs)
    ts = dg.timesteps(fs, 6)
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    ref = x.clone()
    for t, t1 in zip(ts[:-1], ts[1:]):
        a, s, a1, s1 = (float(v) for v in (fs.alpha(t), fs.sigma(t), fs.alpha(t1), fs.sigma(t1)))
        pu = gm(ref, t, NULL)
        pc = gm(ref, t, LABELS)
        ref = a1 * (pu.x0 + 0.4 * (pc.x0 - pu.x0)) + s1 * pu.eps
    out, _ = _run(gm, "cfgpp:scale=0.4", "euler", ts, x)
    assert (out - ref).abs().max() < 1e-10


def test_cfgpp_rejects_a_cfg_scale():
    with pytest.raises(ValueError, match="lambda in"):
        dg.parse_spec("guidance", "cfgpp:scale=7.5")


# -- APG -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["x0", "eps", "v"])
def test_apg_without_its_parts_is_cfg(gmm, sd, space):
    _same(
        gmm,
        sd,
        f"apg:scale=4,eta=1,norm_threshold=0,momentum=0,space={space}",
        "cfg:scale=4",
        tol=1e-9,
    )


def _apg_reference(dc, du, w, eta, r, beta, buf):
    """Sadat et al. 2024, Alg. 1 on one batch, in numpy-like float64 steps."""
    diff = dc - du
    if beta != 0:
        diff = diff + (beta * buf if buf is not None else 0)
        buf = diff
    norm = diff.flatten(1).norm(dim=1).view(-1, *[1] * (diff.ndim - 1))
    if r > 0:
        diff = diff * torch.clamp(r / norm, max=1)
    unit = dc / dc.flatten(1).norm(dim=1).view(-1, *[1] * (dc.ndim - 1))
    par = (diff * unit).flatten(1).sum(1).view(-1, *[1] * (dc.ndim - 1)) * unit
    return dc + (w - 1) * ((diff - par) + eta * par), buf


def test_apg_matches_the_paper_algorithm_on_the_mixture(gmm, sd):
    ts = dg.timesteps(sd, 10, "leading")
    x = _x(gmm, ts)
    w, eta, r, beta = 6.0, 0.3, 0.8, -0.5
    ref, buf = x.clone(), None
    for t, t1 in zip(ts[:-1], ts[1:]):
        a, s, a1, s1 = (float(v) for v in (sd.alpha(t), sd.sigma(t), sd.alpha(t1), sd.sigma(t1)))
        d, buf = _apg_reference(
            gmm.posterior_mean(ref, a, s, LABELS),
            gmm.posterior_mean(ref, a, s, NULL),
            w,
            eta,
            r,
            beta,
            buf,
        )
        ref = a1 * d + s1 * (ref - a * d) / s  # DDIM
    out, _ = _run(
        gmm, f"apg:scale={w},eta={eta},norm_threshold={r},momentum={beta},norm=l2", "ddim", ts, x
    )
    assert (out - ref).abs().max() < 1e-9
    plain, _ = _run(gmm, f"cfg:scale={w}", "ddim", ts, x)
    assert (out - plain).abs().max() > 1e-2  # the projection, clamp and momentum all bite here


def test_apg_matches_diffusers_guider_on_raw_output():
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    sd = dg.VPSchedule.from_betas()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    apg = dg.parse_spec(
        "guidance",
        "apg:scale=7.5,eta=0.4,norm_threshold=20,momentum=-0.3,space=eps,base=uncond,norm=l2",
    )
    buf, state = MomentumBuffer(-0.3), apg.init_state()
    for t in (900, 700, 500):
        pt = dg.Point(torch.tensor(float(t), dtype=F64), sd)
        ec, eu = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g) * 3
        preds = {"c": dg.Pred.from_eps(x, ec, pt.a, pt.s), "u": dg.Pred.from_eps(x, eu, pt.a, pt.s)}
        ours, state = apg.combine(x, pt, preds, state)
        theirs = normalized_guidance(ec, eu, 7.5, buf, 0.4, 20.0, False)
        assert (ours.eps - theirs).abs().max() < 1e-5


@pytest.mark.parametrize(
    "spec",
    [
        "apg:scale=5,momentum=-0.5,norm_threshold=0.5",
        "ag:scale=5,threshold=0.995",
        "linear_ag:scale=5,until=1",
        "icg:scale=3,classes=4",
    ],
)
def test_state_resets_between_runs(gmm, sd, spec):
    """One guided denoiser used for two runs: momentum, switches and histories start afresh."""
    ts = dg.timesteps(sd, 8, "karras")
    x = _x(gmm, ts)
    d = dg.guide(gmm, spec, LABELS, NULL)
    first = dg.sample(d, "dpmpp_2m", ts, x.clone(), dg.SeededNoise(range(8)))
    nfe = d.nfe
    second = dg.sample(d, "dpmpp_2m", ts, x.clone(), dg.SeededNoise(range(8)))
    assert torch.equal(first, second) and d.nfe == nfe


# -- ICG -------------------------------------------------------------------------------------------


def test_icg_with_the_null_condition_is_cfg(gmm, sd):
    _same(gmm, sd, "icg:scale=3,condition=null", "cfg:scale=3")


def test_icg_random_class_is_redrawn_per_step_and_reproducible(gmm, sd):
    ts = dg.timesteps(sd, 10, "karras")
    x = _x(gmm, ts)
    seen = []

    class Spy:
        schedule = sd

        def __call__(self, x, t, cond):
            seen.append(cond.clone())
            return gmm(x, t, cond)

    a, d = _run(Spy(), "icg:scale=3,classes=4", "euler", ts, x)
    b, _ = _run(Spy(), "icg:scale=3,classes=4", "euler", ts, x)
    assert torch.equal(a, b) and d.nfe == 20
    drawn = [
        c[8:] for c in seen[:10]
    ]  # rows 8.. of each batched forward are the independent labels
    assert all(((c >= 0) & (c < 4)).all() for c in drawn)
    assert len({tuple(c.tolist()) for c in drawn}) > 1  # redrawn, not fixed for the run
    allc = torch.cat(drawn)
    assert len(set(allc.tolist())) == 4


def test_icg_needs_class_count_without_null_label(gmm, sd):
    ts = dg.timesteps(sd, 4, "karras")
    with pytest.raises(ValueError, match="classes=N"):
        _run(gmm, "icg:scale=3", "euler", ts, _x(gmm, ts))


def test_icg_text_condition_is_noise_with_the_prompt_std():
    from diffguide.guidance.icg import independent

    pos = {"text": torch.randn(2, 5, 16) * 3 + 1, "added": {"time_ids": torch.ones(2, 6)}}
    neg = {"text": torch.zeros(2, 5, 16), "added": {"time_ids": torch.ones(2, 6)}}
    out = independent(pos, neg, dg.SeededNoise([1, 2]))
    assert (
        out["added"]["time_ids"] is pos["added"]["time_ids"]
    )  # equal in pos and neg: not a condition
    assert out["text"].shape == pos["text"].shape
    assert abs(out["text"].std().item() - pos["text"].std().item()) < 0.5
    assert abs(out["text"].mean().item()) < 0.8  # zero-mean noise (std of the mean here: 0.24)


# -- TSG -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    sd = dg.VPSchedule.from_betas()
    return WellPosed(sd, tiny_unet(3), "eps")


def _tiny_run(model, guidance, sampler="ddim", steps=6, seeds=(0, 1)):
    sd = model.schedule
    ts = dg.timesteps(sd, steps)
    emb = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(5)).expand(
        len(seeds), -1, -1
    )
    d = dg.guide(model.denoiser(), guidance, emb, torch.zeros_like(emb))
    noise = dg.SeededNoise(seeds)
    with torch.no_grad():
        x = dg.sample(d, sampler, ts, noise.randn((len(seeds), 4, 8, 8)), noise)
    return x, d


def test_tsg_perturbs_only_through_a_removed_hook(tiny):
    x = torch.randn(1, 4, 8, 8)
    e = torch.randn(1, 3, 32)
    with torch.no_grad():
        before = tiny.unet(x, 500, encoder_hidden_states=e).sample
        plain, _ = _tiny_run(tiny, "none")
        zero, d0 = _tiny_run(tiny, "tsg:scale=3,noise=0")
        guided, d = _tiny_run(tiny, "tsg:scale=3,noise=2,t_lo=0,t_hi=1")
        after = tiny.unet(x, 500, encoder_hidden_states=e).sample
    assert torch.equal(before, after)
    assert not tiny.unet.time_embedding._forward_hooks
    assert (zero - plain).abs().max() < 1e-5  # no perturbation: D(t) + w (D(t) - D(t)) = D(t)
    assert (guided - plain).abs().max() > 1e-3
    assert d.nfe == 12 and d.forwards == 12  # the perturbed branch is its own forward


def test_tsg_window_skips_the_perturbed_branch(tiny):
    _, d = _tiny_run(tiny, "tsg:scale=3,t_lo=0.5,t_hi=1", steps=6)
    assert 6 < d.nfe < 12


def test_tsg_needs_a_module(gmm, sd):
    ts = dg.timesteps(sd, 4, "karras")
    with pytest.raises(ValueError, match="TSG needs a denoiser with .module"):
        _run(gmm, "tsg:t_lo=0", "euler", ts, _x(gmm, ts))


# -- Adaptive Guidance -----------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["x0", "eps"])
def test_ag_threshold_above_one_is_cfg(gmm, sd, space):
    d, _ = _same(gmm, sd, f"ag:scale=4,threshold=1.5,space={space}", "cfg:scale=4")
    assert d.nfe == 20


def test_ag_threshold_minus_one_is_conditional_after_the_first_step(gmm, sd):
    ts = dg.timesteps(sd, 10, "karras")
    x = _x(gmm, ts)
    a, d = _run(gmm, "ag:scale=4,threshold=-1", "euler", ts, x)
    first = float(sd.ve(ts[0]))  # CFG only at the first level: the interval [ve_0, inf)
    b, _ = _run(gmm, f"cfg:scale=4,sigma_lo={first * 0.999999}", "euler", ts, x)
    assert torch.equal(a, b) and d.nfe == 2 + 9


def test_ag_switches_per_sample_and_saves_their_rows(gmm, sd):
    ts = dg.timesteps(sd, 12, "karras")
    x = _x(gmm, ts)
    full, d = _run(gmm, "ag:scale=4,threshold=0.995", "dpmpp_2m", ts, x)
    assert 12 < d.nfe < 24 and d.nfe != int(d.nfe)  # samples switched at different steps
    for i in (0, 5):  # each sample's result does not depend on the rest of its batch
        d1 = dg.guide(gmm, "ag:scale=4,threshold=0.995", LABELS[i : i + 1], NULL[i : i + 1])
        alone = dg.sample(d1, "dpmpp_2m", ts, x[i : i + 1].clone(), dg.SeededNoise([i]))
        assert (alone - full[i : i + 1]).abs().max() < 1e-12


# -- every method on every sampler and model type
# ---------------------------------------------------


class _FlowWellPosed:
    """Flow-velocity counterpart of WellPosed: exact u for N(0, I) data + 0.1 * a random UNet."""

    def __init__(self, unet):
        self.unet, self.schedule = unet, dg.FlowSchedule()

    def __call__(self, x, tm, emb):
        s = float(torch.as_tensor(tm).reshape(-1)[0]) / 1000
        a = 1 - s
        return (s - a) * x / (a * a + s * s) + 0.1 * self.unet(
            x, tm, encoder_hidden_states=emb
        ).sample

    def denoiser(self):
        return dg.NetDenoiser(
            lambda x, tm, c: self(x, tm, c), self.schedule, "flow", module=self.unet
        )


METHODS = [
    "cfgpp:scale=0.5",
    "apg:scale=4",
    "icg:scale=3",
    "tsg:scale=2,t_lo=0",
    "ag:scale=4,threshold=0.9",
]


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_every_method_on_every_sampler_and_model_type(tiny, kind):
    model = (
        _FlowWellPosed(tiny.unet) if kind == "flow" else WellPosed(tiny.schedule, tiny.unet, kind)
    )
    for method in METHODS:
        for spec in dg.list_samplers():
            x, d = _tiny_run(model, method, spec, steps=4)
            assert torch.isfinite(x).all(), (kind, method, spec)
            assert x.abs().max() < 20, (kind, method, spec)
            assert d.nfe >= 4


# -- composition -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    ["weight_schedule=linear", "weight_schedule=cosine", "sigma_lo=0.5,sigma_hi=3", "rescale=0.7"],
)
def test_modulated_cfg_equals_cfg_options(gmm, sd, opts):
    da, db = _same(gmm, sd, f"cfg:scale=4@{opts}", f"cfg:scale=4,{opts}", tol=1e-9)
    assert da.nfe == db.nfe


def test_modulated_interval_skips_any_methods_branches(gmm, sd):
    ts = dg.timesteps(sd, 10, "karras")
    _, d = _run(gmm, "apg:scale=4@sigma_lo=0.5,sigma_hi=3", "euler", ts, _x(gmm, ts))
    inside = sum(0.5 <= float(sd.ve(t)) <= 3 for t in ts[:-1])
    assert 0 < inside < 10 and d.nfe == 10 + inside


def test_sum_shares_the_conditional_branch(gmm, sd):
    """cfg 3 + cfg 2 = C + 2 (C - U) + (C - U) = cfg 4, at 2 NFE per step (C and U run once)."""
    d, _ = _same(gmm, sd, "cfg:scale=3+cfg:scale=2", "cfg:scale=4", tol=1e-9)
    assert d.nfe == 20


def test_sum_of_cfg_and_tsg_is_one_forward_per_distinct_branch(tiny):
    x, d = _tiny_run(tiny, "cfg:scale=3+tsg:scale=2,t_lo=0,t_hi=1", steps=4)
    assert d.nfe == 12 and d.forwards == 8  # C and U batched, the perturbed C alone
    assert torch.isfinite(x).all()


def test_composite_specs_round_trip_and_refuse_bad_options():
    for spec in [
        "cfg:scale=3.0+tsg:scale=2.0",
        "apg:scale=6.0@weight_schedule=linear,sigma_lo=0.3",
    ]:
        assert dg.to_spec(dg.parse_spec("guidance", spec)) == spec
    with pytest.raises(ValueError, match="'@' takes no option 'bogus'"):
        dg.parse_spec("guidance", "apg@bogus=1")
    with pytest.raises(ValueError, match="unknown guidance 'nope'"):
        dg.parse_spec("guidance", "cfg+nope")


# -- LinearAG --------------------------------------------------------------------------------------


def test_linear_ag_limits(gmm, sd):
    _same(gmm, sd, "linear_ag:scale=4,until=0,after=cfg", "cfg:scale=4")
    _same(gmm, sd, "linear_ag:scale=4,until=0,after=cond", "none")


def test_linear_ag_alternates_estimates_in_the_first_part(gmm, sd):
    ts = dg.timesteps(sd, 10, "karras")
    _, d = _run(gmm, "linear_ag:scale=4,until=1,after=cfg", "euler", ts, _x(gmm, ts))
    assert d.nfe == 10 + 5  # evaluations 0, 2, 4, 6, 8 real; 1, 3, 5, 7, 9 estimated


def test_linear_ag_estimate_formula(sd):
    from diffguide.guidance.linear_ag import LinearAG

    g = torch.Generator().manual_seed(0)
    x, c0, c_prev, u_prev = (torch.randn(2, 3, generator=g, dtype=F64) for _ in range(4))
    pt = dg.Point(torch.tensor(500.0, dtype=F64), sd)
    lag = LinearAG(scale=3.0, until=1.0)
    c = dg.Pred.from_x0(x, c0, pt.a, pt.s)
    out, state = lag.combine(x, pt, {"c": c}, {"k": 1, "prev": (c_prev, u_prev)})
    u0 = c0 + u_prev - c_prev  # the default: the last difference reused
    assert (out.x0 - (u0 + 3 * (c0 - u0))).abs().max() < 1e-12
    assert state["k"] == 2 and torch.equal(state["prev"][1], u0)


def test_linear_ag_fit_recovers_known_coefficients():
    from diffguide.guidance.linear_ag import fit

    g = torch.Generator().manual_seed(0)
    runs = []
    for _ in range(3):
        run, u = [], torch.randn(4, 5, generator=g, dtype=F64)
        c = torch.randn(4, 5, generator=g, dtype=F64)
        run.append((torch.randn(4, 5, generator=g, dtype=F64), c, u))
        for _ in range(4):
            x, c1 = (
                torch.randn(4, 5, generator=g, dtype=F64),
                torch.randn(4, 5, generator=g, dtype=F64),
            )
            u1 = 0.3 * c1 + 0.5 * run[-1][2] + 0.2 * run[-1][1] - 0.1 * x
            run.append((x, c1, u1))
        runs.append(run)
    coef = fit(runs)
    assert coef[0] is None and len(coef) == 5
    for row in coef[1:]:
        assert max(abs(a - b) for a, b in zip(row, (0.3, 0.5, 0.2, -0.1))) < 1e-10


def test_linear_ag_refuses_a_missing_or_bad_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        dg.parse_spec("guidance", f"linear_ag:coefficients={tmp_path / 'none.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text('{"coefficients": [[1, 2]]}')
    from diffguide.guidance.linear_ag import load

    with pytest.raises(ValueError, match="4 numbers"):
        load(str(bad))


def test_calibrate_linearag_cli_and_every_method_from_the_cli(tmp_path, capsys):
    import json

    from diffguide.cli.main import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square on a white background\n")
    out = tmp_path / "lag.json"
    assert (
        main(
            [
                "calibrate-linearag",
                "--prompts",
                str(prompts),
                "--n",
                "2",
                "--steps",
                "4",
                "-o",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert len(data["coefficients"]) == 4 and data["coefficients"][0] is None
    specs = [
        f"linear_ag:coefficients={out}",
        "cfgpp:scale=0.4",
        "apg:scale=6",
        "icg:scale=4",
        "tsg",
        "ag:scale=5",
        "cfg:scale=4+tsg:scale=2",
        "apg@weight_schedule=linear",
    ]
    for spec in specs:
        png = tmp_path / "x.png"
        assert (
            main(
                [
                    "generate",
                    "a red circle",
                    "--guidance",
                    spec,
                    "--steps",
                    "4",
                    "-o",
                    str(png),
                    "--overwrite",
                    "--quiet",
                ]
            )
            == 0
        ), spec
    capsys.readouterr()
    assert (
        main(
            ["generate", "a red circle", "--guidance", "apg:space=z", "-o", str(tmp_path / "y.png")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "space 'z'" in err and "x0, eps, v, flow" in err and "Traceback" not in err


# -- on real diffusers model families --------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl", "dit", "pixart", "sd3", "ddpm"])
def test_methods_on_every_model_family(family):
    """ICG draws a condition the family's network accepts (random class for DiT); TSG finds the
    family's time-step embedding; both run with the pipeline's per-image seeds."""
    from diffguide.pipelines import GuidedPipeline
    from diffguide.pipelines import tiny as tm

    gp = GuidedPipeline.from_pipe(tm.BUILDERS[family](), progress=False)
    prompt = 1 if family == "dit" else "a red circle"
    specs = (
        ["tsg:scale=2,t_lo=0,t_hi=1"]
        if family == "ddpm"
        else ["icg:scale=3", "tsg:scale=2,t_lo=0,t_hi=1", "icg:scale=3+tsg:scale=2,t_lo=0,t_hi=1"]
    )
    base = gp(
        prompt, guidance="none", steps=3, seed=[0, 1], num_images_per_prompt=2, output_type="np"
    )
    for spec in specs:
        a = gp(
            prompt, guidance=spec, steps=3, seed=[0, 1], num_images_per_prompt=2, output_type="np"
        )
        b = gp(
            prompt, guidance=spec, steps=3, seed=[0, 1], num_images_per_prompt=2, output_type="np"
        )
        assert np.isfinite(a.images).all() and np.array_equal(a.images, b.images), (family, spec)
        assert np.abs(a.images - base.images).max() > 1e-4, (family, spec)


def test_apg_rms_threshold_clamps_alike_on_any_sample_size():
    """The same per-value statistics clamp equally on 3 x 32 x 32 pixels and on 4 x 128 x 128
    latents with norm=rms; the paper's absolute L2 radius clamps one and not the other."""
    sd = dg.VPSchedule.from_betas()
    pt = dg.Point(torch.tensor(500.0, dtype=F64), sd)
    factors = {}
    for norm, r in (("rms", 0.05), ("l2", 10.0)):
        for shape in ((3, 32, 32), (4, 128, 128)):
            g = torch.Generator().manual_seed(1)
            x = torch.randn(8, *shape, generator=g)
            c = torch.randn(8, *shape, generator=g)
            u = c - 0.1 * torch.randn(
                8, *shape, generator=g
            )  # per-value rms of the difference: 0.1
            apg = dg.parse_spec(
                "guidance", f"apg:scale=2,eta=1,momentum=0,norm_threshold={r},norm={norm}"
            )
            preds = {"c": dg.Pred.from_x0(x, c, pt.a, pt.s), "u": dg.Pred.from_x0(x, u, pt.a, pt.s)}
            out, _ = apg.combine(x, pt, preds, apg.init_state())
            shift = (out.x0 - c).flatten(1).norm(dim=1) / (c - u).flatten(1).norm(
                dim=1
            )  # 1 = no clamp
            factors[norm, shape] = shift.mean().item()
    assert (
        abs(factors["rms", (3, 32, 32)] - 0.5) < 0.01
        and abs(factors["rms", (4, 128, 128)] - 0.5) < 0.01
    )
    assert factors["l2", (3, 32, 32)] == pytest.approx(1.0) and factors["l2", (4, 128, 128)] < 0.5
    assert dg.get_guidance("apg").norm_threshold == pytest.approx(15 / 256, abs=1e-4)

"""MAMBO-G, APG-mix and Lumina's CFG renormalisation.

mambo and apg_mix step by step against diffusers' MagnitudeAwareGuidance and
AdaptiveProjectedMixGuidance fed the same raw outputs (momentum included); cfg_renorm against a
transcription of Lumina2Pipeline's guidance lines; each in a sampling loop on the exact mixture."""

import logging

import pytest
import torch

import diffguide as dg
from diffguide.core.guided import Point
from diffguide.core.pred import Pred
from diffguide.core.schedule import FlowSchedule, VPSchedule
from diffguide.guidance.apg_mix import APGMix
from diffguide.guidance.cfg_renorm import CFGRenorm
from diffguide.guidance.mambo import MAMBO

F64 = torch.float64
LABELS = torch.arange(8) % 4
NULL = torch.full((8,), -1)
STEPS = 10


def _schedule(kind):
    return FlowSchedule() if kind == "flow" else VPSchedule.from_betas()


def _steps(kind, shape=(3, 4, 6, 8), n=STEPS, seed=0):
    """Per step: (x, Point, raw c, raw u); c = u + a per-sample-sized difference, so that the
    magnitude ratio MAMBO reads spans its range."""
    g = torch.Generator().manual_seed(seed)
    sched = _schedule(kind)
    out = []
    for i in range(n):
        t = torch.tensor(0.95 - 0.9 * i / n if kind == "flow" else 950.0 - 90 * i, dtype=F64)
        x = torch.randn(shape, generator=g, dtype=F64)
        u = torch.randn(shape, generator=g, dtype=F64)
        size = torch.tensor([0.02, 0.1, 0.5], dtype=F64)[: shape[0]].view(-1, 1, 1, 1)
        c = u + size * torch.randn(shape, generator=g, dtype=F64)
        out.append((x, Point(t, sched, i, n, kind), c, u))
    return out


def _diffusers(cls_name, **kw):
    import diffusers.guiders as guiders

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    return getattr(guiders, cls_name)(**kw)


def _compare(method, cls_name, kw, kind, n=STEPS, flat=False):
    """Run ours and diffusers' guider over n steps; the largest difference, and the steps each
    guided (ran the unconditional branch). ``flat`` feeds diffusers [B, D] outputs: its
    mambo_guidance takes torch.norm(p="fro") over all non-batch dims, which torch refuses for more
    than two (exact: its rule is elementwise but for per-sample norms and stds)."""
    guider = _diffusers(cls_name, **kw)
    state, worst, ours_on, theirs_on = method.init_state(), 0.0, [], []
    for x, pt, c, u in _steps(kind, n=n):
        guider.set_state(step=pt.step, num_inference_steps=n, timestep=torch.tensor(500))
        guider.prepare_inputs({"latents": (x, x)})  # as a pipeline: resets momentum at step 0
        two = guider.num_conditions == 2
        cf, uf = (c.flatten(1), u.flatten(1)) if flat else (c, u)
        theirs = (guider.forward(cf, uf) if two else guider.forward(cf)).pred.reshape(c.shape)
        names = method.branches(pt, state)
        preds = {k: Pred.from_output(kind, {"c": c, "u": u}[k], x, pt.a, pt.s) for k in names}
        pred, state = method.combine(x, pt, preds, state)
        worst = max(worst, float((pred.output(kind, pt.a, pt.s) - theirs).abs().max()))
        ours_on.append("u" in names)
        theirs_on.append(two)
    return worst, ours_on, theirs_on


MAMBO_CASES = [
    ({}, {}),
    (
        dict(scale=5.0, alpha=2.0, rescale=0.7),
        dict(guidance_scale=5.0, alpha=2.0, guidance_rescale=0.7),
    ),
    (dict(scale=4.0, original=True), dict(guidance_scale=4.0, use_original_formulation=True)),
    (dict(start=0.2, stop=0.7), dict(start=0.2, stop=0.7)),
    (dict(scale=1.0), dict(guidance_scale=1.0)),
]


@pytest.mark.parametrize("kind", ["flow", "eps", "v"])
@pytest.mark.parametrize("ours,theirs", MAMBO_CASES)
def test_mambo_matches_diffusers_magnitude_aware_guidance(kind, ours, theirs):
    worst, ours_on, theirs_on = _compare(
        MAMBO(**ours), "MagnitudeAwareGuidance", theirs, kind, flat=True
    )
    assert worst < 1e-6
    assert ours_on == theirs_on


APG_MIX_CASES = [
    ({}, {}),
    (dict(momentum=0.0), dict(adaptive_projected_guidance_momentum=None)),
    (
        dict(momentum=0.3, eta=0.5, norm_threshold=0.0, apg_start_step=2),
        dict(
            adaptive_projected_guidance_momentum=0.3,
            eta=0.5,
            adaptive_projected_guidance_rescale=0.0,
            adaptive_projected_guidance_start_step=2,
        ),
    ),
    (
        dict(scale=5.0, apg_scale=7.0, norm_threshold=1.0, rescale=0.5, apg_start_step=1),
        dict(
            guidance_scale=5.0,
            adaptive_projected_guidance_scale=7.0,
            adaptive_projected_guidance_rescale=1.0,
            guidance_rescale=0.5,
            adaptive_projected_guidance_start_step=1,
        ),
    ),
    (
        dict(original=True, apg_start_step=3),
        dict(use_original_formulation=True, adaptive_projected_guidance_start_step=3),
    ),
    (
        dict(start=0.2, stop=0.8, apg_start_step=3),
        dict(start=0.2, stop=0.8, adaptive_projected_guidance_start_step=3),
    ),
    (
        dict(apg_scale=1.0, apg_start_step=2),
        dict(adaptive_projected_guidance_scale=1.0, adaptive_projected_guidance_start_step=2),
    ),
]


@pytest.mark.parametrize("kind", ["flow", "eps", "v"])
@pytest.mark.parametrize("ours,theirs", APG_MIX_CASES)
def test_apg_mix_matches_diffusers_adaptive_projected_mix_guidance(kind, ours, theirs):
    worst, ours_on, theirs_on = _compare(
        APGMix(**ours), "AdaptiveProjectedMixGuidance", theirs, kind
    )
    assert worst < 1e-6
    assert ours_on == theirs_on


def test_apg_mix_momentum_carries_over_steps():
    """Without its state the APG steps come out differently: the momentum is in the parity."""
    method = APGMix(apg_start_step=1)
    steps = _steps("flow")
    state, with_state, without = None, [], []
    for x, pt, c, u in steps:
        preds = {k: Pred.from_output("flow", v, x, pt.a, pt.s) for k, v in (("c", c), ("u", u))}
        out, state = method.combine(x, pt, preds, state)
        with_state.append(out.x0)
        without.append(method.combine(x, pt, preds, None)[0].x0)
    assert torch.equal(with_state[0], without[0])
    assert (with_state[-1] - without[-1]).abs().max() > 1e-3


def _lumina2_reference(steps, n, guidance_scale, cfg_trunc_ratio, cfg_normalization):
    """Lumina2Pipeline.__call__'s guidance lines (diffusers 0.42), on its transformer's raw output
    (which points from noise to data: the pipeline negates it into the flow velocity)."""
    out = []
    do_classifier_free_guidance = guidance_scale > 1
    for i, (noise_pred_cond, noise_pred_uncond) in enumerate(steps):
        do_classifier_free_truncation = (i + 1) / n > cfg_trunc_ratio
        if do_classifier_free_guidance and not do_classifier_free_truncation:
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
            if cfg_normalization:
                cond_norm = torch.norm(noise_pred_cond, dim=-1, keepdim=True)
                noise_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
                noise_pred = noise_pred * (cond_norm / noise_norm)
        else:
            noise_pred = noise_pred_cond
        out.append((-noise_pred, do_classifier_free_guidance and not do_classifier_free_truncation))
    return out


@pytest.mark.parametrize(
    "scale,trunc,normalize",
    [(4.0, 1.0, True), (4.0, 0.25, True), (6.0, 0.5, False), (1.0, 1.0, True), (3.0, 0.0, True)],
)
def test_cfg_renorm_matches_lumina2_pipeline(scale, trunc, normalize):
    steps = _steps("flow")
    raw = [(-c, -u) for _, _, c, u in steps]  # Lumina's transformer output: minus the velocity
    ref = _lumina2_reference(raw, STEPS, scale, trunc, normalize)
    method = CFGRenorm(scale=scale, trunc_ratio=trunc, normalize=normalize)
    state = method.init_state()
    for (x, pt, c, u), (want, guided) in zip(steps, ref):
        names = method.branches(pt, state)
        assert ("u" in names) == guided
        preds = {k: Pred.from_output("flow", {"c": c, "u": u}[k], x, pt.a, pt.s) for k in names}
        pred, state = method.combine(x, pt, preds, state)
        assert (pred.output("flow", pt.a, pt.s) - want).abs().max() < 1e-6


def test_cfg_renorm_normalises_along_the_last_axis_only():
    """Each width row keeps the conditional row's norm; the per-sample norm is not the rule."""
    x, pt, c, u = _steps("flow")[0]
    preds = {k: Pred.from_output("flow", v, x, pt.a, pt.s) for k, v in (("c", c), ("u", u))}
    out = CFGRenorm(scale=5.0).combine(x, pt, preds, None)[0].output("flow", pt.a, pt.s)
    assert torch.allclose(out.norm(dim=-1), c.norm(dim=-1), atol=1e-9)
    per_sample = (u + 5 * (c - u)).flatten(1)
    per_sample = (
        per_sample * c.flatten(1).norm(dim=1, keepdim=True) / per_sample.norm(dim=1, keepdim=True)
    )
    assert (out.flatten(1) - per_sample).abs().max() > 1e-3


# -- sampling on the exact mixture -----------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,nfe",
    [
        ("mambo", 2 * STEPS),
        ("mambo:scale=3,alpha=1,start=0.2,stop=0.6", STEPS + 4),  # guided on steps 2..5
        ("mambo:scale=1", STEPS),
        ("apg_mix", 2 * STEPS),
        ("apg_mix:scale=2,apg_scale=4,norm_threshold=1,stop=0.5", STEPS + 5),
        ("cfg_renorm", 2 * STEPS),
        ("cfg_renorm:scale=3,trunc_ratio=0.5", STEPS + 5),  # guided while (i + 1) / n <= 0.5
        ("cfg_renorm:scale=1", STEPS),
    ],
)
@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_sampling_on_the_mixture(spec, nfe, schedule):
    sched = VPSchedule.from_betas() if schedule == "vp" else FlowSchedule()
    gm = dg.GaussianMixture.ring(sched)
    ts = dg.timesteps(sched, STEPS, "karras" if schedule == "vp" else None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=g, dtype=F64) * float(sched.sigma(ts[0]))
    if schedule == "flow":  # the mixture reports no output kind; eps is singular at t = 1
        spec += ("," if ":" in spec else ":") + "space=flow"
    d = dg.guide(gm, spec, LABELS, NULL)
    out = dg.sample(d, "euler", ts, x.clone(), dg.SeededNoise(range(8)))
    assert torch.isfinite(out).all()
    assert d.nfe == nfe
    plain = dg.sample(dg.guide(gm, None, LABELS), "euler", ts, x.clone(), dg.SeededNoise(range(8)))
    if nfe > STEPS:
        assert (out - plain).abs().max() > 1e-4  # guidance did something
    else:
        assert torch.equal(out, plain)
    # a second run starts from fresh state (momentum) and repeats the first
    again = dg.sample(d, "euler", ts, x.clone(), dg.SeededNoise(range(8)))
    assert torch.equal(out, again)


def test_batch_independence():
    """A sample's guided output does not depend on the others in its batch."""
    for spec in ("mambo", "apg_mix:apg_start_step=0", "cfg_renorm"):
        (x, pt, c, u), (x2, pt2, c2, u2) = _steps("eps", n=2)
        method = dg.parse_spec("guidance", spec)

        def run(xs, cs, us, method=method, pt=pt):
            preds = {
                k: Pred.from_output("eps", v, xs, pt.a, pt.s) for k, v in (("c", cs), ("u", us))
            }
            return method.combine(xs, pt, preds, None)[0].x0

        whole = run(x, c, u)
        assert torch.allclose(whole[:1], run(x[:1], c[:1], u[:1]), atol=1e-12), spec


@pytest.mark.parametrize(
    "spec,match",
    [
        ("mambo:scale=inf", "scale must be a finite"),
        ("mambo:alpha=nan", "alpha must be a finite"),
        ("mambo:rescale=1.5", "rescale must be in"),
        ("mambo:start=0.8,stop=0.2", "start <= stop"),
        ("mambo:space=foo", "unknown space"),
        ("apg_mix:momentum=inf", "momentum must be a finite"),
        ("apg_mix:apg_start_step=-1", "apg_start_step must be >= 0"),
        ("apg_mix:stop=1.5", "stop <= 1"),
        ("apg_mix:space=x1", "unknown space"),
        ("cfg_renorm:trunc_ratio=1.5", "trunc_ratio must be in"),
        ("cfg_renorm:scale=nan", "scale must be a finite"),
        ("cfg_renorm:space=bar", "unknown space"),
    ],
)
def test_option_validation(spec, match):
    with pytest.raises(ValueError, match=match):
        dg.parse_spec("guidance", spec)


def test_apg_start_step_must_be_an_integer():
    with pytest.raises(ValueError, match="integer"):
        APGMix(apg_start_step=2.5)

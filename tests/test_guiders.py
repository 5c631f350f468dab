"""The guiders users know from diffusers: PAG, SEG, SLG, CFG-Zero*, TCFG, FDG.

Parity with diffusers' own PAG and SD3 pipelines on tiny random models saved and loaded back, and
each combine rule against the matching ``diffusers.guiders`` class fed the same predictions."""

import logging

import numpy as np
import pytest
import torch

from diffguide.core.guided import Point
from diffguide.core.pred import Pred
from diffguide.core.registry import parse_spec
from diffguide.core.schedule import FlowSchedule, VPSchedule

P = ["a red circle", "a blue square"]


def _gens():
    return [torch.Generator().manual_seed(s) for s in (0, 1)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffguide.pipelines import tiny

    out = {}
    for fam in ("sd", "sdxl", "sd3", "sana"):
        path = tmp_path_factory.mktemp(fam)
        tiny.BUILDERS[fam]().save_pretrained(path)
        out[fam] = str(path)
    return out


def _ours(folder, **kw):
    from diffguide.pipelines import GuidedPipeline

    gp = GuidedPipeline.from_pretrained(folder, progress=False)
    return gp(P, seed=[0, 1], output_type="np", **kw)


def test_pag_on_a_v_model_with_a_schedule(tmp_path):
    """PAG under @ (a weight schedule) on a v-prediction model equals diffusers' PAG pipeline with
    the same constant weight, and the linear schedule changes it."""
    import diffusers

    from diffguide.pipelines import tiny

    tiny.sd(prediction_type="v_prediction").save_pretrained(tmp_path)
    pipe = diffusers.StableDiffusionPAGPipeline.from_pretrained(
        tmp_path, pag_applied_layers=["mid"]
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        P,
        num_inference_steps=6,
        guidance_scale=5.0,
        pag_scale=3.0,
        generator=_gens(),
        output_type="np",
    ).images
    const = _ours(
        str(tmp_path),
        guidance="cfg+pag:scale=3@weight_schedule=constant",
        steps=6,
        sampler="dpmpp_2m",
    )
    linear = _ours(
        str(tmp_path),
        guidance="cfg+pag:scale=3@weight_schedule=linear",
        steps=6,
        sampler="dpmpp_2m",
    )
    assert np.abs(const.images - ref).max() < 1e-5 < np.abs(linear.images - ref).max()


@pytest.mark.parametrize(
    "fam,cls,cfg",
    [
        ("sd", "StableDiffusionPAGPipeline", 7.5),
        ("sd", "StableDiffusionPAGPipeline", 1.0),
        ("sdxl", "StableDiffusionXLPAGPipeline", 5.0),
        ("sana", "SanaPAGPipeline", 4.5),
    ],
)
def test_pag_matches_diffusers_pag_pipelines(folders, fam, cls, cfg):
    import diffusers

    layers = "mid" if fam != "sana" else "transformer_blocks.0"
    pipe = getattr(diffusers, cls).from_pretrained(folders[fam], pag_applied_layers=[layers])
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=32, width=32) if fam == "sana" else dict(height=16, width=16)
    extra = dict(use_resolution_binning=False) if fam == "sana" else {}
    ref = pipe(
        P,
        num_inference_steps=6,
        guidance_scale=cfg,
        pag_scale=3.0,
        generator=_gens(),
        output_type="np",
        **size,
        **extra,
    ).images
    spec = (
        f"pag:scale=3,layers={layers}"
        if cfg == 1
        else f"cfg:scale={cfg}+pag:scale=3,layers={layers}"
    )
    sampler = {"sd": "dpmpp_2m", "sdxl": "euler", "sana": "dpmpp_2m"}[fam]
    out = _ours(folders[fam], guidance=spec, steps=6, sampler=sampler, **size)
    plain = _ours(
        folders[fam],
        guidance=f"cfg:scale={cfg}" if cfg != 1 else "none",
        steps=6,
        sampler=sampler,
        **size,
    )
    assert np.abs(out.images - ref).max() < 1e-5
    assert np.abs(plain.images - ref).max() > 3e-4  # the perturbation is seen
    assert out.forwards == 6  # every branch, perturbed or not, in one forward per step
    assert out.nfe == 6 * (2 if cfg == 1 else 3)


def test_slg_matches_sd3_pipeline_skip_guidance_layers(folders):
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folders["sd3"])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=10, guidance_scale=5.0, height=16, width=16, output_type="np")
    ref = pipe(
        P,
        skip_guidance_layers=[1],
        skip_layer_guidance_stop=0.5,
        skip_layer_guidance_scale=20.0,
        generator=_gens(),
        **kw,
    ).images
    plain = pipe(P, generator=_gens(), **kw).images
    out = _ours(
        folders["sd3"],
        guidance="cfg:scale=5+slg:layers=1,stop=0.5,scale=20",
        steps=10,
        sampler="euler",
        height=16,
        width=16,
    )
    assert np.abs(out.images - ref).max() < 1e-5 < 1e-3 < np.abs(plain - ref).max()
    assert out.forwards == 10 and out.nfe == 2 * 10 + 4  # skipped at steps 1-4 (0.01 n < i < 0.5 n)


def _preds(kind="flow", shape=(2, 4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    sched = FlowSchedule() if kind == "flow" else VPSchedule.from_betas()
    t = torch.tensor(0.6 if kind == "flow" else 500.0, dtype=torch.float64)
    pt = Point(t, sched, 3, 10, kind)
    outs = [torch.randn(shape, generator=g) for _ in range(3)]
    preds = [Pred.from_output(kind, o, x, pt.a, pt.s) for o in outs]
    return x, pt, outs, preds


def _quiet_guider(name, **kw):
    import diffusers

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    guider = getattr(diffusers, name)(**kw)
    guider.set_state(step=3, num_inference_steps=10, timestep=torch.tensor(600))
    return guider


@pytest.mark.parametrize("kind", ["flow", "eps"])
def test_cfg_zero_star_tcfg_fdg_combine_as_diffusers_guiders(kind):
    x, pt, (c, u, _), (pc, pu, _) = _preds(kind)
    cases = [
        ("cfg_zero_star:scale=4", "ClassifierFreeZeroStarGuidance", dict(guidance_scale=4.0)),
        ("tcfg:scale=4", "TangentialClassifierFreeGuidance", dict(guidance_scale=4.0)),
    ]
    cases.append(
        ("fdg:scales=10;5;2", "FrequencyDecoupledGuidance", dict(guidance_scales=[10.0, 5.0, 2.0]))
    )
    cases.append(
        (
            "fdg:scales=10;5,parallel=0.5",
            "FrequencyDecoupledGuidance",
            dict(guidance_scales=[10.0, 5.0], parallel_weights=0.5),
        )
    )  # needs kornia (test extra)
    for spec, name, kw in cases:
        ours, _ = parse_spec("guidance", spec).combine(x, pt, {"c": pc, "u": pu}, None)
        theirs = _quiet_guider(name, **kw).forward(c, u).pred
        assert torch.allclose(ours.output(kind, pt.a, pt.s), theirs, atol=1e-5), spec


@pytest.mark.parametrize("kind", ["flow", "eps"])
def test_seg_and_autoguidance_combine_as_diffusers_guiders(kind):
    """SEG (with CFG) fed C, U and the perturbed P; AutoGuidance fed C and the guide's
    prediction."""
    x, pt, (c, u, p), (pc, pu, pp) = _preds(kind)
    ours, _ = parse_spec("guidance", "cfg:scale=5+seg:scale=3").combine(
        x, pt, {"c": pc, "0.u": pu, "0.c": pc, "1.c": pc, "1.p": pp}, (None, None)
    )
    theirs = (
        _quiet_guider(
            "SmoothedEnergyGuidance",
            guidance_scale=5.0,
            seg_guidance_scale=3.0,
            seg_guidance_layers=[0],
        )
        .forward(c, u, p)
        .pred
    )
    assert torch.allclose(ours.output(kind, pt.a, pt.s), theirs, atol=1e-5)
    ours, _ = parse_spec("guidance", "autoguidance:scale=2.5").combine(
        x, pt, {"c": pc, "g": pu}, None
    )
    theirs = (
        _quiet_guider("AutoGuidance", guidance_scale=2.5, auto_guidance_layers=[0], dropout=0.1)
        .forward(c, u)
        .pred
    )
    assert torch.allclose(ours.output(kind, pt.a, pt.s), theirs, atol=1e-5)


def test_fdg_is_cfg_when_every_band_has_one_scale_and_separates_bands():
    from diffguide.guidance.fdg import from_pyramid, laplacian_pyramid

    x, pt, (c, u, _), (pc, pu, _) = _preds("flow", shape=(2, 3, 16, 12))
    pyr = laplacian_pyramid(c, 3)
    assert torch.allclose(
        from_pyramid(pyr)[..., :16, :12], c, atol=1e-5
    )  # the pyramid collapses back
    fdg, _ = parse_spec("guidance", "fdg:scales=4;4;4").combine(x, pt, {"c": pc, "u": pu}, None)
    cfg, _ = parse_spec("guidance", "cfg:scale=4").combine(x, pt, {"c": pc, "u": pu}, None)
    assert torch.allclose(fdg.x0, cfg.x0, atol=1e-4)
    # a constant offset lives only in the low band: scaling the high band alone leaves it out
    pc2 = Pred.from_output("flow", u + 1.0, x, pt.a, pt.s)
    hi, _ = parse_spec("guidance", "fdg:scales=9;1").combine(x, pt, {"c": pc2, "u": pu}, None)
    assert torch.allclose(hi.output("flow", pt.a, pt.s), u + 1.0, atol=1e-4)


def test_cfg_zero_star_zero_init_runs_no_network():
    from diffguide.guidance.cfg_zero_star import CFGZeroStar

    g = CFGZeroStar(zero_init_steps=2)
    x, pt, _, _ = _preds("flow")
    first = Point(pt.t, pt.schedule, 1, 10, "flow")
    assert g.branches(first) == {} and set(g.branches(pt)) == {"c", "u"}
    out, _ = g.combine(x, first, {}, None)
    assert torch.equal(
        out.output("flow", first.a, first.s), torch.zeros_like(x)
    )  # x stays where it is


def test_seg_blur_matches_the_authors_kernel():
    """The authors' (and diffusers' _gaussian_blur_2d, whose two cases are swapped) blur."""
    from diffusers.hooks.smoothed_energy_guidance_utils import _gaussian_blur_2d

    from diffguide.guidance.perturb import blur_tokens

    q = torch.randn(2, 36, 5)
    for sigma in (0.7, 2.0, 100.0):
        k = int(np.ceil(6 * sigma)) + 1 - int(np.ceil(6 * sigma)) % 2
        ref = _gaussian_blur_2d(
            q.clone(), k, sigma, sigma_threshold_inf=sigma / 2
        )  # diffusers: blurs "above"
        assert torch.allclose(blur_tokens(q, sigma), ref, atol=1e-6)
    mean = _gaussian_blur_2d(
        q.clone(), 7, 1.0, sigma_threshold_inf=9999.0
    )  # diffusers: the mean "below"
    assert torch.allclose(blur_tokens(q, 1e30), mean, atol=1e-6)
    with pytest.raises(ValueError, match="nor a square"):
        blur_tokens(torch.randn(1, 10, 3), 1.0)


def test_perturbed_guiders_compose_share_c_and_batch(folders):
    out = _ours(
        folders["sd3"],
        guidance="cfg+pag:layers=0+seg:layers=1,sigma=inf+slg:layers=0",
        steps=6,
        height=16,
        width=16,
    )
    assert out.forwards == 6 and out.nfe == 6 * 4 + 1  # SLG only at step 1 of 6 (0.06 < i < 1.2)
    assert np.isfinite(out.images).all()
    # the same branches as separate forwards (diffusers' guiders' way) give the same images
    sep = _ours(
        folders["sd3"],
        guidance="cfg+pag:layers=0+seg:layers=1,sigma=inf+slg:layers=0",
        steps=6,
        height=16,
        width=16,
        max_batch=2,
    )
    assert np.abs(sep.images - out.images).max() < 1e-5 and sep.forwards > out.forwards


def test_perturbations_are_removed_and_leave_other_threads_alone(folders):
    import threading

    from diffguide.guidance.perturb import IdentityAttention
    from diffguide.pipelines import GuidedPipeline

    gp = GuidedPipeline.from_pretrained(folders["sd"], progress=False)
    net = gp.family.net
    x = torch.randn(2, 4, 2, 2)
    before = {n: len(m._forward_hooks) for n, m in net.named_modules()}
    plain = gp("a red circle", guidance="none", steps=3, seed=0, output_type="np").images
    seen = {}

    def other():
        seen["img"] = gp("a red circle", guidance="none", steps=3, seed=0, output_type="np").images

    rows = torch.tensor([True, True])
    with IdentityAttention("mid").apply(gp.net_denoiser, None, rows):
        th = threading.Thread(target=other)
        th.start()
        th.join()
    assert np.array_equal(seen["img"], plain)  # the hook did not act for the other thread
    assert {n: len(m._forward_hooks) for n, m in net.named_modules()} == before
    del x


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("pag:layers=nowhere", "matches no self-attention layer"),
        ("slg:layers=40", "matches no transformer block"),
        ("pag:start=0.5,stop=0.2", "need 0 <= start <= stop <= 1"),
        ("seg:sigma=0", "SEG sigma must be > 0"),
        ("fdg:scales=10;x", "finite numbers separated by"),
        ("fdg:scales=10;5,parallel=1;2;3", "one number or 2"),
        ("tcfg:space=latent", "unknown space 'latent'"),
        ("cfg_zero_star:zero_init_steps=-1", "zero_init_steps must be >= 0"),
    ],
)
def test_bad_options_are_named(folders, spec, msg):
    with pytest.raises(ValueError, match=msg):
        _ours(folders["sd3"], guidance=spec, steps=2, height=16, width=16)


def test_autoguidance_combines_the_guide_model_by_its_formula():
    import diffguide as dg

    sched = VPSchedule.from_betas()

    class Linear:  # x0 = k x: two "models" of different quality
        schedule = sched

        def __init__(self, k):
            self.k = k

        def __call__(self, x, t, cond):
            a, s = sched.alpha(t), sched.sigma(t)
            return Pred.from_x0(x, self.k * x + 0 * cond.view(-1, 1), a, s)

    x, t = torch.randn(3, 2), torch.tensor(400.0, dtype=torch.float64)
    den = dg.guide(
        Linear(0.5), "autoguidance:scale=3", torch.zeros(3), models={"guide": Linear(0.2)}
    )
    out = den(x, t)
    assert torch.allclose(out.x0, 0.2 * x + 3 * (0.5 * x - 0.2 * x), atol=1e-6) and den.nfe == 2
    with pytest.raises(ValueError, match="autoguidance needs a guide model 'guide'"):
        dg.guide(Linear(0.5), "autoguidance", torch.zeros(3))


def test_autoguidance_on_the_builtin_model_with_its_small_companion():
    from diffguide.pipelines import GuidedPipeline

    gp = GuidedPipeline.from_pretrained("builtin", progress=False)
    small = GuidedPipeline.from_pretrained("builtin-small", progress=False)
    kw = dict(steps=6, seed=[0, 1], output_type="np")
    none = gp(P, guidance="none", **kw)
    itself = gp(P, guidance="autoguidance:scale=2", guide_model=gp, **kw)
    assert (
        np.abs(itself.images - none.images).max() < 1e-5
    )  # a guide equal to the model changes nothing
    ag = gp(P, guidance="autoguidance:scale=2", guide_model=small, **kw)
    assert ag.nfe == 12 and np.abs(ag.images - none.images).max() > 1e-2
    with pytest.raises(ValueError, match="cannot guide with this model"):
        gp(
            P,
            guidance="autoguidance",
            guide_model=GuidedPipeline.from_pipe(
                __import__("diffguide.pipelines.tiny", fromlist=["sd"]).sd(), progress=False
            ),
            **kw,
        )


NEW = [
    "pag",
    "seg",
    "seg:sigma=inf",
    "slg:stop=1",
    "cfg_zero_star",
    "tcfg",
    "fdg",
    "autoguidance",
    "cfg+pag+seg+slg:stop=1",
]


@pytest.fixture(scope="module", params=["sd", "dit", "pixart", "sd3"])
def other_family(request):
    import warnings

    from diffguide.pipelines import GuidedPipeline, tiny

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return request.param, GuidedPipeline.from_pipe(
            tiny.BUILDERS[request.param](), progress=False
        )


@pytest.mark.parametrize("spec", NEW)
def test_every_new_guider_on_the_older_families(other_family, spec):
    name, gp = other_family
    prompt = 1 if name == "dit" else "a red cat"
    extra = {"guide_model": gp} if "autoguidance" in spec else {}
    out = gp(prompt, guidance=spec, steps=4, seed=0, output_type="pt", sampler="euler", **extra)
    assert torch.isfinite(out.images).all()
    expected = {"cfg_zero_star": 6, "slg:stop=1": 7, "cfg+pag+seg+slg:stop=1": 4 * 4 + 3}.get(
        spec, 8
    )
    assert out.nfe == expected
    assert out.forwards == (8 if spec == "autoguidance" else 3 if spec == "cfg_zero_star" else 4)

"""Every guidance method and every sampler on each of today's model families (Flux.1, Qwen-Image,
Sana, SANA-Sprint): finite images, and the network evaluations the method and sampler imply: a
sampler's count on the same grid measured with a bare closed-form denoiser, times the branches."""

import warnings

import pytest
import torch

import diffguide as dg
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm

SIZES = {"flux": 16, "qwenimage": 16, "sana": 32, "sana_sprint": 32}
STEPS = 4


@pytest.fixture(scope="module", params=list(SIZES))
def family(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gp = GuidedPipeline.from_pipe(tm.BUILDERS[request.param](), progress=False)
    return request.param, gp


def sampler_evaluations(gp, spec, hw) -> int:
    """Evaluations a sampler makes on the pipeline's grid, counted on a bare denoiser (x0 = x /
    2)."""
    info = gp.info.at_size(gp.family.seq_len(hw, hw))
    sc, ts = info.schedule, info.timesteps(STEPS, None)

    class Half:
        schedule = sc

        def __call__(self, x, t, cond):
            a, s = sc.alpha(t), sc.sigma(t)
            return dg.Pred(x / 2, (x - a * x / 2) / s)

    den = dg.guide(Half(), None, torch.zeros(1))
    dg.sample(den, spec, ts, torch.randn(1, 4), dg.SeededNoise([0]))
    return den.nfe


def run(gp, hw, **kw):
    out = gp("a red cat", steps=STEPS, height=hw, width=hw, seed=0, output_type="pt", **kw)
    assert torch.isfinite(out.images).all() and out.images.shape == (1, 3, hw, hw)
    return out.nfe


@pytest.mark.parametrize("spec", dg.list_samplers())
def test_every_sampler_with_cfg(family, spec):
    name, gp = family
    hw = SIZES[name]
    nfe = run(gp, hw, guidance="cfg", sampler=spec)
    if spec == "dpm_adaptive":  # its evaluations depend on the data: two branches each
        assert nfe > 0 and nfe % 2 == 0
    else:
        assert nfe == 2 * sampler_evaluations(gp, spec, hw)


@pytest.mark.parametrize("spec", dg.list_guidance())
def test_every_guidance(family, spec):
    name, gp = family
    hw = SIZES[name]
    extra = (
        {"guide_model": gp} if spec == "autoguidance" else {}
    )  # the model as its own guide: any will do
    if spec == "nag" and name == "qwenimage":  # NAG: SD, SDXL, PixArt, Sana, SD3 and Flux
        with pytest.raises(ValueError, match="NAG is built for"):
            run(gp, hw, guidance=spec, sampler="euler")
        return
    nfe = run(gp, hw, guidance=spec, sampler="euler", **extra)
    if spec in ("none", "nag"):  # NAG reads the negative inside C's forward
        assert nfe == STEPS
    elif spec in ("ag", "linear_ag", "tsg"):  # they skip the second branch on some steps
        assert STEPS < nfe < 2 * STEPS
    elif spec == "slg":  # SD3.5's window, steps 1% to 20%: none of 4
        assert nfe == STEPS
        assert (
            run(gp, hw, guidance="slg:stop=1", sampler="euler") == 2 * STEPS - 1
        )  # from step 1 (0.01 n < i)
    elif spec == "cfg_zero_star":  # the first step is zero-initialised, with no network
        assert nfe == 2 * (STEPS - 1)
    elif spec == "stg":  # CFG's two branches and the skipped-block one, at every step
        assert nfe == 3 * STEPS
    else:
        assert nfe == 2 * STEPS


def test_image_to_image(family):
    name, gp = family
    hw = SIZES[name]
    image = torch.rand(1, 3, hw, hw, generator=torch.Generator().manual_seed(0))
    kept = STEPS - gp.steps_skipped(STEPS, 0.5)
    assert run(gp, hw, guidance="none", image=image, strength=0.5) == kept == 2
    if gp.embedded_guidance is not None:  # the model's own guidance input moves the image
        a = gp(
            "a red cat",
            steps=STEPS,
            height=hw,
            width=hw,
            seed=0,
            output_type="pt",
            guidance="none",
            embedded_guidance=1.0,
        ).images
        b = gp(
            "a red cat",
            steps=STEPS,
            height=hw,
            width=hw,
            seed=0,
            output_type="pt",
            guidance="none",
            embedded_guidance=6.0,
        ).images
        assert (a - b).abs().max() > 1e-4

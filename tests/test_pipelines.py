"""GuidedPipeline against diffusers' own pipelines on tiny random models saved with save_pretrained.

Both sides load the same folder; same prompt, per-image generators, steps and guidance scale. The
diffguide sampler named for each case is the one that reproduces that diffusers scheduler, and the
grid comes from the loaded scheduler's config.
"""
import numpy as np
import pytest
import torch

import tiny_models as tm
from diffguide.pipelines import GuidedPipeline

TOL = 1e-3
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def get(key, builder, **kw):
        if key not in made:
            path = tmp_path_factory.mktemp(key)
            tm.BUILDERS[builder](**kw).save_pretrained(path)
            made[key] = path
        return made[key]
    return get


def _diffusers(path, **call):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(generator=gens, output_type="np", **call).images


def _ours(path, prompt, sampler, steps, scale, **kw):
    gp = GuidedPipeline.from_pretrained(path, progress=False)
    out = gp(prompt, guidance="cfg", guidance_scale=scale, sampler=sampler, steps=steps, seed=SEEDS,
             output_type="np", **kw)
    assert out.nfe == 2 * steps or sampler == "heun"
    return out.images


def _check(ours, ref):
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    between = np.abs(ref[0] - ref[1]).max()  # two seeds: what a real difference looks like
    assert between > 50 * TOL, f"images hardly depend on the noise ({between})"
    assert err < TOL, err


SD_CASES = [("DPMSolverMultistepScheduler", "dpmpp_2m"), ("DDIMScheduler", "ddim"),
            ("EulerDiscreteScheduler", "euler")]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler,sampler", SD_CASES)
def test_stable_diffusion(folders, scheduler, sampler, prediction):
    path = folders(f"sd-{prediction}-{scheduler}", "sd", prediction_type=prediction, scheduler=scheduler)
    prompts = ["a red circle", "a blue square"]
    ref = _diffusers(path, prompt=prompts, negative_prompt=["", "green"], num_inference_steps=12,
                     guidance_scale=6.0)
    _check(_ours(path, prompts, sampler, 12, 6.0, negative_prompt=["", "green"]), ref)


def test_dit(folders):
    path = folders("dit", "dit")
    ref = _diffusers(path, class_labels=[1, 2], num_inference_steps=10, guidance_scale=4.0)
    _check(_ours(path, [1, "2"], "ddim", 10, 4.0), ref)


def test_dit_label_names():
    gp = GuidedPipeline.from_pipe(tm.dit(), progress=False)
    assert gp.family.labels(["Triangle", 0, "1"]) == [2, 0, 1]
    with pytest.raises(ValueError, match="unknown class label 'hexagon'"):
        gp.family.labels(["hexagon"])
    with pytest.raises(ValueError, match="out of range"):
        gp.family.labels([1000])


def test_sd3(folders):
    path = folders("sd3", "sd3")
    ref = _diffusers(path, prompt=["a red circle", "a cross"], num_inference_steps=10, guidance_scale=5.0,
                     height=16, width=16)
    _check(_ours(path, ["a red circle", "a cross"], "euler", 10, 5.0), ref)


def test_pixart(folders):
    path = folders("pixart", "pixart")
    ref = _diffusers(path, prompt=["a red circle", "a cross"], num_inference_steps=10, guidance_scale=4.5,
                     height=16, width=16, use_resolution_binning=False)
    _check(_ours(path, ["a red circle", "a cross"], "dpmpp_2m", 10, 4.5), ref)


def test_sdxl(folders):
    path = folders("sdxl", "sdxl")
    ref = _diffusers(path, prompt=["a red circle", "a cross"], num_inference_steps=10, guidance_scale=5.0,
                     height=16, width=16)
    _check(_ours(path, ["a red circle", "a cross"], "euler", 10, 5.0), ref)


def test_unconditional_ddpm(folders):
    """DDPM's ancestral step is DDIM with eta = 1; its noise comes from the same per-image streams."""
    path = folders("ddpm", "ddpm")
    ref = _diffusers(path, batch_size=2, num_inference_steps=10)
    gp = GuidedPipeline.from_pretrained(path, progress=False)
    assert gp.family.name == "unconditional"
    out = gp(sampler="ddim:eta=1", guidance="none", steps=10, seed=SEEDS, num_images_per_prompt=2,
             output_type="np")
    _check(out.images, ref)


def test_pixel_space_model_without_vae(folders):
    """A text-to-image UNet on pixels (no VAE) saves, loads and samples; x is the image."""
    path = folders("pixel", "pixel_sd")
    gp = GuidedPipeline.from_pretrained(path, progress=False)
    assert gp.pipe.vae is None and gp.family.factor == 1
    out = gp("a red circle", steps=4, seed=0, output_type="pt")
    assert out.images.shape == (1, 3, 8, 8)
    lat = gp("a red circle", steps=4, seed=0, output_type="latent").images
    assert torch.allclose(out.images, (lat / 2 + 0.5).clamp(0, 1))

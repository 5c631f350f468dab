"""diffguide's guidance methods as diffusers guiders (pipelines/guiders.py) in diffusers' modular
pipelines, on tiny random SDXL, SD3, Wan and Qwen-Image folders.

The modular pipeline with a diffguide guider gives the images of GuidedPipeline (diffguide's own
loop and sampler, its branches batched) with the same spec, and those of diffusers' own guider of
the same method; methods that need what a guider is not given are refused in one line."""

import logging
import os
import re

import numpy as np
import pytest
import torch

from diffguide.pipelines.guiders import DiffguideGuidance, as_diffusers_guider

TOL = 1e-5  # measured about 1e-6
SEEDS = [3, 4]
PROMPTS = ["a red circle", "a cross"]
NEGATIVES = ["", "blurry"]


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    """diffusers warns at every guider that guiders are experimental."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


class Models:
    """One tiny folder loaded as diffusers' modular pipeline and as a GuidedPipeline, called alike
    (``extra``: both pipelines' own keywords, e.g. frames; ``latents``: compare latents, where the
    tiny VAE would flatten the differences)."""

    def __init__(self, folder, steps: int, negatives=None, latents=False, **extra):
        from diffusers import ModularPipeline

        from diffguide.pipelines import GuidedPipeline

        self.modular = ModularPipeline.from_pretrained(str(folder))
        self.modular.load_components(dtype=torch.float32)
        self.modular.set_progress_bar_config(disable=True)
        self.guided = GuidedPipeline.from_pretrained(str(folder), progress=False)
        self.folder = str(folder)
        self.steps, self.latents = steps, latents
        self.common = dict(height=16, width=16, **extra)
        if negatives is not None:
            self.common["negative_prompt"] = negatives

    def theirs(self, guider, **kw) -> np.ndarray:
        """The modular pipeline's images (or latents) with ``guider``."""
        self.modular.update_components(guider=guider)
        out = self.modular(
            prompt=PROMPTS,
            num_inference_steps=self.steps,
            generator=[torch.Generator().manual_seed(s) for s in SEEDS],
            **{**self.common, **kw},
            **(dict(output="latents") if self.latents else dict(output="images", output_type="np")),
        )
        return np.asarray(out)

    def ours(self, spec: str, **kw) -> np.ndarray:
        """GuidedPipeline's images (or latents) with ``spec``, on the sampler of the scheduler."""
        out = self.guided(
            PROMPTS,
            seed=SEEDS,
            steps=self.steps,
            guidance=spec,
            sampler="euler",
            output_type="latent" if self.latents else "np",
            **{**self.common, **kw},
        )
        return np.asarray(out.images)


def _folder(tmp_path_factory, family: str, **options):
    from diffguide.pipelines import tiny

    folder = tmp_path_factory.mktemp(family)
    tiny.BUILDERS[family](**options).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A UNet on eps, EulerDiscreteScheduler (the pipeline scales its input)."""
    return Models(_folder(tmp_path_factory, "sdxl"), steps=6)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A flow transformer (velocity, shift 3, joint attention); its modular pipeline runs CFG only
    with a negative prompt."""
    return Models(_folder(tmp_path_factory, "sd3"), steps=6, negatives=NEGATIVES)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """Video (5-D latents); its modular pipeline hands the guider its block state."""
    folder = _folder(tmp_path_factory, "wan", scheduler="euler")
    return Models(folder, steps=4, negatives=NEGATIVES, latents=True, num_frames=5)


@pytest.fixture(scope="module")
def qwenimage(tmp_path_factory):
    """Packed latent tokens, a dynamic shift; its modular pipeline renormalises guided outputs."""
    return Models(_folder(tmp_path_factory, "qwenimage"), steps=5, negatives=NEGATIVES)


# (family, spec) on an eps UNet and on flow transformers; APG (on x0) depends on the noise level
PARITY = [
    ("sdxl", "cfg:scale=5"),
    ("sdxl", "apg:scale=5"),
    ("sdxl", "cfg_zero_star:scale=5"),  # step 0 zeroed: no branch of its own
    ("sdxl", "cfg:scale=5+pag:scale=10,layers=mid"),
    ("sdxl", "cfg:scale=5+slg:scale=30,layers=mid_block,start=0.01,stop=1"),
    ("sdxl", "cfg:scale=5@weight_schedule=linear"),  # reads the progress
    ("sd3", "apg:scale=5"),
    ("sd3", "cfg_zero_star:scale=5"),
    ("sd3", "cfg:scale=5+pag:scale=10,layers=0"),
    ("sd3", "cfg:scale=5+slg:scale=3,layers=1,start=0.01,stop=1"),
    ("wan", "apg:scale=5"),
    ("wan", "cfg:scale=5+pag:scale=3,layers=0"),
]


@pytest.mark.parametrize("family,spec", PARITY)
def test_images_equal_guided_pipeline(request, family, spec):
    models = request.getfixturevalue(family)
    theirs = models.theirs(as_diffusers_guider(spec, models.modular))
    ours = models.ours(spec)
    assert np.abs(theirs - ours).max() < TOL
    if spec != "cfg:scale=5":  # the method changes the result by far more than the tolerance
        assert np.abs(ours - models.ours("cfg:scale=5")).max() > 20 * TOL


def test_img2img_reads_the_level_at_the_scheduler_begin_index(sdxl):
    """Image-to-image starts the scheduler part-way (its begin index); APG on x0 reads the level."""
    from PIL import Image

    pixels = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(5))
    pixels = (pixels * 255).round().to(torch.uint8)
    images = [Image.fromarray(p.numpy()) for p in pixels]
    common = dict(height=32, width=32, strength=0.6)
    theirs = sdxl.theirs(as_diffusers_guider("apg:scale=5", sdxl.modular), image=images, **common)
    ours = sdxl.ours("apg:scale=5", image=pixels.permute(0, 3, 1, 2) / 255, **common)
    assert np.abs(theirs - ours).max() < TOL


def _diffusers_guider(name: str):
    """diffusers' own guider of a method, as the diffguide spec beside it in PAIRS."""
    from diffusers import guiders
    from diffusers.hooks import LayerSkipConfig

    mid = "mid_block.attentions.0.transformer_blocks"
    window = dict(start=0.01, stop=1.0)
    if name == "cfg":
        return guiders.ClassifierFreeGuidance(guidance_scale=5.0)
    if name == "apg":
        return guiders.AdaptiveProjectedGuidance(
            guidance_scale=5.0,
            adaptive_projected_guidance_momentum=-0.5,
            adaptive_projected_guidance_rescale=2.0,
        )
    if name == "cfg_zero_star":
        return guiders.ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=1)
    if name == "pag":
        skip = LayerSkipConfig([0], mid, skip_attention=False, skip_attention_scores=True)
        return guiders.PerturbedAttentionGuidance(
            guidance_scale=5.0,
            perturbed_guidance_scale=10.0,
            perturbed_guidance_start=window["start"],
            perturbed_guidance_stop=window["stop"],
            perturbed_guidance_config=skip,
        )
    skip = LayerSkipConfig([0], mid, skip_attention=True, skip_ff=True)  # "slg"
    return guiders.SkipLayerGuidance(
        guidance_scale=5.0,
        skip_layer_guidance_scale=30.0,
        skip_layer_guidance_start=window["start"],
        skip_layer_guidance_stop=window["stop"],
        skip_layer_config=skip,
    )


# diffusers' APG: on the raw output, from the unconditional, eta 1, an absolute L2 radius. Its PAG
# and SLG guiders fail on SD3's joint blocks (an unregistered processor; a skip hook that swaps
# the block's two outputs), so they are compared on the UNet.
PAIRS = [
    ("sdxl", "cfg", "cfg:scale=5"),
    (
        "sdxl",
        "apg",
        "apg:scale=5,space=eps,base=uncond,eta=1,momentum=-0.5,norm=l2,norm_threshold=2",
    ),
    ("sdxl", "cfg_zero_star", "cfg_zero_star:scale=5"),
    ("sdxl", "pag", "cfg:scale=5+pag:scale=10,layers=mid,start=0.01,stop=1"),
    ("sdxl", "slg", "cfg:scale=5+slg:scale=30,layers=mid_block,start=0.01,stop=1"),
    (
        "sd3",
        "apg",
        "apg:scale=5,space=flow,base=uncond,eta=1,momentum=-0.5,norm=l2,norm_threshold=2",
    ),
    ("sd3", "cfg_zero_star", "cfg_zero_star:scale=5"),
]


@pytest.mark.parametrize("family,name,spec", PAIRS)
def test_same_images_as_diffusers_guiders(request, family, name, spec):
    models = request.getfixturevalue(family)
    ref = models.theirs(_diffusers_guider(name))
    assert np.abs(models.theirs(as_diffusers_guider(spec, models.modular)) - ref).max() < TOL
    if name != "cfg":
        plain = models.theirs(_diffusers_guider("cfg"))
        assert np.abs(ref - plain).max() > 20 * TOL


def test_qwenimage_cfg_with_the_pipeline_renorm(qwenimage):
    """Qwen-Image's modular pipeline renormalises every guider's output per latent token, so its
    CFG is GuidedPipeline's renorm=2 CFG (QwenImagePipeline's true CFG); packed latent tokens and
    a dynamic shift. (The renorm leaves the tiny model's images little to guide: scale 30.)"""
    theirs = qwenimage.theirs(as_diffusers_guider("cfg:scale=30", qwenimage.modular))
    ours = qwenimage.ours("cfg:scale=30,renorm=2,rescale_space=flow")
    assert np.abs(theirs - ours).max() < TOL
    assert np.abs(ours - qwenimage.ours("cfg:scale=4,renorm=2,rescale_space=flow")).max() > 20 * TOL


def test_state_is_fresh_each_run_and_hooks_are_removed(sdxl):
    """APG's momentum starts again at step 0 (a second run gives the same images), and PAG's hooks
    and the sample hook leave the network as they found it."""
    unet = sdxl.modular.unet
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in unet.named_modules()}
    guider = as_diffusers_guider("apg:scale=5+pag:scale=3,layers=mid", sdxl.modular)
    first = sdxl.theirs(guider)
    assert np.array_equal(sdxl.theirs(guider), first)
    assert np.array_equal(sdxl.theirs(guider.new()), first)
    after = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in unet.named_modules()}
    assert after == hooks


REFUSED = {
    "cfgpp:scale=0.6": "cfgpp cannot be a diffusers guider: it renoises",
    "autoguidance": "autoguidance cannot be a diffusers guider: its guide is a second model",
    "cfg+ag:scale=5": "ag cannot be a diffusers guider: it drops the unconditional branch",
    "icg": "icg cannot be a diffusers guider: it draws a random condition",
    "tsg@weight_schedule=linear": "tsg cannot be a diffusers guider: it draws its time-embedding",
    "tpg": "tpg cannot be a diffusers guider: its token permutations",
    "nag": "nag cannot be a diffusers guider: its conditional forward",
}


@pytest.mark.parametrize("spec", list(REFUSED))
def test_refused_methods_say_why_in_one_line(spec):
    with pytest.raises(ValueError) as err:
        as_diffusers_guider(spec)
    assert str(err.value).startswith(REFUSED[spec]) and "\n" not in str(err.value)


def test_config_round_trip_and_unbound_guider(tmp_path):
    """The config holds the spec (a Guidance object's too), so the guider saves as JSON; a guider
    with no pipeline to read the level from says how to give it one."""
    import diffguide as dg

    guider = as_diffusers_guider(dg.get_guidance("apg", scale=7.0))
    guider.save_pretrained(tmp_path)
    loaded = DiffguideGuidance.from_pretrained(tmp_path)
    assert loaded.config["guidance"] == "apg:scale=7.0" and loaded.method == guider.method
    with pytest.raises(ValueError, match=r"as_diffusers_guider\(spec, pipeline\)"):
        loaded.set_state(0, 6, torch.tensor(999))


def test_the_docs_example_runs(sdxl, tmp_path):
    """docs/diffusers_guiders.md's example, on the tiny SDXL folder, on the CPU, in two steps."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "diffusers_guiders.md")).read()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    swaps = {
        '"stabilityai/stable-diffusion-xl-base-1.0"': repr(sdxl.folder),
        "torch.float16": "torch.float32",
        '"cuda"': '"cpu"',
        "num_inference_steps=30": "num_inference_steps=2, height=16, width=16",
        '"astronaut.png"': repr(str(tmp_path / "astronaut.png")),
    }
    for old, new in swaps.items():
        assert old in code, old
        code = code.replace(old, new)
    scope = {}
    exec(compile(code, "diffusers_guiders.md", "exec"), scope)
    assert (tmp_path / "astronaut.png").is_file()
    assert scope["pipe"].guider.config["guidance"] == "cfg:scale=5+pag:scale=3"

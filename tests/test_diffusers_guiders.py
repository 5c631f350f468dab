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
            generator=[torch.Generator().manual_seed(s) for s in SEEDS],
            **{"num_inference_steps": self.steps, **self.common, **kw},
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
def wan22(tmp_path_factory):
    """Wan 2.2's two experts: the second guider (guider_2) runs the low-noise steps only."""
    folder = _folder(tmp_path_factory, "wan", scheduler="euler", boundary_ratio=0.875)
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


def _hooks(net: torch.nn.Module) -> dict:
    """The forward hooks and pre-hooks of each module of ``net``, counted."""
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in net.named_modules()}


def test_state_is_fresh_each_run_and_hooks_are_removed(sdxl):
    """APG's momentum starts again at step 0 (a second run gives the same images), and PAG's hooks
    and the guider's forward wrapper leave the network as they found it."""
    unet = sdxl.modular.unet
    hooks = _hooks(unet)
    guider = as_diffusers_guider("apg:scale=5+pag:scale=3,layers=mid", sdxl.modular)
    first = sdxl.theirs(guider)
    assert np.array_equal(sdxl.theirs(guider), first)
    assert np.array_equal(sdxl.theirs(guider.new()), first)
    assert _hooks(unet) == hooks and "forward" not in vars(unet)


def test_wan22_second_guider_state_is_fresh_each_run(wan22):
    """Wan 2.2's guider_2 runs the low-noise steps (2 and 3 of 4) and never sees step 0: APG's
    momentum still starts again at each run, so a second run gives the same latents."""
    wan22.modular.update_components(guider_2=as_diffusers_guider("apg:scale=5", wan22.modular))
    guider = as_diffusers_guider("apg:scale=5", wan22.modular)
    first = wan22.theirs(guider)
    assert np.array_equal(wan22.theirs(guider), first)


@pytest.mark.parametrize("where,error", [("", RuntimeError), ("mid_block", KeyboardInterrupt)])
def test_a_failed_forward_leaves_no_perturbation_behind(sdxl, where, error):
    """The perturbed forward fails: an error before it (another pre-hook on the UNet), or an
    interrupt inside it. The loop never reaches cleanup_models, yet the network is as it was and
    a run with diffusers' own CFG gives its images."""
    from diffusers.guiders import ClassifierFreeGuidance

    unet = sdxl.modular.unet
    hooks = _hooks(unet)
    ref = sdxl.theirs(ClassifierFreeGuidance(guidance_scale=5.0), num_inference_steps=2)
    guider = as_diffusers_guider("cfg:scale=5+pag:scale=3,layers=mid", sdxl.modular)

    def fail(*_):
        if guider._batches[guider._count_prepared - 1].perturb is not None:
            raise error("the perturbed forward failed")

    handle = unet.get_submodule(where).register_forward_pre_hook(fail)
    try:
        with pytest.raises(error):
            sdxl.theirs(guider, num_inference_steps=2)
    finally:
        handle.remove()
    assert _hooks(unet) == hooks and "forward" not in vars(unet)
    after = sdxl.theirs(ClassifierFreeGuidance(guidance_scale=5.0), num_inference_steps=2)
    assert np.array_equal(after, ref)


def test_an_interrupted_step_leaves_the_next_run_whole(sdxl):
    """A run interrupted in a step that runs one branch (CFG-Zero*'s zeroed first step): the next
    run still has the negative encoded (num_conditions is 2, 1 when disabled) and gives a fresh
    guider's images."""
    guider = as_diffusers_guider("cfg_zero_star:scale=5", sdxl.modular)

    def interrupt(*_):
        raise KeyboardInterrupt

    handle = sdxl.modular.unet.mid_block.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            sdxl.theirs(guider, num_inference_steps=3)
    finally:
        handle.remove()
    assert guider.num_conditions == 2 and guider.new(enabled=False).num_conditions == 1
    fresh = as_diffusers_guider("cfg_zero_star:scale=5", sdxl.modular)
    ref = sdxl.theirs(fresh, num_inference_steps=3)
    assert np.array_equal(sdxl.theirs(guider, num_inference_steps=3), ref)


# Heun, KDPM2 and DPMSolverSDE evaluate twice a step; KDPM2 scales its second evaluation's input
# at an interpolated level, DPMSolverSDE at a mid-point, KDPM2Ancestral at the last step's
# interpolated level
TWO_EVALUATIONS = [
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
]


@pytest.mark.parametrize("name", TWO_EVALUATIONS)
@pytest.mark.filterwarnings("ignore:Should have ta>=t0")  # torchsde, on DPMSolverSDE's last step
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")  # KDPM2's set_timesteps, numpy 2
def test_the_level_is_the_one_the_input_is_scaled_with(sdxl, name):
    """At every evaluation the guider's level is the sigma the scheduler's scale_model_input
    divides the network's input by sqrt(1 + sigma^2) with."""
    import diffusers

    own = sdxl.modular.scheduler
    scheduler = getattr(diffusers, name).from_config(own.config)
    guider = as_diffusers_guider("cfg:scale=5", sdxl.modular)
    levels, set_state = [], guider.set_state

    def spy(step, num_inference_steps, timestep):
        set_state(step, num_inference_steps, timestep)
        one = scheduler.scale_model_input(torch.ones((), dtype=torch.float64), timestep)
        levels.append((1 + float(guider._point.ve) ** 2, float(one) ** -2))

    guider.set_state = spy
    sdxl.modular.update_components(scheduler=scheduler)
    try:
        sdxl.theirs(guider, num_inference_steps=3)
    finally:
        sdxl.modular.update_components(scheduler=own)
    assert len(levels) == 5  # the first step evaluates once
    ours, theirs = np.array(levels).T
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


class _Net(torch.nn.Module):
    """A stand-in network: one output per input position."""

    def forward(self, hidden_states, encoder_hidden_states):
        return torch.tanh(hidden_states) * (1 + encoder_hidden_states.mean())


def _step(guider, x, keep, t) -> torch.Tensor:
    """Step 0 of a diffusers denoise loop on the stand-in network: set_state, a forward per batch
    (``keep`` picks the part of its output the loop gives the guider), the guided output."""
    net, conds = _Net(), (torch.zeros(2, 3, 8), torch.ones(2, 3, 8))
    guider.set_state(0, 4, t)
    batches = guider.prepare_inputs({"encoder_hidden_states": conds})
    for batch in batches:
        guider.prepare_models(net)
        out = net(hidden_states=x, encoder_hidden_states=batch.encoder_hidden_states)
        batch.noise_pred = keep(out)
        guider.cleanup_models(net)
    return guider(batches).pred


def test_a_sample_joined_with_condition_tokens_is_refused():
    """Qwen-Image 2.1's image-conditioned loop puts the condition image's tokens before the
    sample's and gives the guider the last ones; which input tokens are the sample's cannot be
    told, so the guider refuses in one line. An inpainting UNet's extra channels (B, C, H, W)
    follow the sample's, which are the input's leading ones."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    guider = DiffguideGuidance("apg:scale=5").bind(scheduler)
    t, g = scheduler.timesteps[0], torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 24, 8, generator=g)  # 8 condition tokens, then the sample's 16
    with pytest.raises(ValueError) as err:
        _step(guider, tokens, lambda out: out[:, -16:], t)
    assert "has 16 of its input's 24 tokens" in str(err.value) and "\n" not in str(err.value)
    channels = torch.randn(2, 9, 4, 4, generator=g)  # the sample's 4, the mask, the image's 4
    assert _step(guider, channels, lambda out: out[:, :4], t).shape == (2, 4, 4, 4)


# schedulers from_scheduler does not know by name, which it would read as VP ones on eps
UNKNOWN = [
    "FlowMatchLCMScheduler",
    "CosineDPMSolverMultistepScheduler",
    "ScoreSdeVeScheduler",
    "CMStochasticIterativeScheduler",
]


@pytest.mark.parametrize("name", UNKNOWN)
def test_schedulers_it_does_not_know_are_refused(name):
    import diffusers

    scheduler = getattr(diffusers, name)()
    scheduler.set_timesteps(4)
    guider = DiffguideGuidance("cfg:scale=5").bind(scheduler)
    with pytest.raises(ValueError) as err:
        guider.set_state(0, 4, scheduler.timesteps[0])
    assert str(err.value).startswith(f"DiffguideGuidance does not know {name}'s noise levels")
    assert "\n" not in str(err.value)


def test_a_guider_on_another_pipelines_scheduler_is_refused():
    """A guider moved to a pipeline it is not bound to reads the first one's scheduler: at the end
    of its run, or at another timestep mid-run. It refuses in one line saying how to rebind."""
    from diffusers import EulerDiscreteScheduler

    first, second = EulerDiscreteScheduler(), EulerDiscreteScheduler()
    first.set_timesteps(6)
    second.set_timesteps(4)
    guider = DiffguideGuidance("apg:scale=5").bind(first)
    x = torch.zeros(1)
    for i, t in enumerate(first.timesteps):  # the first pipeline's run
        first.step(torch.zeros(1), t, first.scale_model_input(x, t))
        if i in (0, 5):
            with pytest.raises(ValueError) as err:
                guider.set_state(0, 4, second.timesteps[0])
            why = str(err.value)
            assert why.endswith("rebind with guider.bind(pipe)") and "\n" not in why
    guider.bind(second).set_state(0, 4, second.timesteps[0])


def test_branch_names_are_the_same_at_every_step():
    """Pipelines key caches by a batch's name (Qwen-Image 2.1's kv_caches, cache_context): each
    branch keeps its name over the steps and no two share one; the plain prompt and negative are
    diffusers' pred_cond and pred_uncond."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    spec = "cfg:scale=5+pag:scale=3,layers=mid,stop=0.5+slg:scale=3,layers=mid_block,start=0.5"
    spec += ",stop=1"
    guider = DiffguideGuidance(spec).bind(scheduler)
    conds = (torch.zeros(2, 3), torch.ones(2, 3))
    names = []
    for i, t in enumerate(scheduler.timesteps):  # PAG at steps 0 and 1, SLG at 3
        guider.set_state(i, 4, t)
        batches = guider.prepare_inputs({"encoder_hidden_states": conds})
        names.append([getattr(b, guider._identifier_key) for b in batches])
    plain = ["pred_cond", "pred_uncond"]
    assert names[0] == names[1] == [*plain, names[0][2]] and names[2] == plain
    assert names[3] == [*plain, names[3][2]] and names[3][2] != names[0][2]


def test_new_keeps_an_argument_given_by_position():
    """diffusers marks an argument given by position as a default value; new() keeps it."""
    guider = DiffguideGuidance("apg:scale=7", False)
    assert guider.new()._enabled is False and guider.new(enabled=True)._enabled is True


def test_qwenimage_step_without_the_prompt_branch(qwenimage):
    """cfg:scale=0 runs only the negative; Qwen-Image's rescale to pred_cond's norm gets the
    guided output as pred_cond and leaves it as the method gave it (GuidedPipeline's images)."""
    theirs = qwenimage.theirs(as_diffusers_guider("cfg:scale=0", qwenimage.modular))
    assert np.abs(theirs - qwenimage.ours("cfg:scale=0")).max() < TOL


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

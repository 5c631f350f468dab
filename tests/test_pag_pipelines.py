"""PAG on the transformer families against diffusers' PAG pipelines, and PAG's two rules on joint
attention (SD3, Flux, Qwen-Image) against the joint attention layer run with the rule's map.

Pipelines: StableDiffusion3PAGPipeline (joint attention: the image-image block masked to its
diagonal), PixArtSigmaPAGPipeline (plain self-attention; loads the tiny PixArt-alpha model) and
SanaPAGPipeline (linear attention, whose identity is the value path), with and without CFG, and
StableDiffusion3PAGImg2ImgPipeline, on tiny random models saved and loaded back. SD and SDXL:
tests/test_guiders.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

P = ["a red circle", "a blue square"]
SEEDS = [0, 1]
TOLERANCE = 1e-5

# family: (diffusers class, pag_applied_layers, diffguide's layers=, sampler, size, extra diffusers
# options)
CASES = {
    "sd3": (
        "StableDiffusion3PAGPipeline",
        ["transformer_blocks.0", "transformer_blocks.1"],
        "0;1",
        "euler",
        dict(height=16, width=16),
        {},
    ),
    "pixart": (
        "PixArtSigmaPAGPipeline",
        ["transformer_blocks.1"],
        "1",
        "dpmpp_2m",
        dict(height=16, width=16),
        dict(use_resolution_binning=False, max_sequence_length=120),
    ),
    "sana": (
        "SanaPAGPipeline",
        ["transformer_blocks.0"],
        "0",
        "dpmpp_2m",
        dict(height=32, width=32),
        dict(use_resolution_binning=False),
    ),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffguide.pipelines import tiny

    out = {}
    for fam in CASES:
        path = tmp_path_factory.mktemp(fam)
        tiny.BUILDERS[fam]().save_pretrained(path)
        out[fam] = str(path)
    return out


def _theirs(folder, fam, guidance_scale, pag_scale):
    import diffusers

    cls, layers, _, _, size, extra = CASES[fam]
    pipe = getattr(diffusers, cls).from_pretrained(folder, pag_applied_layers=layers)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(
        P,
        num_inference_steps=6,
        guidance_scale=guidance_scale,
        pag_scale=pag_scale,
        generator=gens,
        output_type="np",
        **size,
        **extra,
    ).images


def _ours(folder, fam, guidance_scale, pag_options=""):
    from diffguide.pipelines import GuidedPipeline

    _, _, layers, sampler, size, _ = CASES[fam]
    pag = f"pag:scale=3,layers={layers}{pag_options}"
    spec = pag if guidance_scale == 1 else f"cfg:scale={guidance_scale}+{pag}"
    gp = GuidedPipeline.from_pretrained(folder, progress=False)
    return gp(P, guidance=spec, steps=6, sampler=sampler, seed=SEEDS, output_type="np", **size)


@pytest.mark.parametrize("guidance_scale", [4.5, 1.0])
@pytest.mark.parametrize("fam", list(CASES))
def test_pag_equals_diffusers_pag_pipelines(folders, fam, guidance_scale):
    ref = _theirs(folders[fam], fam, guidance_scale, 3.0)
    without = _theirs(folders[fam], fam, guidance_scale, 0.0)
    out = _ours(folders[fam], fam, guidance_scale)
    assert np.abs(out.images - ref).max() < TOLERANCE
    assert np.abs(without - ref).max() > 20 * TOLERANCE  # PAG's own effect: the test can fail
    assert out.forwards == 6 and out.nfe == 6 * (
        2 if guidance_scale == 1 else 3
    )  # P in C's forward


def test_pag_img2img_equals_stable_diffusion_3_pag_img2img_pipeline(folders):
    import diffusers

    from diffguide.pipelines import GuidedPipeline

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    common = dict(prompt=P, image=images, height=32, width=32, strength=0.6, output_type="np")
    pipe = diffusers.StableDiffusion3PAGImg2ImgPipeline.from_pretrained(
        folders["sd3"], pag_applied_layers=["transformer_blocks.0"]
    )
    pipe.set_progress_bar_config(disable=True)
    ref, without = (
        pipe(
            num_inference_steps=10,
            guidance_scale=5.0,
            pag_scale=pag,
            **common,
            generator=[torch.Generator().manual_seed(s) for s in SEEDS],
        ).images
        for pag in (3.0, 0.0)
    )
    gp = GuidedPipeline.from_pretrained(folders["sd3"], progress=False)
    out = gp(
        steps=10, guidance="cfg:scale=5+pag:scale=3,layers=0", sampler="euler", seed=SEEDS, **common
    )
    assert np.abs(out.images - ref).max() < TOLERANCE < 20 * TOLERANCE < np.abs(without - ref).max()


def test_the_values_rule_is_an_option_and_differs_on_joint_attention(folders):
    ref = _theirs(folders["sd3"], "sd3", 4.5, 3.0)
    values = _ours(folders["sd3"], "sd3", 4.5, ",joint=values").images
    diagonal = _ours(folders["sd3"], "sd3", 4.5, ",joint=diagonal").images
    assert np.abs(diagonal - ref).max() < TOLERANCE < 100 * TOLERANCE < np.abs(values - ref).max()


def test_the_rules_agree_on_plain_self_attention(folders):
    values = _ours(folders["pixart"], "pixart", 4.5, ",joint=values").images
    diagonal = _ours(folders["pixart"], "pixart", 4.5).images
    assert np.array_equal(values, diagonal)


class DiagonalMap(TorchFunctionMode):
    """Runs scaled_dot_product_attention with the image-image block of the joint map masked to its
    diagonal (the reference for joint=diagonal); the text block's position is given."""

    def __init__(self, n_text, n_image, text_first):
        super().__init__()
        self.n_text, self.n_image, self.text_first = n_text, n_image, text_first

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            n = self.n_text + self.n_image
            image = slice(self.n_text, n) if self.text_first else slice(0, self.n_image)
            allowed = torch.ones(n, n, dtype=torch.bool)
            allowed[image, image] = torch.eye(self.n_image, dtype=torch.bool)
            given = kwargs.get("attn_mask")
            kwargs["attn_mask"] = allowed if given is None else allowed & given.bool()
        return func(*args, **kwargs)


def _joint_layer(fam):
    """A tiny model's first joint attention layer and the arguments its block gives it in a forward
    of two images (recorded during one sampling step)."""
    from diffguide.pipelines import GuidedPipeline, tiny

    gp = GuidedPipeline.from_pipe(tiny.BUILDERS[fam](), progress=False)
    attn = gp.family.net.transformer_blocks[0].attn
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True)
    try:
        gp(P, guidance="none", steps=1, seed=SEEDS, height=16, width=16, output_type="latent")
    finally:
        handle.remove()
    return gp, attn, *seen[0]


@pytest.mark.parametrize("fam", ["sd3", "flux", "qwenimage"])
def test_both_joint_rules_on_each_joint_family(fam):
    """diagonal: the layer with its map masked (rotary embeddings, Qwen-Image's text mask and each
    family's token order included); values: diffusers' modular guider's rule (its function mode
    returning the values); both on the perturbed row only."""
    from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode

    from diffguide.guidance.perturb import IdentityAttention

    gp, attn, args, kwargs = _joint_layer(fam)
    n_text, n_image = kwargs["encoder_hidden_states"].shape[1], kwargs["hidden_states"].shape[1]
    with torch.no_grad():
        plain = attn(*args, **kwargs)
        with DiagonalMap(n_text, n_image, text_first=fam != "sd3"):
            diagonal = attn(*args, **kwargs)
        with AttentionScoreSkipFunctionMode():
            values = attn(*args, **kwargs)
        rows = torch.tensor(
            [True, False]
        )  # the first prompt: the shorter, with padding on Qwen-Image
        for joint, ref in (("diagonal", diagonal), ("values", values)):
            with IdentityAttention("0", joint).apply(gp.net_denoiser, None, rows):
                out = attn(*args, **kwargs)
            for stream, (o, p, r) in enumerate(zip(out, plain, ref)):
                assert torch.equal(o[1], p[1])  # the other row is left alone
                assert (o[0] - r[0]).abs().max() < 1e-5, (joint, stream)
                assert (r[0] - p[0]).abs().max() > 1e-3 or (joint, stream) == ("diagonal", 1)
    assert torch.allclose(
        diagonal[1], plain[1], atol=1e-6
    )  # text tokens keep their whole attention


def test_single_stream_layers_need_the_values_rule():
    from diffguide.pipelines import GuidedPipeline, tiny

    gp = GuidedPipeline.from_pipe(tiny.flux(), progress=False)
    run = dict(steps=1, seed=SEEDS, height=16, width=16, output_type="latent")
    with pytest.raises(ValueError, match="single_transformer_blocks.0.attn .*joint=values"):
        gp(P, guidance="pag:layers=single_transformer_blocks.0", **run)
    assert torch.isfinite(
        gp(P, guidance="pag:layers=single_transformer_blocks.0,joint=values", **run).images
    ).all()


def test_an_unknown_joint_rule_is_named():
    from diffguide.core.registry import parse_spec

    with pytest.raises(
        ValueError, match="joint='diag' is not a rule; choose one of: diagonal .*values"
    ):
        parse_spec("guidance", "pag:joint=diag")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_diagonal_rule_is_capturable(family):
    """The whole loop with PAG on joint attention, on meta under the host-traffic check of
    tests/test_graphs.py: no host read of device data, no host-made array per step."""
    from test_graphs import CheckedCapture

    from diffguide.core.graphs import LoopGraphs
    from diffguide.pipelines import GuidedPipeline, tiny

    class OnMeta(GuidedPipeline):
        device = property(lambda self: torch.device("meta"))

    pipe = tiny.BUILDERS[family]()
    gp = OnMeta.from_pipe(pipe, progress=False)
    pipe.to("meta")
    gp.graphs = LoopGraphs(CheckedCapture())
    out = gp(
        "a red circle",
        negative_prompt="",
        seed=[0],
        steps=3,
        height=64,
        width=64,
        guidance="cfg:scale=3+pag:scale=2",
        output_type="latent",
        cuda_graph=True,
        check_finite=False,
    )
    assert out.images.device.type == "meta"
    assert gp.graphs.captures == 1 and not gp.graphs.notices, gp.graphs.notices

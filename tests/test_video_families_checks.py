"""What a diffusers user expects of the video families on tiny models: a pipeline class the family
does not serve refused at load (CogVideoX's and Wan's other pipelines on the same transformer), Wan
first-last-frame refused, long prompts noticed, CogVideoXPipeline's default guidance scale, and
image= refused on text to video."""

import numpy as np
import pytest
import torch

from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm
from diffguide.pipelines.pipeline import PromptTruncated

PARTS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")


def _frame(size=16):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8"))


def test_other_pipelines_on_a_served_transformer_are_refused_in_one_line():
    import diffusers

    cog = tm.cogvideox()
    parts = {k: getattr(cog, k) for k in PARTS}
    for cls in (diffusers.CogVideoXImageToVideoPipeline, diffusers.CogVideoXVideoToVideoPipeline):
        with pytest.raises(ValueError) as e:
            GuidedPipeline(cls(**parts), progress=False)
        assert str(e.value) == (
            f"{cls.__name__} is not supported on CogVideoXTransformer3DModel; supported: "
            "CogVideoXPipeline"
        )
    wan = tm.wan()
    with pytest.raises(ValueError, match="^WanVideoToVideoPipeline is not supported on .*") as e:
        GuidedPipeline(
            diffusers.WanVideoToVideoPipeline(**{k: getattr(wan, k) for k in PARTS}),
            progress=False,
        )
    assert "WanPipeline, WanImageToVideoPipeline" in str(e.value) and "\n" not in str(e.value)

    class Subclassed(diffusers.CogVideoXPipeline):  # a pipeline derived from a served one
        pass

    assert GuidedPipeline(Subclassed(**parts), progress=False).family.name == "cogvideox"
    assert GuidedPipeline(tm.wan_i2v(), progress=False).family.name == "wan_i2v"


def test_wan_first_last_frame_is_refused():
    """FLF2V (the transformer's pos_embed_seq_len: two images' CLIP states) is refused in one line
    instead of failing in the network."""
    pipe = tm.wan_i2v(net={"pos_embed_seq_len": 2 * 1025})
    with pytest.raises(ValueError, match="first-last-frame .*pos_embed_seq_len"):
        GuidedPipeline(pipe, progress=False)(
            "a cube", image=_frame(), height=16, width=16, num_frames=5, steps=2
        )


@pytest.mark.parametrize("build,limit", [(tm.wan, 512), (tm.cogvideox, 226)])
def test_prompts_beyond_the_t5_window_are_noticed(build, limit):
    """diffusers' encode_prompt keeps max_sequence_length tokens, its end token among them."""
    gp = GuidedPipeline(build(), progress=False)
    words = (limit - 1) // 2  # "a" is two tokens in the tiny T5 vocabulary: 2 * words < limit
    kw = dict(height=16, width=16, num_frames=5, steps=1, seed=0, output_type="latent")
    fits = gp(" ".join(["a"] * words), **kw)
    assert not [n for n in fits.notices if "window" in n]
    with pytest.warns(PromptTruncated):
        cut = gp([" ".join(["a"] * (words + 1)), "a cube"], **kw)
    said = [n for n in cut.notices if "window" in n]
    assert len(said) == 1 and said[0].startswith("1 prompt(s) longer than"), cut.notices
    assert f"window of {limit} tokens" in said[0]


def test_cogvideox_runs_cogvideox_pipelines_default_guidance():
    """No guidance given: CFG at CogVideoXPipeline's default guidance_scale 6."""
    kw = dict(prompt=["a red cube"], height=16, width=16, num_frames=9)
    ref_pipe = tm.cogvideox()
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        **kw,
        num_inference_steps=4,
        generator=[torch.Generator().manual_seed(0)],
        output_type="latent",
    ).frames
    gp = GuidedPipeline(tm.cogvideox(), progress=False)
    out = gp(**kw, steps=4, seed=[0], output_type="latent", sampler="ddim")
    torch.testing.assert_close(out.images.permute(0, 2, 1, 3, 4), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("build,frames", [(tm.wan, 5), (tm.cogvideox, 9)])
def test_image_on_text_to_video_is_refused(build, frames):
    gp = GuidedPipeline(build(), progress=False)
    with pytest.raises(ValueError, match="makes clips from text alone; image= .* image-to-video"):
        gp("a cube", image=_frame(), height=16, width=16, num_frames=frames, steps=2)

"""Video (issue 36): Wan 2.1 text to video against diffusers' WanPipeline on tiny folders saved
with save_pretrained (diffusers' fast-test sizes, the published 1.3B model's scheduler), every
guidance method and sampler on a clip, and the frame rules."""

import numpy as np
import pytest
import torch

from diffguide.core.registry import names
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm

TWO = ["a red cube", "a blue ball"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-wan")
    tm.wan().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("scheduler,sampler", [("unipc", "unipc"), ("euler", "euler")])
def test_wan_matches_wan_pipeline(scheduler, sampler, tmp_path):
    """CFG 5 with negatives, two prompts, 9 frames: the same clips as WanPipeline, in [0, 1]."""
    from diffusers import DiffusionPipeline

    tm.wan(scheduler).save_pretrained(tmp_path)
    ref_pipe = DiffusionPipeline.from_pretrained(tmp_path)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        prompt=TWO,
        negative_prompt=["", "blurry"],
        height=16,
        width=16,
        num_frames=9,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="np",
    ).frames
    gp = GuidedPipeline.from_pretrained(str(tmp_path), progress=False)
    out = gp(
        prompt=TWO,
        negative_prompt=["", "blurry"],
        height=16,
        width=16,
        num_frames=9,
        steps=6,
        seed=[0, 1],
        output_type="np",
        sampler=sampler,
    )
    assert out.images.shape == ref.shape == (2, 9, 16, 16, 3)
    np.testing.assert_allclose(out.images, ref, atol=1e-5)
    assert out.nfe == 12 and not out.notices
    # the latents too: the tiny VAE flattens differences (UniPC's own flow grid, from sigma 1,
    # once differed by 2e-3 here and by 3e-6 in the frames)
    ref_latents = ref_pipe(
        prompt=TWO,
        negative_prompt=["", "blurry"],
        height=16,
        width=16,
        num_frames=9,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="latent",
    ).frames
    latents = gp(**_same(out), sampler=sampler, output_type="latent").images
    torch.testing.assert_close(latents, ref_latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(  # the model's own sampler and guidance are these
        torch.as_tensor(gp(**_same(out), output_type="np").images), torch.as_tensor(out.images)
    )


def _same(out):
    return dict(
        prompt=TWO,
        negative_prompt=["", "blurry"],
        height=16,
        width=16,
        num_frames=9,
        steps=6,
        seed=[0, 1],
    )


def _runs(gp, guide, size, extra, **kw):
    base = dict(prompt="a cat", negative_prompt="blur", height=size, width=size, steps=3, seed=0)
    base.update(extra)
    if kw.get("guidance", "").startswith("autoguidance"):
        kw["guide_model"] = guide
    return gp(**base, **kw, output_type="latent")


FAMILIES = {"wan": (tm.wan, 64), "cogvideox": (tm.cogvideox, 32), "wan_i2v": (tm.wan_i2v, 32)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def wan_pair(request):
    """(a video model, a weaker one of its kind for AutoGuidance, its test size, its extra
    arguments: image to video's first frame)."""
    from PIL import Image

    build, size = FAMILIES[request.param]
    extra = {}
    if request.param == "wan_i2v":
        frame = (np.random.RandomState(2).rand(size, size, 3) * 255).astype("uint8")
        extra["image"] = Image.fromarray(frame)
    return (
        GuidedPipeline(build(), progress=False),
        GuidedPipeline(build(net={"num_layers": 1}), progress=False),
        size,
        extra,
    )


@pytest.mark.parametrize("guidance", [g for g in names("guidance") if g != "nag"])  # NAG: images
def test_every_guidance_method_runs_on_a_clip(guidance, wan_pair):
    """Each method on a 5-frame clip evaluates the network as often as on one frame."""
    gp, guide, size, extra = wan_pair
    clip = _runs(gp, guide, size, extra, guidance=guidance, sampler="euler", num_frames=5)
    frame = _runs(gp, guide, size, extra, guidance=guidance, sampler="euler", num_frames=1)
    assert clip.images.shape[2] == 2 and torch.isfinite(clip.images).all()
    assert clip.nfe == frame.nfe


@pytest.mark.parametrize("sampler", names("sampler"))
def test_every_sampler_runs_on_a_clip(sampler, wan_pair):
    gp, guide, size, extra = wan_pair
    clip = _runs(gp, guide, size, extra, guidance="cfg", sampler=sampler, num_frames=5)
    frame = _runs(gp, guide, size, extra, guidance="cfg", sampler=sampler, num_frames=1)
    assert torch.isfinite(clip.images).all() and clip.nfe == frame.nfe


def test_frames_rules_and_outputs(wan_folder):
    gp = GuidedPipeline.from_pretrained(wan_folder, progress=False)
    kw = dict(prompt="a cat", height=16, width=16, steps=2, seed=0)
    with pytest.raises(ValueError, match="num_frames must be 4 k \\+ 1"):
        gp(**kw, num_frames=8)
    with pytest.raises(ValueError, match="positive integer"):
        gp(**kw, num_frames=0)
    with pytest.raises(ValueError, match="num_frames is for video models"):
        GuidedPipeline(tm.sd3(), progress=False)(**kw, num_frames=5)
    clips = gp(**kw, num_frames=5, output_type="pil").images
    assert len(clips) == 1 and len(clips[0]) == 5 and clips[0][0].size == (16, 16)
    assert gp(**kw, num_frames=5, output_type="pt").images.shape == (1, 5, 3, 16, 16)
    assert gp.size(None, None) == (480, 832)  # WanPipeline's defaults


def test_cli_writes_clips_with_their_settings(wan_folder, tmp_path, capsys):
    """MP4 (H.264 through PyAV, the settings in the container's comment), animated GIF and WebP;
    a folder gets seed-named .mp4 files; image models refuse --frames, --fps and clip formats."""
    import json

    import av
    from PIL import Image

    from diffguide.cli.main import main

    args = ["a red cube", "--model", wan_folder, "--height", "16", "--width", "16"]
    args += ["--frames", "9", "--steps", "3", "--quiet"]
    for name in ("a.mp4", "b.gif", "c.webp", "d"):
        assert main(["generate", *args, "-o", str(tmp_path / name)]) == 0
    with av.open(str(tmp_path / "a.mp4")) as clip:
        meta = json.loads(clip.metadata["comment"])
        frames = [f.to_ndarray(format="rgb24") for f in clip.decode(video=0)]
    assert meta["frames"] == 9 and meta["fps"] == 16 and meta["model"].endswith(wan_folder[-8:])
    assert len(frames) == 9 and frames[0].shape == (16, 16, 3)
    with Image.open(tmp_path / "b.gif") as gif:
        assert gif.n_frames == 9 and json.loads(gif.info["comment"])["frames"] == 9
    with Image.open(tmp_path / "c.webp") as webp:
        assert webp.n_frames == 9
    assert (tmp_path / "d" / "000000.mp4").exists()
    assert "1 clip(s)" in capsys.readouterr().err
    image = ["a red cube", "--steps", "2", "--quiet"]
    for extra, message in (
        (["--frames", "9", "-o", str(tmp_path / "x.png")], "num_frames is for video models"),
        (["--fps", "8", "-o", str(tmp_path / "y.png")], "--fps is for video models"),
        (["-o", str(tmp_path / "z.mp4")], "cannot write .mp4 images"),
        ([*args[1:3], "--frames", "8", "-o", str(tmp_path / "w.mp4")], "4 k \\+ 1"),
    ):
        assert main(["generate", *image, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err
    assert not any((tmp_path / n).exists() for n in ("x.png", "y.png", "z.mp4", "w.mp4"))


@pytest.mark.parametrize("scheduler,sampler", [("unipc", "unipc"), ("euler", "euler")])
def test_wan22_two_experts_match_wan_pipeline(scheduler, sampler):
    """Wan 2.2's A14B layout: transformer above boundary_ratio x 1000 with guidance_scale,
    transformer_2 below it with guidance_scale_2 (T-Stitch's switch on a level rule, each expert
    with its own guidance). Compared on latents, where both the switch and the second scale
    show."""
    kw = dict(prompt=TWO, negative_prompt=["", "blurry"], height=16, width=16, num_frames=9)
    ref_pipe = tm.wan(scheduler, boundary_ratio=0.875)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        **kw,
        num_inference_steps=8,
        guidance_scale=5.0,
        guidance_scale_2=3.0,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="latent",
    ).frames
    gp = GuidedPipeline(tm.wan(scheduler, boundary_ratio=0.875), progress=False)
    ours = dict(kw, steps=8, seed=[0, 1], output_type="latent", sampler=sampler)
    out = gp(**ours, guidance_scale=5.0, guidance_scale_2=3.0)
    torch.testing.assert_close(out.images, ref, rtol=0, atol=1e-5)
    assert out.nfe == 16
    other = gp(**ours, guidance_scale=5.0, guidance_scale_2=9.0).images
    assert (other - ref).abs().max() > 1e-3  # the second scale is applied
    one = GuidedPipeline(tm.wan(scheduler), progress=False)(**ours, guidance_scale=5.0).images
    assert (one - ref).abs().max() > 1e-2  # the second expert runs
    same = gp(**ours, guidance="cfg:scale=5", guidance_2="cfg:scale=3").images
    torch.testing.assert_close(same, out.images, rtol=0, atol=0)


def test_expert_options_are_refused_where_they_do_not_apply():
    from diffguide.pipelines import Stitching

    one = GuidedPipeline(tm.wan(), progress=False)
    kw = dict(prompt="a cat", height=16, width=16, num_frames=5, steps=2)
    with pytest.raises(ValueError, match="for two-expert models"):
        one(**kw, guidance_scale_2=3.0)
    two = GuidedPipeline(tm.wan(boundary_ratio=0.875), progress=False)
    with pytest.raises(ValueError, match="its experts already switch"):
        two(**kw, stitch=Stitching(one, 0.4))


@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("dynamic", [False, True])
def test_cogvideox_matches_cogvideox_pipeline(rotary, dynamic):
    """CogVideoX 1.0 (5b's 3-D rotary table, or 2b's sine-cosine positions) with DDIM on its
    zero-SNR v-prediction table: the same latents as CogVideoXPipeline (frames-first there, its
    first noise drawn in that layout), and its dynamic CFG as cfg:weight_schedule=cogvideox."""
    kw = dict(prompt=TWO, negative_prompt=["", "blurry"], height=16, width=16, num_frames=9)
    ref_pipe = tm.cogvideox(rotary)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        **kw,
        num_inference_steps=6,
        guidance_scale=6.0,
        use_dynamic_cfg=dynamic,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="latent",
    ).frames
    gp = GuidedPipeline(tm.cogvideox(rotary), progress=False)
    spec = "cfg:scale=6" + (",weight_schedule=cogvideox" if dynamic else "")
    ours = dict(kw, steps=6, seed=[0, 1], output_type="latent", sampler="ddim")
    out = gp(**ours, guidance=spec)
    torch.testing.assert_close(out.images.permute(0, 2, 1, 3, 4), ref, rtol=0, atol=1e-5)
    other = gp(**ours, guidance="cfg:scale=6" + ("" if dynamic else ",weight_schedule=cogvideox"))
    assert (other.images - out.images).abs().max() > 1e-4  # the schedule is applied
    assert gp.size(None, None) == (16, 16) and gp.family.default_frames == 9  # the config's


def test_pag_on_cogvideox_masks_the_image_block_to_its_diagonal():
    """CogVideoX attends over text and video tokens with one set of projections and rotates only
    the video tokens: PAG's diagonal rule equals its own processor under a mask that lets each
    video token see itself and the text."""
    from diffguide.guidance.perturb import _diagonal_attention

    pipe = tm.cogvideox()
    attn = pipe.transformer.transformer_blocks[0].attn1
    g = torch.Generator().manual_seed(0)
    b, nt, ni = 2, 5, 12
    h, e = torch.randn(b, ni, 32, generator=g), torch.randn(b, nt, 32, generator=g)
    rope = pipe._prepare_rotary_positional_embeddings(32, 32, 3, "cpu")
    allowed = torch.ones(nt + ni, nt + ni, dtype=torch.bool)
    allowed[nt:, nt:] = torch.eye(ni, dtype=torch.bool)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        ref, _ = attn(
            hidden_states=h,
            encoder_hidden_states=e,
            attention_mask=mask.expand(b, -1, -1).contiguous(),
            image_rotary_emb=rope,
        )
        ours = _diagonal_attention(attn, h, e, None, rope)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,other", [("r", "slg"), ("a", "pag")])
def test_stg_is_cfg_plus_a_skipped_or_identity_branch(mode, other):
    """Without rescaling STG is CFG plus SLG's (STG-R) or PAG's (STG-A) perturbed branch on the
    same layers, over every step: U + cfg (C - U) + scale (C - P), all three in one forward."""
    gp = GuidedPipeline(tm.cogvideox(), progress=False)
    kw = dict(prompt=TWO, negative_prompt=["", "blurry"], height=32, width=32, num_frames=9)
    kw.update(steps=4, seed=[0, 1], output_type="latent", sampler="ddim")
    stg = gp(**kw, guidance=f"stg:scale=2,cfg=6,mode={mode},layers=1,rescale=0")
    spec = f"cfg:scale=6+{other}:scale=2,layers=1" + (",start=0,stop=1" if other == "slg" else "")
    torch.testing.assert_close(stg.images, gp(**kw, guidance=spec).images, rtol=1e-6, atol=1e-6)
    assert stg.nfe == 12 and stg.forwards == 4
    scaled = gp(**kw, guidance=f"stg:scale=2,cfg=6,mode={mode},layers=1")
    assert (scaled.images - stg.images).abs().max() > 1e-4  # rescale 0.7 by default
    alone = gp(
        **dict(kw, prompt=TWO[:1], negative_prompt=[""], seed=[0]),
        guidance=f"stg:scale=2,cfg=6,mode={mode},layers=1",
    )
    torch.testing.assert_close(alone.images, scaled.images[:1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="STG mode 'x'"):
        gp(**kw, guidance="stg:mode=x")


def test_wan22_ti2v_per_token_timesteps_match_wan_pipeline():
    """TI2V-5B's expand_timesteps (text to video): one timestep per latent token, as WanPipeline
    passes them."""
    kw = dict(prompt=TWO, negative_prompt=["", "blurry"], height=16, width=16, num_frames=9)
    ref_pipe = tm.wan(expand_timesteps=True)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        **kw,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="latent",
    ).frames
    seen = []
    gp = GuidedPipeline(tm.wan(expand_timesteps=True), progress=False)
    gp.family.net.register_forward_pre_hook(
        lambda m, a, k: seen.append(tuple(k["timestep"].shape)), with_kwargs=True
    )
    out = gp(**kw, steps=6, seed=[0, 1], output_type="latent", sampler="unipc")
    torch.testing.assert_close(out.images, ref, rtol=0, atol=1e-5)
    assert seen[0] == (4, 3 * 1 * 1)  # 4 rows (2 prompts x CFG), 3 latent frames of 1 x 1 tokens


@pytest.mark.parametrize("ti2v", [False, True])
@pytest.mark.parametrize("scheduler,sampler", [("unipc", "unipc"), ("euler", "euler")])
def test_wan_image_to_video_matches_its_pipeline(scheduler, sampler, ti2v):
    """Wan 2.1 I2V: the first frame's VAE latents and mask beside the noisy latents, the CLIP
    vision states as the network's image input; Wan 2.2 TI2V-5B: the first frame's latents in
    place of the first latent frame, its tokens at time 0. The same latents as
    WanImageToVideoPipeline."""
    from PIL import Image

    image = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8"))
    kw = dict(prompt=["a red cube"], negative_prompt=["blurry"], height=16, width=16, num_frames=9)
    ref_pipe = tm.wan_i2v(scheduler, ti2v=ti2v)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        image=image,
        **kw,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(0)],
        output_type="latent",
    ).frames
    gp = GuidedPipeline(tm.wan_i2v(scheduler, ti2v=ti2v), progress=False)
    out = gp(image=image, **kw, steps=6, seed=[0], output_type="latent", sampler=sampler)
    torch.testing.assert_close(out.images, ref, rtol=0, atol=1e-5)
    other = Image.fromarray(np.zeros((16, 16, 3), dtype="uint8"))
    moved = gp(image=other, **kw, steps=6, seed=[0], output_type="latent", sampler=sampler)
    assert (moved.images - out.images).abs().max() > 1e-4  # the frame is read
    with pytest.raises(ValueError, match="makes a clip from its first frame"):
        gp(**kw, steps=2)
    with pytest.raises(ValueError, match="strength is image-to-image's"):
        gp(image=image, strength=0.5, **kw, steps=2)


def test_cli_image_to_video(tmp_path):
    import json

    import av
    from PIL import Image

    from diffguide.cli.main import main

    folder = tmp_path / "i2v"
    tm.wan_i2v().save_pretrained(folder)
    frame = tmp_path / "first.png"
    Image.fromarray((np.random.RandomState(1).rand(16, 16, 3) * 255).astype("uint8")).save(frame)
    out = tmp_path / "clip.mp4"
    argv = ["generate", "a red cube", "--model", str(folder), "--init-image", str(frame)]
    argv += ["--frames", "9", "--height", "16", "--width", "16", "--steps", "3", "--quiet"]
    assert main([*argv, "-o", str(out)]) == 0
    with av.open(str(out)) as clip:
        meta = json.loads(clip.metadata["comment"])
    assert meta["init_image"] == str(frame) and "strength" not in meta


def test_from_png_replays_a_clip(wan_folder, tmp_path):
    """--from-png reads a clip's settings (MP4's comment tag, GIF's comment, WebP's EXIF) and
    makes the same file again, byte for byte."""
    from diffguide.cli.main import main

    args = ["a red cube", "--model", wan_folder, "--height", "16", "--width", "16"]
    args += ["--frames", "5", "--steps", "3", "--fps", "8", "--quiet"]
    for ext in (".mp4", ".gif", ".webp"):
        first, again = tmp_path / f"a{ext}", tmp_path / f"b{ext}"
        assert main(["generate", *args, "-o", str(first)]) == 0
        assert main(["generate", "--from-png", str(first), "-o", str(again), "--quiet"]) == 0
        assert first.read_bytes() == again.read_bytes(), ext


def test_seg_blurs_each_frame_of_the_latent_layout():
    """SEG's blur on a clip's (or a non-square image's) tokens: each frame on its own grid in the
    latent's proportions, as the square path blurs one square frame; a joint layer's text tokens
    ahead of the image ones are left alone."""
    from diffguide.guidance.perturb import blur_tokens, token_grid

    q = torch.randn(2, 3 * 16, 5, generator=torch.Generator().manual_seed(0))
    per_frame = torch.cat([blur_tokens(q[:, 16 * i : 16 * (i + 1)], 1.0) for i in range(3)], 1)
    torch.testing.assert_close(blur_tokens(q, 1.0, grid=(3, 8, 8)), per_frame, rtol=0, atol=0)
    assert token_grid(3 * 4 * 6, (3, 8, 12)) == (3, 4, 6)  # patch 2 on an 8 x 12 latent
    assert token_grid(7, (3, 8, 12)) is None
    rect = torch.randn(1, 24, 2, generator=torch.Generator().manual_seed(1))
    flat = rect.transpose(1, 2).reshape(1, 2, 4, 6)
    # sigma 1: a kernel of 7 capped by the short side 4 at 5 (the authors' odd cap: side + 1)
    k = torch.exp(-0.5 * torch.linspace(-2, 2, 5) ** 2)
    k = k / k.sum()
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(flat, [2] * 4, mode="reflect"),
        (k[:, None] * k[None, :]).expand(2, 1, 5, 5),
        groups=2,
    )
    torch.testing.assert_close(
        blur_tokens(rect, 1.0, grid=(1, 4, 6)), ref.reshape(1, 2, 24).transpose(1, 2)
    )
    gp = GuidedPipeline(tm.cogvideox(), progress=False)
    out = gp("a cat", height=32, width=32, num_frames=5, steps=3, guidance="cfg+seg", seed=0)
    assert out.nfe == 9

"""A diffusers script switches over by changing the class: diffusers' argument names give the same
images as diffguide's own (and as diffusers' pipeline), ``to``/``save_pretrained`` and the memory
switches work on the wrapper, long prompts are read whole."""

import json
import warnings

import numpy as np
import pytest
import torch

from diffguide.pipelines import tiny as tm

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return {
        pred: tm.save(str(tmp_path_factory.mktemp(pred) / "m"), "sd", prediction_type=pred)
        for pred in ("epsilon", "v_prediction")
    }


def _pipes(path):
    from diffusers import DiffusionPipeline

    from diffguide import GuidedPipeline  # the top-level name diffusers users reach for

    ref = DiffusionPipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    return ref, GuidedPipeline.from_pretrained(path, progress=False)


def gens(n=2, base=3):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def test_top_level_import_is_lazy():
    import subprocess
    import sys

    code = (
        "import sys, diffguide; print('diffusers' in sys.modules); diffguide.GuidedPipeline; "
        "print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    ).stdout.split()
    assert out == ["False", "ok"]


def test_aliases_give_diffguides_own_images(folder):
    _, gp = _pipes(folder["epsilon"])
    base = gp(PROMPTS, steps=5, seed=3, output_type="np").images
    assert np.array_equal(gp(PROMPTS, num_inference_steps=5, seed=3, output_type="np").images, base)
    images, nsfw = gp(PROMPTS, steps=5, seed=3, output_type="np", return_dict=False)
    assert np.array_equal(images, base) and nsfw is None
    # eta: diffusers' DDIM eta is the sampler's option
    a = gp(PROMPTS, steps=5, seed=3, sampler="ddim", eta=1.0, output_type="np").images
    assert np.array_equal(
        a, gp(PROMPTS, steps=5, seed=3, sampler="ddim:eta=1", output_type="np").images
    )
    # latents: the seeds' own initial noise given explicitly
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in gens()])
    assert np.array_equal(
        gp(PROMPTS, steps=5, latents=noise, seed=3, output_type="np").images, base
    )
    # prompt_embeds: the embeddings the prompts encode to
    pe, ne = gp.pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    got = gp(prompt_embeds=pe, negative_prompt_embeds=ne, steps=5, seed=3, output_type="np").images
    assert np.array_equal(got, base)
    # cross_attention_kwargs with no LoRA loaded changes nothing
    got = gp(
        PROMPTS, steps=5, seed=3, cross_attention_kwargs={"scale": 1.0}, output_type="np"
    ).images
    assert np.array_equal(got, base)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_diffusers_arguments_match_diffusers_pipeline(folder, pred):
    ref, gp = _pipes(folder[pred])
    for kw in (
        dict(guidance_rescale=0.7),
        dict(clip_skip=1),
        dict(cross_attention_kwargs={"scale": 0.5}),
    ):
        theirs_kw = dict(kw)
        if "clip_skip" in kw:  # diffusers 0.42's clip_skip reads text_encoder.text_model (gone in
            theirs_kw = dict(
                prompt_embeds=_skipped(ref, PROMPTS), negative_prompt_embeds=_skipped(ref, ["", ""])
            )
        theirs = ref(
            **({} if "clip_skip" in kw else {"prompt": PROMPTS}),
            num_inference_steps=6,
            guidance_scale=6.0,
            generator=gens(),
            output_type="np",
            **theirs_kw,
        ).images
        ours = gp(
            PROMPTS,
            num_inference_steps=6,
            guidance_scale=6.0,
            generator=gens(),
            output_type="np",
            **kw,
        ).images
        assert np.abs(ours - theirs).max() < 1e-5, kw
    plain = ref(
        PROMPTS, num_inference_steps=6, guidance_scale=6.0, generator=gens(), output_type="np"
    ).images
    rescaled = gp(
        PROMPTS,
        num_inference_steps=6,
        guidance_scale=6.0,
        generator=gens(),
        output_type="np",
        guidance_rescale=0.7,
    ).images
    assert np.abs(rescaled - plain).max() > 1e-4  # the option did something (parity is 100x finer)


def _skipped(pipe, texts, skip=1):
    """CLIP's hidden state skip + 1 layers from the end, through the final layer norm (diffusers'
    definition of clip_skip), computed here from the text encoder itself."""
    ids = pipe.tokenizer(
        texts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    enc = pipe.text_encoder
    with torch.no_grad():
        h = enc(ids, output_hidden_states=True).hidden_states[-(skip + 1)]
        return getattr(enc, "text_model", enc).final_layer_norm(h)


def test_callback_on_step_end_sees_and_replaces_the_latents(folder):
    ref, gp = _pipes(folder["epsilon"])
    seen = {"ours": [], "theirs": []}

    def make(who, scale=None):
        def cb(pipe, i, t, kw):
            seen[who].append((i, int(t), tuple(kw["latents"].shape)))
            return {"latents": kw["latents"] * scale} if scale and i == 2 else kw

        return cb

    theirs = ref(
        PROMPTS,
        num_inference_steps=5,
        guidance_scale=7.5,
        generator=gens(),
        output_type="np",
        callback_on_step_end=make("theirs"),
    ).images
    ours = gp(
        PROMPTS,
        num_inference_steps=5,
        guidance_scale=7.5,
        generator=gens(),
        output_type="np",
        callback_on_step_end=make("ours"),
    ).images
    assert (
        seen["ours"] == seen["theirs"] and len(seen["ours"]) == 5
    )  # same steps, timesteps, shapes
    assert np.abs(ours - theirs).max() < 1e-5
    # a returned "latents" replaces x (diffguide's next step renoises with the network's eps at the
    # new x rather than re-deriving it from x, so the image is not diffusers' to the last digit)
    changed = gp(
        PROMPTS,
        num_inference_steps=5,
        guidance_scale=7.5,
        generator=gens(),
        output_type="np",
        callback_on_step_end=make("ours", 0.5),
    ).images
    assert np.abs(changed - ours).max() > 1e-2


def test_bad_diffusers_arguments(folder):
    _, gp = _pipes(folder["epsilon"])
    with pytest.raises(ValueError, match="sampler 'euler' takes no eta"):
        gp("a", steps=2, sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="steps=3 and num_inference_steps=4 disagree"):
        gp("a", steps=3, num_inference_steps=4)
    with pytest.raises(ValueError, match="guidance_rescale needs a guidance with a rescale option"):
        gp("a", steps=2, guidance="none", guidance_rescale=0.5)
    with pytest.raises(
        ValueError, match=r"latents have shape \(1, 4, 4, 4\), expected \(1, 4, 8, 8\)"
    ):
        gp("a", steps=2, latents=torch.zeros(1, 4, 4, 4))


def test_to_save_pretrained_and_memory_switches(folder, tmp_path):
    _, gp = _pipes(folder["epsilon"])
    base = gp(PROMPTS, steps=4, seed=1, output_type="np").images
    assert (
        gp.to(torch.float32) is gp
        and gp.to("cpu", torch.float32) is gp
        and gp.to(device="cpu") is gp
    )
    _, other = _pipes(folder["epsilon"])
    assert (
        other.to(torch.bfloat16).family.net.dtype == torch.bfloat16
        and other.net_denoiser.dtype == torch.bfloat16
    )
    gp.enable_vae_slicing()
    gp.enable_vae_tiling()
    assert np.abs(gp(PROMPTS, steps=4, seed=1, output_type="np").images - base).max() < 1e-5
    gp.disable_vae_tiling()
    assert callable(gp.enable_model_cpu_offload) and callable(gp.load_lora_weights)
    with pytest.raises(AttributeError):
        gp.not_a_thing
    gp.defaults = {"steps": 4}
    gp.save_pretrained(str(tmp_path / "copy"))
    from diffguide import GuidedPipeline

    again = GuidedPipeline.from_pretrained(str(tmp_path / "copy"), progress=False)
    assert again.default_steps == 4
    assert np.array_equal(again(PROMPTS, seed=1, output_type="np").images, base)
    assert json.load(open(tmp_path / "copy" / "diffguide.json")) == {"steps": 4}


# -- long prompts ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_folders(tmp_path_factory):
    """Tiny SD and SDXL whose tokenizers have SD's 77-token window (the tiny ones read 16)."""
    out = {}
    for name in ("sd", "sdxl"):
        pipe = tm.BUILDERS[name]()
        for attr in ("tokenizer", "tokenizer_2"):
            if getattr(pipe, attr, None) is not None:
                getattr(pipe, attr).model_max_length = 77
        path = tmp_path_factory.mktemp(name)
        pipe.save_pretrained(path)
        out[name] = str(path)
    return out


LONG = (
    "a red circle on a blue background next to a small green square, " * 2
).strip()  # 102 tokens


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_long_prompts_are_read_whole(long_folders, name):
    """The tiny tokenizer makes one token per letter: 102 tokens, two windows of 75."""
    from diffguide import GuidedPipeline

    gp = GuidedPipeline.from_pretrained(long_folders[name], progress=False)
    assert len(gp.pipe.tokenizer(LONG, add_special_tokens=False).input_ids) == 102
    kw = dict(steps=3, seed=0, output_type="np", height=16, width=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation notice: nothing is cut
        whole = gp(LONG, **kw)
    first = gp(LONG[:75], **kw)
    assert np.abs(whole.images - first.images).max() > 1e-3 and not whole.notices


def test_window_embeddings_join_per_window_encodings(long_folders):
    """A window is encoded as diffusers encodes a prompt of that length; windows are concatenated
    along the sequence, and the negative gets as many (empty ones)."""
    from diffguide import GuidedPipeline
    from diffguide.pipelines.families import clip_window_states

    gp = GuidedPipeline.from_pretrained(long_folders["sd"], progress=False)
    tok, enc = gp.pipe.tokenizer, gp.pipe.text_encoder
    short = "a red circle"
    mine, _ = clip_window_states(
        tok, enc, [tok(short, add_special_tokens=False).input_ids], "cpu", None, True
    )
    assert torch.allclose(mine, gp.pipe.encode_prompt(short, "cpu", 1, False)[0], atol=1e-6)
    pos, neg = gp.family.encode([LONG], [""], 1, "cpu")
    assert pos["text"].shape[1] == 2 * 77 and neg["text"].shape[1] == 2 * 77
    ids = tok(LONG, add_special_tokens=False).input_ids
    for j in range(2):
        w = ids[75 * j : 75 * (j + 1)]
        row = torch.tensor(
            [[tok.bos_token_id, *w, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(w))]
        )
        assert torch.allclose(pos["text"][:, 77 * j : 77 * (j + 1)], enc(row)[0], atol=1e-6)
    assert torch.allclose(neg["text"][:, :77], neg["text"][:, 77:])  # two empty windows


def test_models_that_cannot_window_say_so(tmp_path):
    import subprocess
    import sys

    from diffguide import GuidedPipeline
    from diffguide.pipelines.pipeline import PromptTruncated

    gp = GuidedPipeline.from_pretrained("builtin", progress=False)
    text = (
        "a red circle and a blue square on a white background with a green cross and a yellow "
        "triangle and a purple diamond on the left"
    )
    with pytest.warns(PromptTruncated, match="only the first 22 are read"):
        out = gp(text, steps=2, seed=0, output_type="np")
    assert out.notices and "22 tokens" in out.notices[0]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffguide",
            "generate",
            text,
            "--steps",
            "2",
            "--quiet",
            "-o",
            str(tmp_path / "a.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and res.stderr.count("diffguide: notice:") == 1, res.stderr


# -- --lora and --vae ------------------------------------------------------------------------------


def _lora(folder, out):
    """Random (non-zero) LoRA weights for the tiny UNet's attention, saved as diffusers saves
    them."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    torch.manual_seed(5)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    return out


def test_cli_lora_and_vae_match_diffusers(folder, tmp_path):
    from PIL import Image

    from diffguide.cli.main import main
    from diffguide.images import read_metadata

    path = folder["epsilon"]
    lora = _lora(path, str(tmp_path / "lora"))
    vae = str(tmp_path / "vae")
    tm.vae(seed=9).save_pretrained(vae)
    args = [
        "a red circle",
        "--model",
        path,
        "--steps",
        "4",
        "--seed",
        "3",
        "--scale",
        "7.5",
        "--quiet",
    ]
    assert main(["generate", *args, "-o", str(tmp_path / "plain.png")]) == 0
    assert (
        main(
            [
                "generate",
                *args,
                "--lora",
                f"{lora}:0.5",
                "--vae",
                vae,
                "-o",
                str(tmp_path / "both.png"),
            ]
        )
        == 0
    )
    ref, _ = _pipes(path)
    from diffusers import AutoencoderKL

    ref.vae = AutoencoderKL.from_pretrained(vae)
    ref.load_lora_weights(lora, adapter_name="x")
    ref.set_adapters(["x"], adapter_weights=[0.5])
    theirs = ref(
        "a red circle",
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=gens(1),
        output_type="np",
    ).images[0]
    ours = np.asarray(Image.open(tmp_path / "both.png")).astype(float) / 255
    plain = np.asarray(Image.open(tmp_path / "plain.png")).astype(float) / 255
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6 < np.abs(plain - ours).max()
    meta = read_metadata(str(tmp_path / "both.png"))
    assert meta["lora"] == [f"{lora}:0.5"] and meta["vae"] == vae
    assert (
        main(
            [
                "generate",
                "--from-png",
                str(tmp_path / "both.png"),
                "--quiet",
                "-o",
                str(tmp_path / "again.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "both.png").read_bytes()


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--lora", ":0.5"], ["--lora", "names no weights"]),
        (["--lora", "/nonexistent/lora"], ["cannot load LoRA", "/nonexistent/lora"]),
        (["--vae", "/nonexistent/vae"], ["cannot load VAE", "/nonexistent/vae"]),
    ],
)
def test_cli_lora_and_vae_errors(folder, tmp_path, capsys, argv, words):
    from diffguide.cli.main import main

    assert (
        main(
            [
                "generate",
                "a",
                "--model",
                folder["epsilon"],
                "--steps",
                "2",
                *argv,
                "-o",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err

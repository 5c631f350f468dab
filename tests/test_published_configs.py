"""The published configs of real models (tests/published_configs.py, each fact with its source)
applied to
tiny random models: diffguide's default call on the folder equals the family's diffusers pipeline.

Each case builds the family's tiny model, puts in the published scheduler (the folder's, or the one
the model card recommends), the VAE keys that change the latent maths and the network keys that
change its computation, saves the folder and loads it on both sides. The call is the card's (steps
capped at 8 to keep the test short); diffguide is called as a user would call it: no sampler (the
scheduler's own), the card's guidance as diffguide's guidance or the model's embedded guidance.
"""

import tempfile
import warnings

import numpy as np
import pytest
import torch

from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm
from diffguide.pipelines.pipeline import ConfigNotReproduced
from published_configs import PUBLISHED, scheduler_config

TOL = 1e-5
SEEDS = [3, 4]
TWO = ["a red circle", "a cross"]
VAE_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast")
# network keys that change the computation and fit a tiny model as they are
NET_KEYS = (
    "time_cond_proj_dim",
    "qk_norm",
    "guidance_embeds_scale",
    "timestep_scale",
    "use_additional_conditions",
    "interpolation_scale",
)


def _resolved(key: str, part: str) -> dict:
    """A published entry's part (vae, net), following same_as; the file's keys and the absent ones'
    defaults together."""
    spec = PUBLISHED[key][part]
    if "same_as" in spec:
        return _resolved(spec["same_as"], part)
    return {**(spec.get("absent") or {}), **spec.get("config", {})}


# key -> (tiny builder, its options, how the card's call maps: "cfg", "embedded" or "true_cfg")
MODELS = {
    "sd15": ("sd", {}, "cfg"),
    "sd21_v": ("sd", {"prediction_type": "v_prediction"}, "cfg"),
    "sdxl_base": ("sdxl", {}, "cfg"),
    "sdxl_turbo": ("sdxl", {}, "cfg"),
    "sdxl_lightning": ("sdxl", {}, "cfg"),
    "hyper_sd": ("sdxl", {}, "cfg"),
    "lcm": ("lcm", {}, "embedded"),
    "tcd": ("sdxl", {}, "cfg"),
    "sd35_medium": ("sd3", {}, "cfg"),
    "sd35_large": ("sd3", {}, "cfg"),
    "flux_dev": ("flux", {}, "embedded"),
    "flux_schnell": ("flux", {"guidance_embeds": False, "dynamic": False}, "embedded"),
    "sana_1600m": ("sana", {}, "cfg"),
    "sana_sprint": ("sana_sprint", {}, "embedded"),
    "qwen_image": ("qwenimage", {}, "true_cfg"),
    "pixart_alpha": ("pixart", {}, "cfg"),
    "pixart_sigma": ("pixart", {"sigma": True}, "cfg"),
    "dit_xl_2": ("dit", {}, "cfg"),
    "wan21_t2v_1_3b": ("wan", {}, "cfg"),
    "wan21_t2v_14b": ("wan", {}, "cfg"),
    "wan22_t2v_a14b": ("wan", {"boundary_ratio": 0.875}, "cfg"),
    "cogvideox_2b": ("cogvideox", {"rotary": False}, "cfg"),
    "cogvideox_5b": ("cogvideox", {}, "cfg"),
}
VIDEO = ("wan", "cogvideox")  # builders whose pipelines return clips (.frames [B, F, H, W, 3])
# (key, scheduler) pairs left out, with the reason
SKIPPED = {
    (
        "hyper_sd",
        "sdxl_1step_unet_lcm",
    ): "the card passes timesteps=[800]: a call option diffguide has not"
}
ALTERNATIVE_BUILDS = {
    ("hyper_sd", "sd15_nstep_lora_ddim"): ("sd", {}),
    ("hyper_sd", "sd15_unified_lora_tcd"): ("sd", {}),
    ("lcm", "lcm_sdxl"): ("sdxl", {}),
    ("lcm", "lcm_lora_sdxl"): ("sdxl", {}),
}


def _net(key: str, which: str) -> dict:
    net = _resolved(key, "net")
    out = {k: net[k] for k in NET_KEYS if net.get(k) is not None}
    if net.get("dual_attention_layers"):
        out["dual_attention_layers"] = (
            0,
        )  # the first of the tiny model's two blocks, as SD 3.5 Medium's first half
    if key.startswith(
        "pixart"
    ):  # PixArt-alpha's pipeline passes resolution conditions only at sample_size 128
        out["sample_size"] = net["sample_size"]
    if (key, which) == ("lcm", "lcm_lora_sdxl"):
        out.pop("time_cond_proj_dim", None)  # a LoRA on SDXL base's UNet
    return out


def build(key: str, which: str):
    """The tiny pipeline of ``key`` carrying the published scheduler ``which`` and VAE / network
    keys."""
    import diffusers

    builder, options, _ = MODELS[key]
    builder, options = ALTERNATIVE_BUILDS.get((key, which), (builder, options))
    net = _net(key, which)
    if (
        builder == "lcm"
    ):  # LCM_Dreamshaper: SD 1.5's layout with a guidance embedding, its own pipeline
        sd = tm.sd(net=net)
        pipe = diffusers.LatentConsistencyModelPipeline(
            vae=sd.vae,
            text_encoder=sd.text_encoder,
            tokenizer=sd.tokenizer,
            unet=sd.unet,
            scheduler=sd.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif builder == "flux":
        pipe = tm.flux(**options)
    elif builder in ("dit", "qwenimage"):
        pipe = tm.BUILDERS[builder](**options)
    elif builder == "sd" and "time_cond_proj_dim" in net:
        pipe = tm.sd(net=net, **options)
    else:
        pipe = tm.BUILDERS[builder](**options, **({"net": net} if net else {}))
    cls, config = scheduler_config(key, which)
    pipe.scheduler = getattr(diffusers, cls).from_config(config)
    vae = _resolved(key, "vae")
    keys = {k: vae[k] for k in VAE_KEYS if k in vae}
    channels = getattr(pipe.vae.config, "z_dim", None) or getattr(
        pipe.vae.config, "latent_channels", None
    )
    for k in ("latents_mean", "latents_std"):  # per-channel: the tiny VAE's first channels
        if keys.get(k) is not None:
            keys[k] = list(keys[k])[:channels]
    pipe.vae.register_to_config(**keys)
    return pipe


MODES = {
    ("lcm", "lcm_sdxl"): "embedded",
    ("lcm", "lcm_lora_sdxl"): "cfg",
    ("hyper_sd", "sd15_nstep_lora_ddim"): "cfg",
    ("hyper_sd", "sd15_unified_lora_tcd"): "cfg",
}


def calls(key: str, which: str) -> tuple[dict, dict]:
    """(diffusers' call, diffguide's call) for the card's settings."""
    entry = PUBLISHED[key]
    sched = entry["scheduler"]
    spec = (
        sched["folder"]
        if which == "folder"
        else sched["recommended"]
        if which == "recommended"
        else sched["alternatives"][which]
    )
    card = {**entry["pipeline"]["call"], **(spec.get("call") or {})}
    steps = card.get("num_inference_steps", 25)
    steps = steps if steps <= 8 else 6
    builder = ALTERNATIVE_BUILDS.get((key, which), MODELS[key][:2])[0]
    mode = MODES.get((key, which), MODELS[key][2])
    theirs, ours = {"num_inference_steps": steps}, {"steps": steps}
    if builder == "dit":
        theirs["class_labels"], ours["prompt"] = [1, 2], [1, 2]
    else:
        theirs["prompt"] = ours["prompt"] = TWO
    if builder not in ("sd", "lcm", "dit"):
        size = 32 if builder.startswith("sana") else 16
        theirs.update(height=size, width=size)
        ours.update(height=size, width=size)
    if builder in VIDEO:  # a short clip at the tiny size (4 k + 1 frames)
        theirs["num_frames"] = ours["num_frames"] = 9
    if builder.startswith(("sana", "pixart")):
        theirs["use_resolution_binning"] = False
    scale = card.get("guidance_scale")
    if scale is not None:
        theirs["guidance_scale"] = scale
    net = _net(key, which)
    if mode == "cfg" and scale is not None:
        ours.update({"guidance": "none"} if scale <= 1 else {"guidance_scale": scale})
        if card.get("use_dynamic_cfg"):  # CogVideoX's dynamic CFG is diffguide's weight schedule
            theirs["use_dynamic_cfg"] = True
            del ours["guidance_scale"]
            ours["guidance"] = f"cfg:scale={scale},weight_schedule=cogvideox"
        if "guidance_scale_2" in card:  # Wan 2.2's second expert's scale
            theirs["guidance_scale_2"] = ours["guidance_scale_2"] = card["guidance_scale_2"]
        if card.get("negative_prompt") is not None:
            theirs["negative_prompt"] = ours["negative_prompt"] = card["negative_prompt"]
    elif (
        mode == "embedded"
        and scale is not None
        and (net.get("time_cond_proj_dim") or _resolved(key, "net").get("guidance_embeds"))
    ):
        ours["embedded_guidance"] = scale  # the model's own guidance input; no diffguide guidance
    elif mode == "true_cfg":  # Qwen-Image: true CFG with a negative prompt, else none
        theirs["true_cfg_scale"] = card.get("true_cfg_scale", 4.0)
        if theirs["true_cfg_scale"] > 1:
            theirs["negative_prompt"] = ours["negative_prompt"] = card.get("negative_prompt", " ")
    if "eta" in card:
        theirs["eta"] = ours["eta"] = card["eta"]
    return theirs, ours


CASES = [
    (key, which)
    for key, e in PUBLISHED.items()
    for which in (
        ["folder"] if "same_as" not in e["scheduler"]["folder"] else []
    )  # else its base's case
    + (["recommended"] if e["scheduler"].get("recommended") else [])
    + list(e["scheduler"].get("alternatives") or {})
    if (key, which) not in SKIPPED
]
# diffusers' Euler lands a one-step x0 model on x + (x0 - x) in float32 at sigma 14.6, its own
# rounding 3.4e-5 in pixels: compared with diffusers run in float64 from the same initial latents
# instead
FLOAT64_REFERENCE = {("sdxl_lightning", "1step_x0")}


def test_every_supported_family_has_a_published_config():
    families = {MODELS[k][0] for k in PUBLISHED}
    assert {
        "sd",
        "sdxl",
        "sd3",
        "flux",
        "sana",
        "sana_sprint",
        "qwenimage",
        "pixart",
        "dit",
        "lcm",
        "wan",
        "cogvideox",
    } <= families
    for key, entry in PUBLISHED.items():
        assert entry.get("source"), f"{key}: no source"


@pytest.mark.parametrize("key,which", CASES)
def test_published_config_gives_the_pipelines_images(key, which):
    from diffusers import DiffusionPipeline

    folder = tempfile.mkdtemp()
    build(key, which).save_pretrained(folder)
    theirs, ours = calls(key, which)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigNotReproduced)  # every published key is reproduced
        gp = GuidedPipeline.from_pretrained(folder, progress=False)
    wide = (key, which) in FLOAT64_REFERENCE
    ref_pipe = DiffusionPipeline.from_pretrained(
        folder, **({"torch_dtype": torch.float64} if wide else {})
    )
    ref_pipe.set_progress_bar_config(disable=True)
    if wide:  # the same initial latents on both sides (a float64 draw would be other numbers)
        f, size = gp.family, theirs.get("height", gp.family.default_size)
        z = torch.cat(
            [
                torch.randn(
                    (1, f.channels, size // f.factor, size // f.factor),
                    generator=torch.Generator().manual_seed(s),
                )
                for s in SEEDS
            ]
        )
        ref = ref_pipe(latents=z.double(), output_type="np", **theirs).images
        out = gp(latents=z, seed=SEEDS, output_type="np", **ours)
    else:
        result = ref_pipe(
            generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="np", **theirs
        )
        # a video pipeline's clips are .frames, [B, F, H, W, 3] as diffguide's "np" clips
        ref = result.frames if MODELS[key][0] in VIDEO else result.images
        out = gp(seed=SEEDS, output_type="np", **ours)
    diff = float(np.abs(out.images - ref).max())
    between = float(np.abs(ref[0] - ref[1]).max())
    print(
        f"published {key}/{which}: {type(ref_pipe.scheduler).__name__} max diff {diff:.2e} (images "
        f"differ by {between:.2f})"
    )
    assert between > 50 * TOL, f"images hardly depend on the noise ({between})"
    assert diff < TOL, f"{key}/{which}: {diff:.2e} from {type(ref_pipe).__name__}"
    if MODELS[key][0] in VIDEO:
        # a tiny video VAE flattens differences (Wan's flow_shift 3 against 5 moves the tiny clip's
        # pixels by 3e-5 but its latents by 8e-3): the latents too, [B, C, F, h, w] on both sides
        ref_z = ref_pipe(
            generator=[torch.Generator().manual_seed(s) for s in SEEDS],
            output_type="latent",
            **theirs,
        ).frames
        if MODELS[key][0] == "cogvideox":  # CogVideoXPipeline's latents are frames-first
            ref_z = ref_z.permute(0, 2, 1, 3, 4)
        z = gp(seed=SEEDS, output_type="latent", **ours).images
        diff_z = float((z - ref_z).abs().max())
        print(f"published {key}/{which}: latents max diff {diff_z:.2e}")
        assert diff_z < TOL, f"{key}/{which}: latents {diff_z:.2e} from {type(ref_pipe).__name__}"

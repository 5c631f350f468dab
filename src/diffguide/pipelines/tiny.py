"""Tiny random-weight diffusers pipelines built in code, with no download: SD (eps / v), SDXL, DiT,
PixArt, SD3, Flux.1 (dev-like), Qwen-Image, Sana, SANA-Sprint, a pixel-space text-to-image UNet and
an unconditional DDPM UNet.

They exist to test and benchmark pipelines offline (``diffguide tiny-model FOLDER``): each builder
returns a diffusers pipeline; ``save_pretrained`` writes a standard folder that
``GuidedPipeline.from_pretrained`` and diffusers both load. Outputs are meaningless images.
"""

from __future__ import annotations

import inspect

import torch

SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
)
DDIM_SD = dict(clip_sample=False, set_alpha_to_one=False)  # SD 1.5's DDIM settings


def scheduler(name: str, **kw):
    """A diffusers scheduler with SD's betas (and SD's DDIM settings for DDIM)."""
    import diffusers

    cls = getattr(diffusers, name)
    extra = DDIM_SD if name == "DDIMScheduler" else {}
    takes = inspect.signature(cls.__init__).parameters  # not every scheduler has steps_offset
    return cls(**{**{k: v for k, v in {**SD_SCHEDULER, **extra}.items() if k in takes}, **kw})


def clip_tokenizer(max_length: int = 16):
    """A byte-level CLIP tokenizer with no merges (every word is split into characters)."""
    from transformers import CLIPTokenizer

    keep = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(range(174, 256))
    codes = list(keep) + [256 + i for i in range(256 - len(keep))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in codes:
        vocab[chr(c)] = len(vocab)
    for c in codes:
        vocab[chr(c) + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 120):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(chr(c), -1.0) for c in range(ord("a"), ord("z") + 1)] + [("\u2581", -1.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def clip_text(seed: int, hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection or hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5_text(seed: int, d_model: int = 32, umt5: bool = False):
    """A tiny T5 encoder (``umt5``: UMT5's, as Wan's)."""
    import transformers

    kind = "UMT5" if umt5 else "T5"
    torch.manual_seed(seed)
    return getattr(transformers, f"{kind}EncoderModel")(
        getattr(transformers, f"{kind}Config")(
            vocab_size=64,
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    ).eval()


def wan(
    scheduler: str = "unipc",
    net=None,
    boundary_ratio: float | None = None,
    expand_timesteps: bool = False,
):
    """Tiny Wan 2.1 text-to-video at diffusers' fast-test sizes, with the published 1.3B model's
    scheduler (UniPC on flow sigmas, flow_shift 3) or ``scheduler="euler"``
    (FlowMatchEulerDiscreteScheduler, shift 7, as diffusers' fast test); with ``boundary_ratio``
    Wan 2.2's two experts (A14B: 0.875 for text to video), the second of other weights; with
    ``expand_timesteps`` TI2V-5B's per-token timesteps."""
    import diffusers

    torch.manual_seed(20)
    vae_ = diffusers.AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    torch.manual_seed(21)
    tr = diffusers.WanTransformer3DModel(
        **{
            **dict(
                patch_size=(1, 2, 2),
                num_attention_heads=2,
                attention_head_dim=12,
                in_channels=16,
                out_channels=16,
                text_dim=32,
                freq_dim=256,
                ffn_dim=32,
                num_layers=2,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                rope_max_seq_len=32,
            ),
            **(net or {}),
        }
    ).eval()
    _calm(tr, "proj_out")
    second = None
    if boundary_ratio is not None:
        torch.manual_seed(23)
        second = type(tr)(**tr.config).eval()
        _calm(second, "proj_out")
    sch = (
        diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
        if scheduler == "unipc"
        else diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    )
    return diffusers.WanPipeline(
        tokenizer=t5_tokenizer(512),
        text_encoder=t5_text(22, umt5=True),
        vae=vae_,
        scheduler=sch,
        transformer=tr,
        transformer_2=second,
        boundary_ratio=boundary_ratio,
        expand_timesteps=expand_timesteps,
    )


def wan_i2v(scheduler: str = "unipc", ti2v: bool = False, net=None):
    """Tiny Wan 2.1 image to video at diffusers' fast-test sizes (a CLIP vision encoder of hidden
    size 4 read at 32 x 32, the network's image input 4 wide, 36 input channels); ``ti2v``: Wan
    2.2 TI2V-5B's layout instead (no image encoder, the first frame's latents in place,
    per-token times)."""
    import diffusers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    t2v = wan(scheduler, net=None if ti2v else {"in_channels": 36, "image_dim": 4, **(net or {})})
    parts = {k: getattr(t2v, k) for k in ("tokenizer", "text_encoder", "vae", "scheduler")}
    if ti2v:
        return diffusers.WanImageToVideoPipeline(
            **parts, transformer=t2v.transformer, expand_timesteps=True
        )
    torch.manual_seed(24)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=4,
            projection_dim=4,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=16,
            patch_size=1,
        )
    ).eval()
    return diffusers.WanImageToVideoPipeline(
        **parts,
        transformer=t2v.transformer,
        image_encoder=encoder,
        image_processor=CLIPImageProcessor(crop_size=32, size=32),
    )


def cogvideox(rotary: bool = True, net=None):
    """Tiny CogVideoX at diffusers' fast-test sizes with 5b's settings: the 3-D rotary table, SNR
    shift 1 and VAE scale 0.7 (``rotary=False``: 2b's sine-cosine positions, SNR shift 3, scale
    1.15258426). The scheduler's keys and values are those diffusers' conversion script
    (convert_cogvideox_to_diffusers.py) writes into the published folders."""
    import diffusers

    torch.manual_seed(30)
    tr = diffusers.CogVideoXTransformer3DModel(
        **{
            **dict(
                num_attention_heads=2,
                attention_head_dim=16,  # the 3-D rotary table splits it 4 / 6 / 6
                in_channels=4,
                out_channels=4,
                time_embed_dim=2,
                text_embed_dim=32,
                num_layers=2,
                sample_width=2,
                sample_height=2,
                sample_frames=9,
                patch_size=2,
                temporal_compression_ratio=4,
                max_text_seq_length=226,
                use_rotary_positional_embeddings=rotary,
            ),
            **(net or {}),
        }
    ).eval()
    _calm(tr, "proj_out")
    torch.manual_seed(31)
    vae_ = diffusers.AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        scaling_factor=0.7 if rotary else 1.15258426,
    ).eval()
    sch = diffusers.CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=1.0 if rotary else 3.0,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    pipe = diffusers.CogVideoXPipeline(
        tokenizer=t5_tokenizer(226),
        text_encoder=t5_text(32),
        vae=vae_,
        transformer=tr,
        scheduler=sch,
    )
    return pipe


def vae(seed: int = 0, latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        sample_size=16,
        **kw,
    ).eval()


def _calm(module, attr: str):
    """Shrink a random output layer so the predicted noise is small and latents stay near unit scale
    (a raw random network makes samples blow up and the decoded images saturate)."""
    layer = getattr(module, attr)
    with torch.no_grad():
        layer.weight.mul_(0.05)
        if layer.bias is not None:
            layer.bias.mul_(0.05)


def unet(seed=0, in_channels=4, cross=32, **kw):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    net = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross,
        norm_num_groups=8,
        attention_head_dim=4,
        **kw,
    ).eval()
    _calm(net, "conv_out")
    return net


def sd(
    prediction_type="epsilon",
    scheduler="DPMSolverMultistepScheduler",
    safety=None,
    net=None,
    **sched_kw,
):
    """Tiny SD 1.x layout; safety="flag_all" / "flag_none" adds a safety checker with fixed
    verdicts;
    ``net``: UNet config keys a real model sets (time_cond_proj_dim for an LCM student)."""
    import diffusers

    sch = globals()["scheduler"](scheduler, prediction_type=prediction_type, **sched_kw)
    checker, features = safety_checker(safety == "flag_all") if safety else (None, None)
    return diffusers.StableDiffusionPipeline(
        vae=vae(),
        text_encoder=clip_text(1),
        tokenizer=clip_tokenizer(),
        unet=unet(2, **(net or {})),
        scheduler=sch,
        safety_checker=checker,
        feature_extractor=features,
        requires_safety_checker=False,
    )


def safety_checker(flag_all: bool, seed: int = 15):
    """A tiny random StableDiffusionSafetyChecker whose thresholds flag every image or none."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=100,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(cfg).eval()
    with torch.no_grad():  # cosine distances lie in [-1, 1]
        checker.concept_embeds_weights.fill_(-2.0 if flag_all else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    return checker, CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )


def pixel_sd(scheduler="DPMSolverMultistepScheduler"):
    """Text-to-image directly in pixels (no VAE), the layout of diffguide's built-in model."""
    import diffusers

    sch = globals()["scheduler"](scheduler)
    return diffusers.StableDiffusionPipeline(
        vae=None,
        text_encoder=clip_text(1),
        tokenizer=clip_tokenizer(),
        unet=unet(3, in_channels=3),
        scheduler=sch,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl(scheduler="EulerDiscreteScheduler", net=None):
    import diffusers

    sch = globals()["scheduler"](scheduler)
    net = unet(
        4,
        cross=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        use_linear_projection=True,
        **(net or {}),
    )
    return diffusers.StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=clip_text(5),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(6, projection=32),
        tokenizer_2=clip_tokenizer(),
        unet=net,
        scheduler=sch,
        force_zeros_for_empty_prompt=True,
    )


def dit(scheduler="DDIMScheduler"):
    import diffusers

    torch.manual_seed(7)
    tr = diffusers.DiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    ).eval()
    _calm(tr, "proj_out_2")
    sch = getattr(diffusers, scheduler)(num_train_timesteps=1000, beta_schedule="linear")
    return diffusers.DiTPipeline(
        transformer=tr, vae=vae(), scheduler=sch, id2label={0: "circle", 1: "square", 2: "triangle"}
    )


def pixart(scheduler="DPMSolverMultistepScheduler", net=None, sigma=False):
    """Tiny PixArt-alpha (``sigma``: PixArt-Sigma's pipeline); ``net``: transformer config keys a
    real model sets (use_additional_conditions, interpolation_scale)."""
    import diffusers

    torch.manual_seed(8)
    tr = diffusers.PixArtTransformer2DModel(
        **{
            "sample_size": 8,
            "num_layers": 2,
            "patch_size": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 3,
            "caption_channels": 32,
            "in_channels": 4,
            "cross_attention_dim": 24,
            "out_channels": 8,
            "attention_bias": True,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            **(net or {}),
        }
    ).eval()
    _calm(tr, "proj_out")
    te = t5_text(9)
    sch = getattr(diffusers, scheduler)(num_train_timesteps=1000, beta_schedule="linear")
    cls = diffusers.PixArtSigmaPipeline if sigma else diffusers.PixArtAlphaPipeline
    return cls(tokenizer=t5_tokenizer(), text_encoder=te, vae=vae(), transformer=tr, scheduler=sch)


def sd3(shift=3.0, net=None):
    """Tiny SD3; ``net``: transformer config keys a real model sets (SD 3.5's qk_norm,
    dual_attention_layers)."""
    import diffusers

    torch.manual_seed(10)
    tr = diffusers.SD3Transformer2DModel(
        **{
            **dict(
                sample_size=8,
                patch_size=1,
                in_channels=4,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                caption_projection_dim=32,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                out_channels=4,
            ),
            **(net or {}),
        }
    ).eval()
    _calm(tr, "proj_out")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    return diffusers.StableDiffusion3Pipeline(
        transformer=tr,
        scheduler=sch,
        vae=vae(shift_factor=0.06, scaling_factor=1.5),
        text_encoder=clip_text(11, hidden=16, projection=16),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(12, hidden=16, projection=16),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_text(13),
        tokenizer_3=t5_tokenizer(77),
    )


def flux(guidance_embeds: bool = True, dynamic: bool = True, net=None):
    """Tiny Flux.1: dev-like (guidance embedded, resolution-dependent shift) by default;
    schnell-like with guidance_embeds=False, dynamic=False; ``net``: other transformer keys."""
    import diffusers

    torch.manual_seed(16)
    tr = diffusers.FluxTransformer2DModel(
        **{
            **dict(
                patch_size=1,
                in_channels=16,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                guidance_embeds=guidance_embeds,
                axes_dims_rope=(4, 6, 6),
            ),
            **(net or {}),
        }
    ).eval()
    _calm(tr, "proj_out")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(
        **(
            dict(
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=16,
                max_image_seq_len=64,
            )
            if dynamic
            else dict(shift=1.0)
        )
    )
    pipe = diffusers.FluxPipeline(
        scheduler=sch,
        vae=vae(17, shift_factor=0.06, scaling_factor=1.5),
        text_encoder=clip_text(18),
        tokenizer=clip_tokenizer(77),
        text_encoder_2=t5_text(19),
        tokenizer_2=t5_tokenizer(77),
        transformer=tr,
    )
    pipe.default_sample_size = 8  # 16 px images by default (the VAE halves them), not 1024
    return pipe


def qwen_tokenizer():
    """A byte-level BPE tokenizer with no merges (one token per byte) and Qwen's chat markers."""
    from transformers import Qwen2Tokenizer

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(range(174, 256))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    vocab = {chr(c): i for i, c in enumerate(cs)}
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=1100)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def qwenimage():
    """Tiny Qwen-Image: a two-layer Qwen2.5-VL text encoder, a one-block transformer, a 3-D VAE."""
    import diffusers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = qwen_tokenizer()
    torch.manual_seed(20)
    text = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                vocab_size=len(tok),
                max_position_embeddings=2048,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            ),
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=32,
                patch_size=2,
                spatial_merge_size=1,
                temporal_patch_size=1,
            ),
            vocab_size=len(tok),
            hidden_size=32,
        )
    ).eval()
    tr = diffusers.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    _calm(tr, "proj_out")
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    ).eval()
    sch = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=16,
        max_image_seq_len=64,
    )
    pipe = diffusers.QwenImagePipeline(
        scheduler=sch, vae=vae, text_encoder=text, tokenizer=tok, transformer=tr
    )
    return pipe


def gemma_tokenizer():
    """A character-level Gemma tokenizer (no merges) covering plain English text."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.:;-'\"?!()/\n\u2581":
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=512)


def sana(sprint: bool = False, net=None):
    """Tiny Sana (DPM-Solver on a flow, Gemma-2 text, a deep-compression autoencoder); sprint=True
    is SANA-Sprint (the same transformer with an embedded guidance input, SCMScheduler's TrigFlow);
    ``net``: transformer config keys a real model sets (guidance_embeds_scale, timestep_scale)."""
    import diffusers
    from transformers import Gemma2Config, Gemma2Model

    tok = gemma_tokenizer()
    torch.manual_seed(21)
    text = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
        )
    ).eval()
    tr = diffusers.SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=32,
        sample_size=8,
        patch_size=1,
        **{
            "guidance_embeds": sprint,
            "qk_norm": "rms_norm_across_heads" if sprint else None,
            **(net or {}),
        },
    ).eval()
    _calm(tr, "proj_out")
    ae = diffusers.AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=4,
        encoder_block_types=("ResBlock", "ResBlock"),
        decoder_block_types=("ResBlock", "ResBlock"),
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
        scaling_factor=0.41,
    ).eval()
    if sprint:
        return diffusers.SanaSprintPipeline(
            tokenizer=tok,
            text_encoder=text,
            vae=ae,
            transformer=tr,
            scheduler=diffusers.SCMScheduler(),
        )
    sch = diffusers.DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return diffusers.SanaPipeline(
        tokenizer=tok, text_encoder=text, vae=ae, transformer=tr, scheduler=sch
    )


def sana_sprint(net=None):
    return sana(sprint=True, net=net)


def ddpm():
    """An unconditional pixel-space UNet2DModel with DDPM's scheduler (clip_sample on)."""
    import diffusers

    torch.manual_seed(14)
    net = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    _calm(net, "conv_out")
    return diffusers.DDPMPipeline(
        unet=net, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000)
    )


BUILDERS = {
    "sd": sd,
    "pixel_sd": pixel_sd,
    "sdxl": sdxl,
    "dit": dit,
    "pixart": pixart,
    "sd3": sd3,
    "ddpm": ddpm,
    "flux": flux,
    "qwenimage": qwenimage,
    "sana": sana,
    "sana_sprint": sana_sprint,
    "wan": wan,
    "cogvideox": cogvideox,
    "wan_i2v": wan_i2v,
}


def save(folder: str, family: str = "sd", **options) -> str:
    """Build a tiny random model of ``family`` and save it as a diffusers folder."""
    if family not in BUILDERS:
        raise ValueError(
            f"unknown tiny model family {family!r}; choose one of: {', '.join(BUILDERS)}"
        )
    BUILDERS[family](**options).save_pretrained(folder)
    return folder

"""Published configurations of the real models diffguide supports, as test data.

Each entry of ``PUBLISHED`` records, for one Hugging Face diffusers folder, the
values its files carry and the model card's usage, so that tests can build tiny
random models whose configs carry exactly the keys the real ones do:

* ``scheduler["folder"]``: the class and the full ``scheduler/scheduler_config.json``
  (``_class_name`` / ``_diffusers_version`` dropped, every other key kept, nulls as
  ``None``).  A model distributed as a UNet or LoRA for another model's folder says
  ``{"same_as": <key>}`` here and in ``vae`` / ``net``.
* ``scheduler["recommended"]`` (and named ``scheduler["alternatives"]``): what the
  model card does instead, written as the card writes it,
  ``Class.from_config(<base folder config>, **overrides)``; ``call`` holds the call
  arguments the card passes with it.
* ``vae``: the class and the keys that change the latent maths (``scaling_factor``,
  ``shift_factor``, ``latents_mean``, ``latents_std``, ``force_upcast``) as the file
  carries them; ``absent`` lists keys the file lacks, with the class default
  diffusers then uses.
* ``net``: the denoiser class and only its maths-relevant keys (channels, sample and
  patch size, timestep / guidance embedding keys, ...), with ``absent`` likewise.
* ``pipeline``: the pipeline class and the call defaults that matter, from the model
  card or the pipeline signature (diffusers 0.42.1, the version installed here).
* ``source``: where each fact was read.  Hugging Face repositories themselves could
  not be read from this environment; the values come from verbatim copies of the
  hub files committed in public GitHub repositories (named with their commit),
  from diffusers' own conversion scripts, docs and signatures, or from the model
  developers' GitHub repositories.
* ``unconfirmed``: every value above that no copy of the published file confirmed,
  with what was found instead.  ``derived`` values (a conversion script's arguments
  on top of the class defaults of the diffusers version that wrote the folder) are
  listed there too.

``scheduler_config(key, which)`` returns ``(class_name, config_dict)`` for the
folder's scheduler or a card-recommended one.
"""

# Conventions for sources below:
#   forge@<sha>:  github.com/lllyasviel/stable-diffusion-webui-forge, path
#                 backend/huggingface/<hub repo>/..., verbatim copies of the hub files.
#   diffusers@58eb52c0:  github.com/huggingface/diffusers at
#                 58eb52c0803ea9af3abec60841c2a093bdf1f951 (scripts/, docs/, src/).
#   diffusers 0.42.1: the package installed in this repository's .venv.

LOG_3 = 1.0986122886681098  # math.log(3), written out so this module needs no import
# the per-channel latent statistics of Wan 2.1's VAE, which Qwen-Image's VAE publishes too
WAN_VAE_LATENTS = {
    "latents_mean": [
        -0.7571,
        -0.7089,
        -0.9113,
        0.1075,
        -0.1745,
        0.9653,
        -0.1517,
        1.5508,
        0.4134,
        -0.0715,
        0.5517,
        -0.3632,
        -0.1922,
        -0.9497,
        0.2503,
        -0.2921,
    ],
    "latents_std": [
        2.8184,
        1.4541,
        2.3275,
        2.6558,
        1.2196,
        1.7708,
        2.6052,
        2.0743,
        3.2687,
        2.1526,
        2.8652,
        1.5579,
        1.6382,
        1.1253,
        2.8251,
        1.916,
    ],
}


PUBLISHED = {
    # ------------------------------------------------------------------------------ SD 1.5.
    # Sources: forge@c8156fcf (backend/huggingface/runwayml/stable-diffusion-v1-5/
    # {model_index.json, scheduler/scheduler_config.json, vae/config.json, unet/config.json}); the
    # same scheduler file is in vladmandic/automatic@431bcc36
    # configs/sd15/scheduler/scheduler_config.json.  The hub repo now lives at
    # stable-diffusion-v1-5/stable-diffusion-v1-5 (a copy of runwayml's).
    # ------------------------------------------------------------------------------
    "sd15": {
        "repo": "runwayml/stable-diffusion-v1-5",
        "scheduler": {
            "folder": {
                "class": "PNDMScheduler",
                "config": {
                    "beta_end": 0.012,
                    "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085,
                    "num_train_timesteps": 1000,
                    "set_alpha_to_one": False,
                    "skip_prk_steps": True,
                    "steps_offset": 1,
                    "trained_betas": None,
                    "clip_sample": False,
                },
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderKL",
            "config": {},
            "absent": {
                "scaling_factor": 0.18215,
                "shift_factor": None,
                "latents_mean": None,
                "latents_std": None,
                "force_upcast": True,
            },
        },
        "net": {
            "class": "UNet2DConditionModel",
            "config": {
                "in_channels": 4,
                "out_channels": 4,
                "sample_size": 64,
                "flip_sin_to_cos": True,
                "freq_shift": 0,
            },
            "absent": {"time_cond_proj_dim": None, "addition_embed_type": None},
        },
        "pipeline": {
            "class": "StableDiffusionPipeline",
            "call": {"num_inference_steps": 50, "guidance_scale": 7.5},
        },
        "source": {
            "scheduler": "forge@c8156fcf backend/huggingface/runwayml/stable-diffusion-v1-5/scheduler/scheduler_config.json",
            "vae": "forge@c8156fcf .../runwayml/stable-diffusion-v1-5/vae/config.json (no scaling_factor/force_upcast keys)",
            "net": "forge@c8156fcf .../runwayml/stable-diffusion-v1-5/unet/config.json",
            "pipeline": "model_index.json (forge@c8156fcf); call defaults = StableDiffusionPipeline.__call__ "
            "(diffusers 0.42.1); the card calls pipe(prompt) with no overrides",
        },
        "unconfirmed": [],
    },
    # ------------------------------------------------------------------------------ SD 2.1 (768,
    # v-prediction). Sources: forge@c8156fcf backend/huggingface/
    # stabilityai/stable-diffusion-2-1/{model_index.json, scheduler/..., vae/..., unet/...}. Card:
    # swaps in DPMSolverMultistepScheduler.from_config(pipe.scheduler.config); the card text was
    # seen only through copies (e.g. GowthamSaminathan/ann_1 test/img_gen.py, comment "Use the
    # DPMSolverMultistepScheduler (DPM-Solver++) scheduler here instead").
    # ------------------------------------------------------------------------------
    "sd21_v": {
        "repo": "stabilityai/stable-diffusion-2-1",
        "scheduler": {
            "folder": {
                "class": "DDIMScheduler",
                "config": {
                    "beta_end": 0.012,
                    "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085,
                    "clip_sample": False,
                    "num_train_timesteps": 1000,
                    "prediction_type": "v_prediction",
                    "set_alpha_to_one": False,
                    "skip_prk_steps": True,
                    "steps_offset": 1,
                    "trained_betas": None,
                },
            },
            "recommended": {
                "class": "DPMSolverMultistepScheduler",
                "base": "sd21_v",
                "overrides": {},
                "call": {},
                "source": "stabilityai/stable-diffusion-2-1 model card (seen via third-party copies)",
            },
        },
        "vae": {
            "class": "AutoencoderKL",
            "config": {},
            "absent": {
                "scaling_factor": 0.18215,
                "shift_factor": None,
                "latents_mean": None,
                "latents_std": None,
                "force_upcast": True,
            },
        },
        "net": {
            "class": "UNet2DConditionModel",
            "config": {
                "in_channels": 4,
                "out_channels": 4,
                "sample_size": 96,
                "flip_sin_to_cos": True,
                "freq_shift": 0,
            },
            "absent": {"time_cond_proj_dim": None, "addition_embed_type": None},
        },
        "pipeline": {
            "class": "StableDiffusionPipeline",
            "call": {"num_inference_steps": 50, "guidance_scale": 7.5},
        },
        "source": {
            "scheduler": "forge@c8156fcf backend/huggingface/stabilityai/stable-diffusion-2-1/scheduler/scheduler_config.json",
            "vae": "forge@c8156fcf .../stable-diffusion-2-1/vae/config.json (no scaling_factor/force_upcast keys)",
            "net": "forge@c8156fcf .../stable-diffusion-2-1/unet/config.json",
            "pipeline": "model_index.json (forge@c8156fcf); call defaults = StableDiffusionPipeline.__call__ (diffusers 0.42.1)",
        },
        "unconfirmed": [
            "scheduler.recommended: card read only through third-party copies of its snippet"
        ],
    },
    # ------------------------------------------------------------------------------ SDXL base 1.0.
    # Sources: forge@c8156fcf backend/huggingface/stabilityai/
    # stable-diffusion-xl-base-1.0/{model_index.json, scheduler/..., vae/..., unet/...}; same
    # scheduler file in vladmandic/automatic@431bcc36 configs/sdxl/.
    # ------------------------------------------------------------------------------
    "sdxl_base": {
        "repo": "stabilityai/stable-diffusion-xl-base-1.0",
        "scheduler": {
            "folder": {
                "class": "EulerDiscreteScheduler",
                "config": {
                    "beta_end": 0.012,
                    "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085,
                    "clip_sample": False,
                    "interpolation_type": "linear",
                    "num_train_timesteps": 1000,
                    "prediction_type": "epsilon",
                    "sample_max_value": 1.0,
                    "set_alpha_to_one": False,
                    "skip_prk_steps": True,
                    "steps_offset": 1,
                    "timestep_spacing": "leading",
                    "trained_betas": None,
                    "use_karras_sigmas": False,
                },
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderKL",
            "config": {"scaling_factor": 0.13025, "force_upcast": True},
            "absent": {"shift_factor": None, "latents_mean": None, "latents_std": None},
        },
        "net": {
            "class": "UNet2DConditionModel",
            "config": {
                "in_channels": 4,
                "out_channels": 4,
                "sample_size": 128,
                "flip_sin_to_cos": True,
                "freq_shift": 0,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
                "time_cond_proj_dim": None,
            },
            "absent": {},
        },
        "pipeline": {
            "class": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
            "call": {"num_inference_steps": 50, "guidance_scale": 5.0},
        },
        "source": {
            "scheduler": "forge@c8156fcf backend/huggingface/stabilityai/stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json",
            "vae": "forge@c8156fcf .../stable-diffusion-xl-base-1.0/vae/config.json",
            "net": "forge@c8156fcf .../stable-diffusion-xl-base-1.0/unet/config.json",
            "pipeline": "model_index.json (forge@c8156fcf: force_zeros_for_empty_prompt true); call defaults = "
            "StableDiffusionXLPipeline.__call__ (diffusers 0.42.1); the card calls pipe(prompt=prompt)",
        },
        "unconfirmed": [],
    },
    # ------------------------------------------------------------------------------ SDXL-Turbo.
    # Sources: JSchalter/models@73821852 sdxl-turbo/{scheduler/ scheduler_config.json,
    # vae/config.json, unet/config.json} (hub file copies). Scheduler file also reproduced in a
    # third-party SDXL module (SCHEDULER_EULERA_ CONFIG_JSON) with identical keys.  Card / diffusers
    # docs (diffusers@58eb52c0 docs/source/en/api/pipelines/stable_diffusion/sdxl_turbo.md):
    # guidance_scale=0.0, num_inference_steps=1 (2-4 also fine), 512x512; the folder's scheduler is
    # used as is. ------------------------------------------------------------------------------
    "sdxl_turbo": {
        "repo": "stabilityai/sdxl-turbo",
        "scheduler": {
            "folder": {
                "class": "EulerAncestralDiscreteScheduler",
                "config": {
                    "beta_end": 0.012,
                    "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085,
                    "clip_sample": False,
                    "interpolation_type": "linear",
                    "num_train_timesteps": 1000,
                    "prediction_type": "epsilon",
                    "sample_max_value": 1.0,
                    "set_alpha_to_one": False,
                    "skip_prk_steps": True,
                    "steps_offset": 1,
                    "timestep_spacing": "trailing",
                    "trained_betas": None,
                },
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderKL",
            "config": {"scaling_factor": 0.13025, "force_upcast": True},
            "absent": {"shift_factor": None, "latents_mean": None, "latents_std": None},
        },
        "net": {
            "class": "UNet2DConditionModel",
            "config": {
                "in_channels": 4,
                "out_channels": 4,
                "sample_size": 64,
                "flip_sin_to_cos": True,
                "freq_shift": 0,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
                "time_cond_proj_dim": None,
            },
            "absent": {},
        },
        "pipeline": {
            "class": "StableDiffusionXLPipeline",
            "call": {"num_inference_steps": 1, "guidance_scale": 0.0, "height": 512, "width": 512},
        },
        "source": {
            "scheduler": "JSchalter/models@73821852 sdxl-turbo/scheduler/scheduler_config.json",
            "vae": "JSchalter/models@73821852 sdxl-turbo/vae/config.json",
            "net": "JSchalter/models@73821852 sdxl-turbo/unet/config.json",
            "pipeline": "diffusers@58eb52c0 docs/source/en/api/pipelines/stable_diffusion/sdxl_turbo.md "
            "(guidance_scale=0.0, num_inference_steps=1, 512x512 default resolution)",
        },
        "unconfirmed": [
            "pipeline.class: model_index.json not seen (AutoPipelineForText2Image resolves it; SDXL pipeline assumed "
            "from the SDXL unet/vae and the docs' from_single_file example)",
        ],
    },
    # ------------------------------------------------------------------------------ SDXL-Lightning
    # (ByteDance). Not a diffusers folder: UNet / LoRA weights for the SDXL base folder.  Card:
    # ByteDance/SDXL-Lightning README.md, read as the verbatim copy
    # smalltong02/keras-llm-robot@70d9495c models/imagegeneration/ SDXL-Lightning/README.md.
    # 2/4/8-step UNet and LoRA: EulerDiscreteScheduler. from_config(<sdxl base>,
    # timestep_spacing="trailing"), steps = the checkpoint's, guidance_scale=0.  1-step UNet (x0):
    # also prediction_type="sample".
    # ------------------------------------------------------------------------------
    "sdxl_lightning": {
        "repo": "ByteDance/SDXL-Lightning",
        "scheduler": {
            "folder": {"same_as": "sdxl_base"},
            "recommended": {
                "class": "EulerDiscreteScheduler",
                "base": "sdxl_base",
                "overrides": {"timestep_spacing": "trailing"},
                "call": {"num_inference_steps": 4, "guidance_scale": 0},
                "source": "ByteDance/SDXL-Lightning card, '2-Step, 4-Step, 8-Step UNet' and '... LoRA' snippets "
                "(steps must match the checkpoint: 2, 4 or 8)",
            },
            "alternatives": {
                "1step_x0": {
                    "class": "EulerDiscreteScheduler",
                    "base": "sdxl_base",
                    "overrides": {"timestep_spacing": "trailing", "prediction_type": "sample"},
                    "call": {"num_inference_steps": 1, "guidance_scale": 0},
                    "source": "ByteDance/SDXL-Lightning card, '1-Step UNet' (sdxl_lightning_1step_unet_x0)",
                },
            },
        },
        "vae": {"same_as": "sdxl_base"},
        "net": {
            "same_as": "sdxl_base",
            "note": "UNet2DConditionModel.from_config(<sdxl base>, subfolder='unet') per the card",
        },
        "pipeline": {
            "class": "StableDiffusionXLPipeline",
            "call": {"num_inference_steps": 4, "guidance_scale": 0},
        },
        "source": {
            "scheduler": "card (smalltong02/keras-llm-robot@70d9495c models/imagegeneration/SDXL-Lightning/README.md)",
            "vae": "card: loads the SDXL base folder",
            "net": "card: UNet from the SDXL base unet config",
            "pipeline": "card: StableDiffusionXLPipeline, num_inference_steps=4, guidance_scale=0",
        },
        "unconfirmed": [],
    },
    # ------------------------------------------------------------------------------ Hyper-SD
    # (ByteDance). LoRAs / a 1-step UNet for the SDXL base and SD1.5 folders. Card:
    # ByteDance/Hyper-SD README.md, read as the verbatim copy smalltong02/keras-llm-robot@18e24711
    # models/imagegeneration/Hyper-SD/README.md (April 2024 revision).  N-step LoRAs: DDIMScheduler
    # trailing, guidance 0; unified 1-step LoRA: TCDScheduler (no overrides), eta=1.0; 1-step SDXL
    # UNet: LCMScheduler (no overrides), timesteps=[800].
    # ------------------------------------------------------------------------------
    "hyper_sd": {
        "repo": "ByteDance/Hyper-SD",
        "scheduler": {
            "folder": {"same_as": "sdxl_base"},
            "recommended": {
                "class": "DDIMScheduler",
                "base": "sdxl_base",
                "overrides": {"timestep_spacing": "trailing"},
                "call": {"num_inference_steps": 2, "guidance_scale": 0},
                "source": "Hyper-SD card, SDXL '2-Steps, 4-Steps, 8-steps LoRA' (steps = the LoRA's; example 2)",
            },
            "alternatives": {
                "sdxl_unified_lora_tcd": {
                    "class": "TCDScheduler",
                    "base": "sdxl_base",
                    "overrides": {},
                    "call": {"num_inference_steps": 1, "guidance_scale": 0, "eta": 1.0},
                    "source": "Hyper-SD card, SDXL 'Unified LoRA (support 1 to 8 steps inference)'",
                },
                "sdxl_1step_unet_lcm": {
                    "class": "LCMScheduler",
                    "base": "sdxl_base",
                    "overrides": {},
                    "call": {"num_inference_steps": 1, "guidance_scale": 0, "timesteps": [800]},
                    "source": "Hyper-SD card, '1-step SDXL Unet'",
                },
                "sd15_nstep_lora_ddim": {
                    "class": "DDIMScheduler",
                    "base": "sd15",
                    "overrides": {"timestep_spacing": "trailing"},
                    "call": {"num_inference_steps": 2, "guidance_scale": 0},
                    "source": "Hyper-SD card, SD1.5 '2-Steps, 4-Steps, 8-steps LoRA'",
                },
                "sd15_unified_lora_tcd": {
                    "class": "TCDScheduler",
                    "base": "sd15",
                    "overrides": {},
                    "call": {"num_inference_steps": 1, "guidance_scale": 0, "eta": 1.0},
                    "source": "Hyper-SD card, SD1.5 'Unified LoRA (support 1 to 8 steps inference)'",
                },
            },
        },
        "vae": {"same_as": "sdxl_base"},
        "net": {"same_as": "sdxl_base", "note": "SD1.5 LoRAs use the sd15 folder"},
        "pipeline": {
            "class": "StableDiffusionXLPipeline",
            "call": {"num_inference_steps": 2, "guidance_scale": 0},
        },
        "source": {
            "scheduler": "card (smalltong02/keras-llm-robot@18e24711 models/imagegeneration/Hyper-SD/README.md)",
            "vae": "card: DiffusionPipeline.from_pretrained('stabilityai/stable-diffusion-xl-base-1.0')",
            "net": "card: SDXL base UNet (+ LoRA) or UNet2DConditionModel.from_config(<sdxl base>)",
            "pipeline": "card: DiffusionPipeline on SDXL base -> StableDiffusionXLPipeline",
        },
        "unconfirmed": [
            "the later 'CFG-preserved' LoRAs (Hyper-SDXL-8steps-CFG-lora etc.) and their guidance settings are not in "
            "the card revision read here",
        ],
    },
    # ------------------------------------------------------------------------------ LCM:
    # SimianLuo/LCM_Dreamshaper_v7 (folder).  Sources: janeyeon/ attention_modulation_lcm@d54cf765
    # LCM_Dreamshaper_v7/{model_index.json, scheduler/scheduler_config.json, vae/config.json,
    # unet/config.json} (hub files, diffusers 0.22.0.dev0).  Note the file has no timestep_scaling
    # key (class default 10.0) and steps_offset 0 / set_alpha_to_one true. lcm-sdxl variant:
    # diffusers@58eb52c0 docs/source/en/api/pipelines/ latent_consistency_models.md (UNet from
    # latent-consistency/lcm-sdxl in the SDXL base pipeline, LCMScheduler.from_config(<sdxl base>),
    # 4 steps, guidance 8.0).
    # ------------------------------------------------------------------------------
    "lcm": {
        "repo": "SimianLuo/LCM_Dreamshaper_v7",
        "scheduler": {
            "folder": {
                "class": "LCMScheduler",
                "config": {
                    "beta_end": 0.012,
                    "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085,
                    "clip_sample": False,
                    "clip_sample_range": 1.0,
                    "dynamic_thresholding_ratio": 0.995,
                    "num_train_timesteps": 1000,
                    "original_inference_steps": 50,
                    "prediction_type": "epsilon",
                    "rescale_betas_zero_snr": False,
                    "sample_max_value": 1.0,
                    "set_alpha_to_one": True,
                    "steps_offset": 0,
                    "thresholding": False,
                    "timestep_spacing": "leading",
                    "trained_betas": None,
                },
                "absent": {"timestep_scaling": 10.0},
            },
            "recommended": None,
            "alternatives": {
                "lcm_sdxl": {
                    "class": "LCMScheduler",
                    "base": "sdxl_base",
                    "overrides": {},
                    "call": {"num_inference_steps": 4, "guidance_scale": 8.0},
                    "source": "diffusers docs latent_consistency_models.md: latent-consistency/lcm-sdxl UNet in the "
                    "SDXL base pipeline, pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)",
                },
                "lcm_lora_sdxl": {
                    "class": "LCMScheduler",
                    "base": "sdxl_base",
                    "overrides": {},
                    "call": {"num_inference_steps": 4, "guidance_scale": 1.0},
                    "source": "diffusers docs latent_consistency_models.md, LCM-LoRA (latent-consistency/lcm-lora-sdxl)",
                },
            },
        },
        "vae": {
            "class": "AutoencoderKL",
            "config": {"scaling_factor": 0.18215, "force_upcast": True},
            "absent": {"shift_factor": None, "latents_mean": None, "latents_std": None},
        },
        "net": {
            "class": "UNet2DConditionModel",
            "config": {
                "in_channels": 4,
                "out_channels": 4,
                "sample_size": 96,
                "flip_sin_to_cos": True,
                "freq_shift": 0,
                "time_cond_proj_dim": 256,
                "addition_embed_type": None,
            },
            "absent": {},
        },
        "pipeline": {
            "class": "LatentConsistencyModelPipeline",
            "call": {
                "num_inference_steps": 4,
                "guidance_scale": 8.5,
                "original_inference_steps": None,
            },
            "note": "guidance enters as w = guidance_scale - 1 embedded with dim time_cond_proj_dim "
            "(w_embedding), no CFG batch",
        },
        "variants": {
            "lcm_sdxl": {
                "repo": "latent-consistency/lcm-sdxl",
                "net": {
                    "class": "UNet2DConditionModel",
                    "config": {"time_cond_proj_dim": 256},
                    "note": "SDXL base UNet config plus time_cond_proj_dim",
                },
                "pipeline": {
                    "class": "StableDiffusionXLPipeline",
                    "call": {"num_inference_steps": 4, "guidance_scale": 8.0},
                },
            },
        },
        "source": {
            "scheduler": "janeyeon/attention_modulation_lcm@d54cf765 LCM_Dreamshaper_v7/scheduler/scheduler_config.json",
            "vae": "janeyeon/attention_modulation_lcm@d54cf765 LCM_Dreamshaper_v7/vae/config.json",
            "net": "janeyeon/attention_modulation_lcm@813da559 LCM_Dreamshaper_v7/unet/config.json",
            "pipeline": "model_index.json (same copy, LatentConsistencyModelPipeline); call defaults = "
            "LatentConsistencyModelPipeline.__call__ (diffusers 0.42.1); w embedding: "
            "pipeline_latent_consistency_text2img.py",
        },
        "unconfirmed": [
            "variants.lcm_sdxl.net.time_cond_proj_dim=256: lcm-sdxl's own unet/config.json not seen; 256 is the "
            "default --unet_time_cond_proj_dim of diffusers examples/consistency_distillation/"
            "train_lcm_distill_sdxl_wds.py and the value of LCM_Dreamshaper_v7",
        ],
    },
    # ------------------------------------------------------------------------------ TCD
    # (h1t/TCD-SDXL-LoRA): a LoRA for the SDXL base folder.  Usage from diffusers docs
    # using-diffusers/inference_with_tcd_lora.md (at diffusers 9a2923d501^, the page was removed in
    # 9a2923d501): TCDScheduler.from_config(pipe.scheduler.config) with no overrides,
    # num_inference_steps=4, guidance_scale=0, eta=0.3 ("keep steps between 4 and 50, eta 0.3
    # recommended"). ------------------------------------------------------------------------------
    "tcd": {
        "repo": "h1t/TCD-SDXL-LoRA",
        "scheduler": {
            "folder": {"same_as": "sdxl_base"},
            "recommended": {
                "class": "TCDScheduler",
                "base": "sdxl_base",
                "overrides": {},
                "call": {"num_inference_steps": 4, "guidance_scale": 0, "eta": 0.3},
                "source": "diffusers docs inference_with_tcd_lora.md (text-to-image example)",
            },
        },
        "vae": {"same_as": "sdxl_base"},
        "net": {"same_as": "sdxl_base"},
        "pipeline": {
            "class": "StableDiffusionXLPipeline",
            "call": {"num_inference_steps": 4, "guidance_scale": 0, "eta": 0.3},
        },
        "source": {
            "scheduler": "diffusers@9a2923d501^ docs/source/en/using-diffusers/inference_with_tcd_lora.md",
            "vae": "same doc: StableDiffusionXLPipeline.from_pretrained('stabilityai/stable-diffusion-xl-base-1.0')",
            "net": "same doc",
            "pipeline": "same doc",
        },
        "unconfirmed": [
            "the h1t/TCD-SDXL-LoRA card itself was not read; the diffusers doc page was"
        ],
    },
    # ------------------------------------------------------------------------------ SD 3.5 medium.
    # Transformer keys: repeated identically in several third-party copies of the hub
    # transformer/config.json (dual_attention_layers 0..12, qk_norm rms_norm, pos_embed_max_size
    # 384); diffusers@58eb52c0 scripts/convert_sd3_to_diffusers.py says "sd3.5 2b use
    # pos_embed_max_size=384". Scheduler / VAE: the SD3.5 release blog (huggingface.co/blog/sd3-5)
    # says text encoders, VAE and noise scheduler "stay exactly the same as in SD3 Medium";
    # SD3-medium's scheduler file (forge@c8156fcf backend/huggingface/stabilityai/
    # stable-diffusion-3-medium-diffusers/scheduler/scheduler_config.json and
    # vladmandic/automatic@431bcc36 configs/sd3/...) is {num_train_timesteps 1000, shift 3.0}; SD3
    # VAE scaling 1.5305 / shift 0.0609 (same copies, and convert_sd3_to_diffusers.py).  Card call:
    # 40 steps, guidance 4.5 (card snippet seen via copies, e.g. sq5rix/llama stable35.py).
    # ------------------------------------------------------------------------------
    "sd35_medium": {
        "repo": "stabilityai/stable-diffusion-3.5-medium",
        "scheduler": {
            "folder": {
                "class": "FlowMatchEulerDiscreteScheduler",
                "config": {"num_train_timesteps": 1000, "shift": 3.0},
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderKL",
            "config": {
                "scaling_factor": 1.5305,
                "shift_factor": 0.0609,
                "latents_mean": None,
                "latents_std": None,
            },
            "absent": {},
        },
        "net": {
            "class": "SD3Transformer2DModel",
            "config": {
                "in_channels": 16,
                "out_channels": 16,
                "sample_size": 128,
                "patch_size": 2,
                "pos_embed_max_size": 384,
                "qk_norm": "rms_norm",
                "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            },
            "absent": {},
        },
        "pipeline": {
            "class": "StableDiffusion3Pipeline",
            "call": {"num_inference_steps": 40, "guidance_scale": 4.5},
        },
        "source": {
            "scheduler": "derived: SD3.5 blog (scheduler same as SD3 Medium) + forge@c8156fcf "
            "stable-diffusion-3-medium-diffusers/scheduler/scheduler_config.json",
            "vae": "SD3 VAE values: forge@c8156fcf stable-diffusion-3-medium-diffusers/vae/config.json, "
            "diffusers scripts/convert_sd3_to_diffusers.py (scaling_factor=1.5305, shift_factor=0.0609)",
            "net": "third-party copies of the hub transformer config; convert_sd3_to_diffusers.py comment on 384",
            "pipeline": "card snippet via copies (num_inference_steps=40, guidance_scale=4.5); pipeline default "
            "StableDiffusion3Pipeline.__call__ is 28 steps / 7.0",
        },
        "unconfirmed": [
            "scheduler.folder: the 3.5-medium file itself not seen (SD3-medium's and SD3.5-large's are both "
            "{num_train_timesteps: 1000, shift: 3.0})",
            "vae.force_upcast: not recorded; SD3-medium copies disagree (forge copy true, vladmandic copy false); "
            "SD3.5-large's file says true",
            "net: from third-party copies of the hub file, not a verbatim hub copy",
        ],
    },
    # ------------------------------------------------------------------------------ SD 3.5 large.
    # Sources: forge branch sd35 @1363999f backend/huggingface/
    # stabilityai/stable-diffusion-3.5-large/{model_index.json, scheduler/ scheduler_config.json,
    # vae/config.json, transformer/config.json}.  The transformer file has no dual_attention_layers
    # key (class default ()).  Card call: 28 steps, guidance 3.5 (snippet seen via copies, e.g.
    # Maekiz/aiserver test.py).
    # ------------------------------------------------------------------------------
    "sd35_large": {
        "repo": "stabilityai/stable-diffusion-3.5-large",
        "scheduler": {
            "folder": {
                "class": "FlowMatchEulerDiscreteScheduler",
                "config": {"num_train_timesteps": 1000, "shift": 3.0},
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderKL",
            "config": {
                "scaling_factor": 1.5305,
                "shift_factor": 0.0609,
                "latents_mean": None,
                "latents_std": None,
                "force_upcast": True,
            },
            "absent": {},
        },
        "net": {
            "class": "SD3Transformer2DModel",
            "config": {
                "in_channels": 16,
                "out_channels": 16,
                "sample_size": 128,
                "patch_size": 2,
                "pos_embed_max_size": 192,
                "qk_norm": "rms_norm",
            },
            "absent": {"dual_attention_layers": ()},
        },
        "pipeline": {
            "class": "StableDiffusion3Pipeline",
            "call": {"num_inference_steps": 28, "guidance_scale": 3.5},
        },
        "source": {
            "scheduler": "forge@1363999f (branch sd35) backend/huggingface/stabilityai/stable-diffusion-3.5-large/scheduler/scheduler_config.json",
            "vae": "forge@1363999f .../stable-diffusion-3.5-large/vae/config.json",
            "net": "forge@1363999f .../stable-diffusion-3.5-large/transformer/config.json",
            "pipeline": "model_index.json (forge@1363999f); card call via copies (28 steps, guidance 3.5)",
        },
        "unconfirmed": ["pipeline.call: card snippet read only through third-party copies"],
    },
    # ------------------------------------------------------------------------------ FLUX.1-dev.
    # Sources: forge@2d30eeed backend/huggingface/black-forest-labs/ FLUX.1-dev/{model_index.json,
    # scheduler/..., vae/config.json, transformer/ config.json}.  Transformer file has no
    # out_channels (None -> in_channels) and no axes_dims_rope.  Call: diffusers@58eb52c0
    # docs/source/en/api/pipelines/flux.md (dev: guidance_scale=3.5, num_inference_steps=50).
    # ------------------------------------------------------------------------------
    "flux_dev": {
        "repo": "black-forest-labs/FLUX.1-dev",
        "scheduler": {
            "folder": {
                "class": "FlowMatchEulerDiscreteScheduler",
                "config": {
                    "base_image_seq_len": 256,
                    "base_shift": 0.5,
                    "max_image_seq_len": 4096,
                    "max_shift": 1.15,
                    "num_train_timesteps": 1000,
                    "shift": 3.0,
                    "use_dynamic_shifting": True,
                },
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderKL",
            "config": {
                "scaling_factor": 0.3611,
                "shift_factor": 0.1159,
                "latents_mean": None,
                "latents_std": None,
                "force_upcast": True,
            },
            "absent": {},
        },
        "net": {
            "class": "FluxTransformer2DModel",
            "config": {"in_channels": 64, "patch_size": 1, "guidance_embeds": True},
            "absent": {"out_channels": None, "axes_dims_rope": (16, 56, 56)},
        },
        "pipeline": {
            "class": "FluxPipeline",
            "call": {
                "num_inference_steps": 50,
                "guidance_scale": 3.5,
                "true_cfg_scale": 1.0,
                "max_sequence_length": 512,
            },
            "note": "guidance_scale is fed to the guidance embedding (guidance_embeds=True); "
            "pipeline default num_inference_steps is 28",
        },
        "source": {
            "scheduler": "forge@2d30eeed backend/huggingface/black-forest-labs/FLUX.1-dev/scheduler/scheduler_config.json",
            "vae": "forge@2d30eeed .../FLUX.1-dev/vae/config.json; diffusers scripts/convert_flux_to_diffusers.py "
            "(scaling_factor=0.3611, shift_factor=0.1159)",
            "net": "forge@2d30eeed .../FLUX.1-dev/transformer/config.json",
            "pipeline": "model_index.json (forge@2d30eeed); diffusers docs api/pipelines/flux.md; "
            "FluxPipeline.__call__ (diffusers 0.42.1)",
        },
        "unconfirmed": [],
    },
    # ------------------------------------------------------------------------------ FLUX.1-schnell.
    # Sources: forge@12a02b88 backend/huggingface/black-forest-labs/ FLUX.1-schnell/{...}; scheduler
    # file also vladmandic/automatic@431bcc36 configs/flux/scheduler/scheduler_config.json.  Call:
    # diffusers docs flux.md (guidance_scale=0., num_inference_steps=4, max_sequence_length=256).
    # ------------------------------------------------------------------------------
    "flux_schnell": {
        "repo": "black-forest-labs/FLUX.1-schnell",
        "scheduler": {
            "folder": {
                "class": "FlowMatchEulerDiscreteScheduler",
                "config": {
                    "base_image_seq_len": 256,
                    "base_shift": 0.5,
                    "max_image_seq_len": 4096,
                    "max_shift": 1.15,
                    "num_train_timesteps": 1000,
                    "shift": 1.0,
                    "use_dynamic_shifting": False,
                },
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderKL",
            "config": {
                "scaling_factor": 0.3611,
                "shift_factor": 0.1159,
                "latents_mean": None,
                "latents_std": None,
                "force_upcast": True,
            },
            "absent": {},
        },
        "net": {
            "class": "FluxTransformer2DModel",
            "config": {"in_channels": 64, "patch_size": 1, "guidance_embeds": False},
            "absent": {"out_channels": None, "axes_dims_rope": (16, 56, 56)},
        },
        "pipeline": {
            "class": "FluxPipeline",
            "call": {"num_inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256},
        },
        "source": {
            "scheduler": "forge@12a02b88 backend/huggingface/black-forest-labs/FLUX.1-schnell/scheduler/scheduler_config.json",
            "vae": "forge@12a02b88 .../FLUX.1-schnell/vae/config.json",
            "net": "forge@12a02b88 .../FLUX.1-schnell/transformer/config.json",
            "pipeline": "model_index.json (forge@12a02b88); diffusers docs api/pipelines/flux.md",
        },
        "unconfirmed": [],
    },
    # ------------------------------------------------------------------------------ Sana 1.6B
    # 1024px (Efficient-Large-Model/Sana_1600M_1024px_diffusers). The folder was written by
    # diffusers scripts/convert_sana_to_diffusers.py (added in diffusers 5a196e3d46, __version__
    # 0.32.0.dev0): scheduler = DPMSolverMultistepScheduler(flow_shift=3.0 [3.0 unless 4096px],
    # use_flow_sigmas=True, prediction_type="flow_prediction"); transformer in/out 32, patch 1,
    # sample_size image_size//32, interpolation_scale None at 1024, no qk_norm for
    # SanaMS_1600M_P1_D20.  VAE DC-AE f32c32 sana: scaling_factor 0.41407 (diffusers
    # scripts/convert_dcae_to_diffusers.py, dc-ae-f32c32-sana-1.0; NVlabs/Sana@28af99f3
    # configs/sana_config/1024ms/ Sana_1600M_img1024.yaml: scale_factor 0.41407, flow_shift 3.0,
    # vis_sampler flow_dpm-solver).  Call: NVlabs/Sana@0887f78a asset/docs/ model_zoo.md
    # (guidance_scale=5.0, num_inference_steps=20 at 1024x1024).
    # ------------------------------------------------------------------------------
    "sana_1600m": {
        "repo": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
        "scheduler": {
            "folder": {
                "class": "DPMSolverMultistepScheduler",
                "derived": True,
                "config": {
                    "num_train_timesteps": 1000,
                    "beta_start": 0.0001,
                    "beta_end": 0.02,
                    "beta_schedule": "linear",
                    "trained_betas": None,
                    "solver_order": 2,
                    "prediction_type": "flow_prediction",
                    "thresholding": False,
                    "dynamic_thresholding_ratio": 0.995,
                    "sample_max_value": 1.0,
                    "algorithm_type": "dpmsolver++",
                    "solver_type": "midpoint",
                    "lower_order_final": True,
                    "euler_at_final": False,
                    "use_karras_sigmas": False,
                    "use_exponential_sigmas": False,
                    "use_beta_sigmas": False,
                    "use_lu_lambdas": False,
                    "use_flow_sigmas": True,
                    "flow_shift": 3.0,
                    "final_sigmas_type": "zero",
                    "lambda_min_clipped": float("-inf"),
                    "variance_type": None,
                    "timestep_spacing": "linspace",
                    "steps_offset": 0,
                    "rescale_betas_zero_snr": False,
                },
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderDC",
            "config": {"scaling_factor": 0.41407},
            "absent": {},
        },
        "net": {
            "class": "SanaTransformer2DModel",
            "config": {
                "in_channels": 32,
                "out_channels": 32,
                "sample_size": 32,
                "patch_size": 1,
                "interpolation_scale": None,
            },
            "absent": {
                "qk_norm": None,
                "guidance_embeds": False,
                "guidance_embeds_scale": 0.1,
                "timestep_scale": 1.0,
            },
        },
        "pipeline": {
            "class": "SanaPipeline",
            "call": {
                "num_inference_steps": 20,
                "guidance_scale": 5.0,
                "height": 1024,
                "width": 1024,
            },
            "note": "SanaPipeline.__call__ defaults: 20 steps, guidance_scale 4.5, 1024x1024",
        },
        "source": {
            "scheduler": "derived: diffusers scripts/convert_sana_to_diffusers.py arguments + "
            "DPMSolverMultistepScheduler.__init__ defaults at diffusers 5a196e3d46 (0.32.0.dev0)",
            "vae": "diffusers@58eb52c0 scripts/convert_dcae_to_diffusers.py (dc-ae-f32c32-sana-1.0: scaling_factor "
            "0.41407); NVlabs/Sana@28af99f3 configs/sana_config/1024ms/Sana_1600M_img1024.yaml",
            "net": "diffusers scripts/convert_sana_to_diffusers.py (transformer_kwargs for SanaMS_1600M_P1_D20 at 1024)",
            "pipeline": "NVlabs/Sana@0887f78a asset/docs/model_zoo.md; SanaPipeline.__call__ (diffusers 0.42.1)",
        },
        "unconfirmed": [
            "scheduler.folder: derived, the published scheduler_config.json was not seen (keys/values = the "
            "conversion script's arguments on the class defaults of the diffusers version that added Sana)",
            "vae.scaling_factor: from the DC-AE conversion script and Sana's training config, not the folder's vae/config.json",
            "net: from the conversion script; which optional keys (qk_norm, guidance_embeds, ...) the file carries "
            "is unconfirmed, the 'absent' values are the class defaults",
        ],
    },
    # ------------------------------------------------------------------------------ SANA-Sprint
    # 1.6B (Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers). diffusers
    # scripts/convert_sana_to_diffusers.py (SanaSprint_1600M_P1_D20, added in diffusers 8a63aa5e4f):
    # SCMScheduler(prediction_type="trigflow", sigma_data=0.5); transformer
    # qk_norm="rms_norm_across_heads", guidance_embeds=True; VAE dc-ae-f32c32-sana-1.1-diffusers.
    # NVlabs/Sana@3e449ba3
    # configs/sana_sprint_config/1024ms/SanaSprint_1600M_1024px_allqknorm_bf16_scm_ ladd.yaml:
    # qk_norm true, cfg_embed true, cfg_embed_scale 0.1, sigma_data 0.5, scale_factor 0.41407.
    # Call: NVlabs/Sana@0887f78a asset/docs/sana_sprint.md (num_inference_steps=2; repo example
    # guidance_scale=4.5).
    # ------------------------------------------------------------------------------
    "sana_sprint": {
        "repo": "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
        "scheduler": {
            "folder": {
                "class": "SCMScheduler",
                "derived": True,
                "config": {
                    "num_train_timesteps": 1000,
                    "prediction_type": "trigflow",
                    "sigma_data": 0.5,
                },
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderDC",
            "config": {"scaling_factor": 0.41407},
            "absent": {},
        },
        "net": {
            "class": "SanaTransformer2DModel",
            "config": {
                "in_channels": 32,
                "out_channels": 32,
                "sample_size": 32,
                "patch_size": 1,
                "interpolation_scale": None,
                "qk_norm": "rms_norm_across_heads",
                "guidance_embeds": True,
                "guidance_embeds_scale": 0.1,
                "timestep_scale": 1.0,
            },
            "absent": {},
        },
        "pipeline": {
            "class": "SanaSprintPipeline",
            "call": {
                "num_inference_steps": 2,
                "guidance_scale": 4.5,
                "max_timesteps": 1.5708,
                "intermediate_timesteps": 1.3,
                "height": 1024,
                "width": 1024,
            },
            "note": "guidance = guidance_scale * transformer.config.guidance_embeds_scale; latents scaled "
            "by scheduler.config.sigma_data (pipeline_sana_sprint.py)",
        },
        "source": {
            "scheduler": "derived: diffusers scripts/convert_sana_to_diffusers.py scheduler_config "
            "{prediction_type: trigflow, sigma_data: 0.5} + SCMScheduler default num_train_timesteps",
            "vae": "NVlabs/Sana@3e449ba3 SanaSprint_1600M_1024px_allqknorm_bf16_scm_ladd.yaml (dc-ae-f32c32-sana-1.1, "
            "scale_factor 0.41407)",
            "net": "diffusers scripts/convert_sana_to_diffusers.py (qk_norm, guidance_embeds); Sana sprint yaml "
            "(cfg_embed_scale 0.1 = guidance_embeds_scale); SanaTransformer2DModel defaults (timestep_scale 1.0)",
            "pipeline": "NVlabs/Sana@0887f78a asset/docs/sana_sprint.md (num_inference_steps=2); SanaSprintPipeline.__call__ "
            "(diffusers 0.42.1: max_timesteps 1.5708, intermediate_timesteps 1.3, guidance_scale 4.5)",
        },
        "unconfirmed": [
            "scheduler.folder: derived, published scheduler_config.json not seen",
            "net.guidance_embeds_scale / net.timestep_scale: values are the class defaults and the training yaml's "
            "cfg_embed_scale; whether the published transformer/config.json carries these keys is unconfirmed",
            "vae.scaling_factor: from Sana's training config, not the folder's vae/config.json",
        ],
    },
    # ------------------------------------------------------------------------------ Qwen-Image.
    # Scheduler file: kohya-ss/musubi-tuner@30c658c4 src/musubi_tuner/
    # qwen_image/qwen_image_utils.py (get_scheduler: SCHEDULER_CONFIG_JSON with _diffusers_version
    # 0.34.0.dev0); the identical dict is in ostris/ai-toolkit
    # extensions_built_in/diffusion_models/qwen_image/qwen_image.py.  NOTE: the published base/max
    # shift are 0.5 / 0.9 with max_image_seq_len 8192 and shift_terminal 0.02; base_shift =
    # max_shift = log(3) with shift_terminal None is the Qwen-Image-Lightning LoRA's scheduler
    # (ModelTC/Qwen-Image-Lightning@ 142338f3 generate_with_diffusers.py), recorded as an
    # alternative.  VAE: musubi-tuner qwen_image_utils.py load_vae VAE_CONFIG_JSON (same 16+16
    # values as AutoencoderKLQwenImage's defaults in diffusers 0.42.1).  Transformer: musubi-tuner
    # qwen_image_model.py create_model docstring (hub config copy). Call: QwenLM/Qwen-Image@6b5e1f5c
    # README.md (num_inference_steps=50, true_cfg_scale=4.0, negative_prompt " ").
    # ------------------------------------------------------------------------------
    "qwen_image": {
        "repo": "Qwen/Qwen-Image",
        "scheduler": {
            "folder": {
                "class": "FlowMatchEulerDiscreteScheduler",
                "config": {
                    "base_image_seq_len": 256,
                    "base_shift": 0.5,
                    "invert_sigmas": False,
                    "max_image_seq_len": 8192,
                    "max_shift": 0.9,
                    "num_train_timesteps": 1000,
                    "shift": 1.0,
                    "shift_terminal": 0.02,
                    "stochastic_sampling": False,
                    "time_shift_type": "exponential",
                    "use_beta_sigmas": False,
                    "use_dynamic_shifting": True,
                    "use_exponential_sigmas": False,
                    "use_karras_sigmas": False,
                },
            },
            "recommended": None,
            "alternatives": {
                "lightning_lora": {
                    "class": "FlowMatchEulerDiscreteScheduler",
                    "config": {
                        "base_image_seq_len": 256,
                        "base_shift": LOG_3,
                        "invert_sigmas": False,
                        "max_image_seq_len": 8192,
                        "max_shift": LOG_3,
                        "num_train_timesteps": 1000,
                        "shift": 1.0,
                        "shift_terminal": None,
                        "stochastic_sampling": False,
                        "time_shift_type": "exponential",
                        "use_beta_sigmas": False,
                        "use_dynamic_shifting": True,
                        "use_exponential_sigmas": False,
                        "use_karras_sigmas": False,
                    },
                    "call": {"num_inference_steps": 8, "true_cfg_scale": 1.0},
                    "source": "ModelTC/Qwen-Image-Lightning@142338f3 generate_with_diffusers.py (with a LoRA: this "
                    "config, 8 steps, cfg 1.0)",
                },
            },
        },
        "vae": {
            "class": "AutoencoderKLQwenImage",
            "config": {
                "z_dim": 16,
                **WAN_VAE_LATENTS,
            },
            "absent": {},
            "note": "the class has no scaling_factor / shift_factor: the pipeline normalises latents per "
            "channel, (z - latents_mean) / latents_std",
        },
        "net": {
            "class": "QwenImageTransformer2DModel",
            "config": {
                "in_channels": 64,
                "out_channels": 16,
                "patch_size": 2,
                "guidance_embeds": False,
                "axes_dims_rope": [16, 56, 56],
            },
            "absent": {"zero_cond_t": False},
        },
        "pipeline": {
            "class": "QwenImagePipeline",
            "call": {"num_inference_steps": 50, "true_cfg_scale": 4.0, "negative_prompt": " "},
            "note": "true CFG (two passes) only when true_cfg_scale > 1 and a negative prompt is given; "
            "guidance_scale is only used if guidance_embeds (False here)",
        },
        "source": {
            "scheduler": "kohya-ss/musubi-tuner@30c658c4 src/musubi_tuner/qwen_image/qwen_image_utils.py "
            "(SCHEDULER_CONFIG_JSON); same dict in ostris/ai-toolkit qwen_image.py",
            "vae": "kohya-ss/musubi-tuner@30c658c4 src/musubi_tuner/qwen_image/qwen_image_utils.py (VAE_CONFIG_JSON)",
            "net": "kohya-ss/musubi-tuner@30c658c4 src/musubi_tuner/qwen_image/qwen_image_model.py (create_model docstring)",
            "pipeline": "QwenLM/Qwen-Image@6b5e1f5c README.md; QwenImagePipeline.__call__ (diffusers 0.42.1: "
            "true_cfg_scale 4.0, 50 steps)",
        },
        "unconfirmed": [
            "all Qwen-Image files are from verbatim-looking copies embedded in third-party trainers "
            "(musubi-tuner, ai-toolkit), not from a mirror of the hub folder",
            "brief said base_shift/max_shift = log(3): that is the Lightning LoRA's scheduler, "
            "not the folder's (0.5 / 0.9)",
        ],
    },
    # ------------------------------------------------------------------------------ PixArt-alpha
    # XL-2-1024-MS.  Scheduler: the dict ostris/ai-toolkit@27a03a91 toolkit/sampler.py keeps as
    # pixart_config (_diffusers_version 0.22.0.dev0); it equals DPMSolverMultistepScheduler()
    # defaults, which is what diffusers scripts/convert_pixart_alpha_to_diffusers.py saves.
    # Transformer from that script: in 4, out 8 (learned sigma), patch 2, sample_size 1024//8, norm
    # ada_norm_single, caption_channels 4096; the pipeline uses micro-conditions (resolution, aspect
    # ratio) when sample_size == 128.  VAE: sd-vae-ft-ema (script; PixArt-sigma repo
    # configs/pixart_alpha_config/*.py vae_pretrained), SD scaling 0.18215.
    # ------------------------------------------------------------------------------
    "pixart_alpha": {
        "repo": "PixArt-alpha/PixArt-XL-2-1024-MS",
        "scheduler": {
            "folder": {
                "class": "DPMSolverMultistepScheduler",
                "config": {
                    "algorithm_type": "dpmsolver++",
                    "beta_end": 0.02,
                    "beta_schedule": "linear",
                    "beta_start": 0.0001,
                    "dynamic_thresholding_ratio": 0.995,
                    "euler_at_final": False,
                    "lambda_min_clipped": float("-inf"),
                    "lower_order_final": True,
                    "num_train_timesteps": 1000,
                    "prediction_type": "epsilon",
                    "sample_max_value": 1.0,
                    "solver_order": 2,
                    "solver_type": "midpoint",
                    "steps_offset": 0,
                    "thresholding": False,
                    "timestep_spacing": "linspace",
                    "trained_betas": None,
                    "use_karras_sigmas": False,
                    "use_lu_lambdas": False,
                    "variance_type": None,
                },
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderKL",
            "config": {},
            "absent": {
                "scaling_factor": 0.18215,
                "shift_factor": None,
                "latents_mean": None,
                "latents_std": None,
                "force_upcast": True,
            },
        },
        "net": {
            "class": "PixArtTransformer2DModel",
            "folder_class": "Transformer2DModel",
            "config": {
                "in_channels": 4,
                "out_channels": 8,
                "sample_size": 128,
                "patch_size": 2,
                "norm_type": "ada_norm_single",
            },
            "absent": {"use_additional_conditions": None, "interpolation_scale": None},
            "note": "out_channels = 2 * in_channels: learned variance; pipelines keep the first half "
            "(out_channels // 2 == latent_channels); micro-conditions used because sample_size == 128",
        },
        "pipeline": {
            "class": "PixArtAlphaPipeline",
            "call": {
                "num_inference_steps": 20,
                "guidance_scale": 4.5,
                "use_resolution_binning": True,
            },
        },
        "source": {
            "scheduler": "ostris/ai-toolkit@27a03a91 toolkit/sampler.py (pixart_config); consistent with "
            "DPMSolverMultistepScheduler() in diffusers scripts/convert_pixart_alpha_to_diffusers.py",
            "vae": "diffusers scripts/convert_pixart_alpha_to_diffusers.py (subfolder sd-vae-ft-ema); "
            "AutoencoderKL defaults",
            "net": "diffusers@58eb52c0 scripts/convert_pixart_alpha_to_diffusers.py (Transformer2DModel kwargs); "
            "pipeline_pixart_alpha.py (sample_size == 128 micro-conditions, learned-sigma split)",
            "pipeline": "PixArtAlphaPipeline.__call__ (diffusers 0.42.1)",
        },
        "unconfirmed": [
            "scheduler.folder: from a third-party copy labelled pixart_config, not a hub mirror",
            "net: derived from the conversion script; the published transformer/config.json not seen "
            "(published before PixArtTransformer2DModel existed, class Transformer2DModel)",
            "vae: the folder's vae/config.json not seen (sd-vae-ft-ema per the conversion script)",
        ],
    },
    # ------------------------------------------------------------------------------ PixArt-Sigma
    # XL-2-1024-MS.  Transformer: diffusers scripts/convert_pixart_sigma_ to_diffusers.py /
    # PixArt-alpha/PixArt-sigma@1ce521af tools/convert_pixart_to_ diffusers.py: in 4, out 8, patch
    # 2, sample_size 128, interpolation_scale 2 at 1024, use_additional_conditions =
    # --micro_condition, which the README's conversion command for PixArt-Sigma-XL-2-1024-MS does
    # not pass (False). Scheduler: DPMSolverMultistepScheduler() by the same scripts.  VAE: SDXL VAE
    # (pixart_sigma_sdxlvae_T5_diffusers/vae; PixArt-sigma@1ce521af configs/
    # pixart_sigma_config/PixArt_sigma_xl2_img1024_internalms.py scale_factor 0.13025). README
    # usage: PixArtSigmaPipeline with pipeline defaults.
    # ------------------------------------------------------------------------------
    "pixart_sigma": {
        "repo": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        "scheduler": {
            "folder": {
                "class": "DPMSolverMultistepScheduler",
                "derived": True,
                "config": {
                    "num_train_timesteps": 1000,
                    "beta_start": 0.0001,
                    "beta_end": 0.02,
                    "beta_schedule": "linear",
                    "trained_betas": None,
                    "solver_order": 2,
                    "prediction_type": "epsilon",
                    "thresholding": False,
                    "dynamic_thresholding_ratio": 0.995,
                    "sample_max_value": 1.0,
                    "algorithm_type": "dpmsolver++",
                    "solver_type": "midpoint",
                    "lower_order_final": True,
                    "euler_at_final": False,
                    "use_karras_sigmas": False,
                    "use_lu_lambdas": False,
                    "final_sigmas_type": "zero",
                    "lambda_min_clipped": float("-inf"),
                    "variance_type": None,
                    "timestep_spacing": "linspace",
                    "steps_offset": 0,
                    "rescale_betas_zero_snr": False,
                },
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderKL",
            "config": {"scaling_factor": 0.13025},
            "absent": {"shift_factor": None, "latents_mean": None, "latents_std": None},
        },
        "net": {
            "class": "PixArtTransformer2DModel",
            "config": {
                "in_channels": 4,
                "out_channels": 8,
                "sample_size": 128,
                "patch_size": 2,
                "norm_type": "ada_norm_single",
                "interpolation_scale": 2,
                "use_additional_conditions": False,
            },
            "absent": {},
            "note": "learned variance (out_channels = 2 * in_channels); no micro-conditions",
        },
        "pipeline": {
            "class": "PixArtSigmaPipeline",
            "call": {
                "num_inference_steps": 20,
                "guidance_scale": 4.5,
                "use_resolution_binning": True,
                "max_sequence_length": 300,
            },
        },
        "source": {
            "scheduler": "derived: DPMSolverMultistepScheduler() in convert_pixart_sigma_to_diffusers.py + class "
            "defaults at diffusers 39215aa30e (PixArt-Sigma added, 0.28.0.dev0)",
            "vae": "PixArt-alpha/PixArt-sigma@1ce521af configs/pixart_sigma_config/PixArt_sigma_xl2_img1024_internalms.py "
            "(sdxl vae, scale_factor 0.13025); README loads pixart_sigma_sdxlvae_T5_diffusers",
            "net": "diffusers scripts/convert_pixart_sigma_to_diffusers.py; PixArt-sigma@1ce521af README.md conversion "
            "command (no --micro_condition) and tools/convert_pixart_to_diffusers.py",
            "pipeline": "PixArt-sigma@1ce521af README.md (pipe(prompt)); PixArtSigmaPipeline.__call__ (diffusers 0.42.1)",
        },
        "unconfirmed": [
            "scheduler.folder: derived, published file not seen",
            "vae: the folder's vae/config.json not seen (force_upcast unknown; SDXL VAE expected)",
            "net: derived from the conversion scripts; interpolation_scale / use_additional_conditions as those "
            "scripts set them for 1024 without micro-conditions",
        ],
    },
    # ------------------------------------------------------------------------------ DiT-XL/2 256.
    # diffusers scripts/convert_dit_to_diffusers.py: Transformer2DModel (sample_size 256//8, in 4,
    # out 8 = learned sigma, patch 2, ada_norm_zero, num_embeds_ada_norm 1000),
    # DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
    # clip_sample=False), VAE default stabilityai/sd-vae-ft-ema.  Folder written with diffusers
    # 0.12.0.dev0 (DiT pipeline added in 37d113cce7), whose DDIMScheduler had only the keys below.
    # The DiTPipeline docstring example swaps in DPMSolverMultistepScheduler .from_config(...) with
    # num_inference_steps=25.
    # ------------------------------------------------------------------------------
    "dit_xl_2": {
        "repo": "facebook/DiT-XL-2-256",
        "scheduler": {
            "folder": {
                "class": "DDIMScheduler",
                "derived": True,
                "config": {
                    "num_train_timesteps": 1000,
                    "beta_start": 0.0001,
                    "beta_end": 0.02,
                    "beta_schedule": "linear",
                    "trained_betas": None,
                    "clip_sample": False,
                    "set_alpha_to_one": True,
                    "steps_offset": 0,
                    "prediction_type": "epsilon",
                },
            },
            "recommended": {
                "class": "DPMSolverMultistepScheduler",
                "base": "dit_xl_2",
                "overrides": {},
                "call": {"num_inference_steps": 25},
                "source": "diffusers pipeline_dit.py EXAMPLE_DOC_STRING",
            },
        },
        "vae": {
            "class": "AutoencoderKL",
            "config": {},
            "absent": {
                "scaling_factor": 0.18215,
                "shift_factor": None,
                "latents_mean": None,
                "latents_std": None,
                "force_upcast": True,
            },
        },
        "net": {
            "class": "DiTTransformer2DModel",
            "folder_class": "Transformer2DModel",
            "config": {
                "in_channels": 4,
                "out_channels": 8,
                "sample_size": 32,
                "patch_size": 2,
                "norm_type": "ada_norm_zero",
                "num_embeds_ada_norm": 1000,
            },
            "absent": {},
            "note": "class-conditional (1000 ImageNet labels, null label 1000 for CFG); learned variance: "
            "the pipeline guides the first in_channels outputs and drops the rest",
        },
        "pipeline": {
            "class": "DiTPipeline",
            "call": {"num_inference_steps": 50, "guidance_scale": 4.0},
        },
        "source": {
            "scheduler": "derived: diffusers@58eb52c0 scripts/convert_dit_to_diffusers.py + DDIMScheduler.__init__ "
            "at diffusers 37d113cce7 (0.12.0.dev0)",
            "vae": "diffusers scripts/convert_dit_to_diffusers.py (--vae_model default stabilityai/sd-vae-ft-ema); "
            "AutoencoderKL defaults",
            "net": "diffusers scripts/convert_dit_to_diffusers.py; pipeline_dit.py docstring links "
            "facebook/DiT-XL-2-256/transformer/config.json as Transformer2DModel",
            "pipeline": "DiTPipeline.__call__ (diffusers 0.42.1); pipeline_dit.py guidance on eps channels only",
        },
        "unconfirmed": [
            "scheduler.folder: derived, published file not seen",
            "vae: which VAE (ft-ema or ft-mse) the folder ships is unconfirmed; both are SD VAEs "
            "with the default scaling 0.18215",
            "net: derived from the conversion script",
        ],
    },
    # ------------------------------------------------------------------------------ Wan 2.1 T2V
    # 1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers).  Scheduler: the dict ostris/ai-toolkit@1bf2f2e3
    # toolkit/models/wan21/wan21.py keeps as scheduler_configUniPC (_diffusers_version 0.33.0.dev0,
    # used for Wan 2.1 generation); it is what diffusers@58eb52c0 scripts/convert_wan_to_diffusers.py
    # writes for T2V (UniPCMultistepScheduler(prediction_type="flow_prediction",
    # use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0) on the class defaults), and it
    # serialises to 751 bytes, the size the hub's tree page (docs corpus:
    # huggingface.co/Wan-AI/Wan2.1-T2V-1.3B-Diffusers/tree/main/scheduler, commit b7f0d36 "Update
    # scheduler/scheduler_config.json (#4)") shows.  VAE: AutoencoderKLWan, no scaling_factor; the
    # per-channel latents_mean / latents_std of huggingface.co/ai-toolkit/wan2.1-vae config.json
    # (saved from this folder: _name_or_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers) and
    # huggingface.co/diffusers/Wan2.1-VAE config.json (0.33.0.dev0), also the class defaults.
    # Transformer: the conversion script's Wan-T2V-1.3B dict.  Call: WanPipeline.__call__ defaults
    # (480x832, 81 frames, 50 steps, guidance 5.0); negative prompt of Wan-Video/Wan2.1@9737cba9
    # README.md's diffusers example (the same in diffusers' pipeline_wan.py EXAMPLE_DOC_STRING).
    # The original code (Wan2.1 generate.py) defaults sample_shift to 5.0 for every T2V task; the
    # diffusers folder keeps 3.0.
    # ------------------------------------------------------------------------------
    "wan21_t2v_1_3b": {
        "repo": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "scheduler": {
            "folder": {
                "class": "UniPCMultistepScheduler",
                "config": {
                    "beta_end": 0.02,
                    "beta_schedule": "linear",
                    "beta_start": 0.0001,
                    "disable_corrector": [],
                    "dynamic_thresholding_ratio": 0.995,
                    "final_sigmas_type": "zero",
                    "flow_shift": 3.0,
                    "lower_order_final": True,
                    "num_train_timesteps": 1000,
                    "predict_x0": True,
                    "prediction_type": "flow_prediction",
                    "rescale_betas_zero_snr": False,
                    "sample_max_value": 1.0,
                    "solver_order": 2,
                    "solver_p": None,
                    "solver_type": "bh2",
                    "steps_offset": 0,
                    "thresholding": False,
                    "timestep_spacing": "linspace",
                    "trained_betas": None,
                    "use_beta_sigmas": False,
                    "use_exponential_sigmas": False,
                    "use_flow_sigmas": True,
                    "use_karras_sigmas": False,
                },
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderKLWan",
            "config": {
                "z_dim": 16,
                **WAN_VAE_LATENTS,
            },
            "absent": {},
            "note": "the class has no scaling_factor / shift_factor: WanPipeline normalises latents per "
            "channel, (z - latents_mean) / latents_std",
        },
        "net": {
            "class": "WanTransformer3DModel",
            "config": {
                "in_channels": 16,
                "out_channels": 16,
                "patch_size": [1, 2, 2],
                "qk_norm": "rms_norm_across_heads",
                "cross_attn_norm": True,
                "eps": 1e-06,
                "freq_dim": 256,
                "text_dim": 4096,
                "added_kv_proj_dim": None,
            },
            "absent": {"rope_max_seq_len": 1024, "image_dim": None, "pos_embed_seq_len": None},
        },
        "pipeline": {
            "class": "WanPipeline",
            "call": {
                "num_inference_steps": 50,
                "guidance_scale": 5.0,
                "num_frames": 81,
                "height": 480,
                "width": 832,
                "negative_prompt": "Bright tones, overexposed, static, blurred details, subtitles, style, "
                "works, paintings, images, static, overall gray, worst quality, low quality, JPEG "
                "compression residue, ugly, incomplete, extra fingers, poorly drawn hands, poorly drawn "
                "faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
                "background, three legs, many people in the background, walking backwards",
            },
            "note": "CFG with the negative prompt (guidance_scale > 1); the 1.3B model is 480P only "
            "(Wan2.1 configs SUPPORTED_SIZES t2v-1.3B: 480*832, 832*480)",
        },
        "source": {
            "scheduler": "ostris/ai-toolkit@1bf2f2e3 toolkit/models/wan21/wan21.py (scheduler_configUniPC, "
            "0.33.0.dev0); diffusers@58eb52c0 scripts/convert_wan_to_diffusers.py (T2V flow_shift 3.0); "
            "hub tree page huggingface.co/Wan-AI/Wan2.1-T2V-1.3B-Diffusers/tree/main/scheduler (751 bytes)",
            "vae": "huggingface.co/ai-toolkit/wan2.1-vae config.json (_name_or_path this folder, 0.35.0.dev0); "
            "huggingface.co/diffusers/Wan2.1-VAE config.json; AutoencoderKLWan defaults (diffusers 0.42.1)",
            "net": "diffusers@58eb52c0 scripts/convert_wan_to_diffusers.py (get_transformer_config Wan-T2V-1.3B)",
            "pipeline": "WanPipeline.__call__ (diffusers 0.42.1); Wan-Video/Wan2.1@9737cba9 README.md "
            "(diffusers example: negative_prompt, guidance_scale=5.0, num_frames=81)",
        },
        "unconfirmed": [
            "scheduler.folder: the hub file itself was not seen; the values are ai-toolkit's copy for Wan 2.1 "
            "(not named as this folder's), which agrees with the conversion script and the hub's file size",
            "net: from the conversion script; whether the file carries rope_max_seq_len / image_dim / "
            "pos_embed_seq_len is unconfirmed (absent: the class defaults)",
            "pipeline.call: the Wan-AI/Wan2.1-T2V-1.3B-Diffusers card itself was not seen; size, frames, "
            "steps and guidance are WanPipeline's defaults, the negative prompt the Wan2.1 README's",
        ],
    },
    # ------------------------------------------------------------------------------ Wan 2.1 T2V 14B
    # (Wan-AI/Wan2.1-T2V-14B-Diffusers).  Its scheduler file was not seen.  The hub's model_index.json
    # names FlowMatchEulerDiscreteScheduler at the first diffusers upload (docs corpus:
    # .../Wan2.1-T2V-14B-Diffusers/blob/refs%2Fpr%2F4/model_index.json, 6061db4) and
    # UniPCMultistepScheduler later (.../blob/refs%2Fpr%2F5/model_index.json), as for the 1.3B
    # folder; the conversion script writes flow_shift 3.0 for every T2V model, recorded here.  The
    # card recommends flow_shift 5.0 for 720P: diffusers pipeline_wan.py EXAMPLE_DOC_STRING
    # (UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=5.0), 720x1280, 81
    # frames, guidance 5.0, "5.0 for 720P, 3.0 for 480P"), the same in Wan-Video/Wan2.1@9737cba9
    # README.md (a fresh UniPCMultistepScheduler(prediction_type='flow_prediction',
    # use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0): equal, the other keys being
    # the class defaults).  Transformer: the conversion script's Wan-T2V-14B dict.
    # ------------------------------------------------------------------------------
    "wan21_t2v_14b": {
        "repo": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
        "scheduler": {
            "folder": {
                "class": "UniPCMultistepScheduler",
                "derived": True,
                "config": {
                    "beta_end": 0.02,
                    "beta_schedule": "linear",
                    "beta_start": 0.0001,
                    "disable_corrector": [],
                    "dynamic_thresholding_ratio": 0.995,
                    "final_sigmas_type": "zero",
                    "flow_shift": 3.0,
                    "lower_order_final": True,
                    "num_train_timesteps": 1000,
                    "predict_x0": True,
                    "prediction_type": "flow_prediction",
                    "rescale_betas_zero_snr": False,
                    "sample_max_value": 1.0,
                    "solver_order": 2,
                    "solver_p": None,
                    "solver_type": "bh2",
                    "steps_offset": 0,
                    "thresholding": False,
                    "timestep_spacing": "linspace",
                    "trained_betas": None,
                    "use_beta_sigmas": False,
                    "use_exponential_sigmas": False,
                    "use_flow_sigmas": True,
                    "use_karras_sigmas": False,
                },
            },
            "recommended": {
                "class": "UniPCMultistepScheduler",
                "base": "wan21_t2v_14b",
                "overrides": {"flow_shift": 5.0},
                "call": {"height": 720, "width": 1280},
                "source": "diffusers pipeline_wan.py EXAMPLE_DOC_STRING (diffusers 0.42.1) and "
                "Wan-Video/Wan2.1@9737cba9 README.md: flow_shift = 5.0 '# 5.0 for 720P, 3.0 for 480P', "
                "height=720, width=1280",
            },
        },
        "vae": {"same_as": "wan21_t2v_1_3b"},
        "net": {
            "class": "WanTransformer3DModel",
            "config": {
                "in_channels": 16,
                "out_channels": 16,
                "patch_size": [1, 2, 2],
                "qk_norm": "rms_norm_across_heads",
                "cross_attn_norm": True,
                "eps": 1e-06,
                "freq_dim": 256,
                "text_dim": 4096,
                "added_kv_proj_dim": None,
            },
            "absent": {"rope_max_seq_len": 1024, "image_dim": None, "pos_embed_seq_len": None},
        },
        "pipeline": {
            "class": "WanPipeline",
            "call": {
                "num_inference_steps": 50,
                "guidance_scale": 5.0,
                "num_frames": 81,
                "height": 480,
                "width": 832,
                "negative_prompt": "Bright tones, overexposed, static, blurred details, subtitles, style, "
                "works, paintings, images, static, overall gray, worst quality, low quality, JPEG "
                "compression residue, ugly, incomplete, extra fingers, poorly drawn hands, poorly drawn "
                "faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
                "background, three legs, many people in the background, walking backwards",
            },
            "note": "the folder's scheduler (flow_shift 3.0) is the 480P setting; the card's 720P call is "
            "the recommended scheduler (flow_shift 5.0) at 720x1280",
        },
        "source": {
            "scheduler": "derived: diffusers@58eb52c0 scripts/convert_wan_to_diffusers.py (T2V flow_shift 3.0) on "
            "UniPCMultistepScheduler's defaults, the key set of the 1.3B folder's file (0.33.0.dev0); "
            "hub model_index.json refs/pr/4 and refs/pr/5 (docs corpus)",
            "vae": "same VAE as the 1.3B folder: convert_wan_to_diffusers.py convert_vae() (Wan2.1_VAE.pth)",
            "net": "diffusers@58eb52c0 scripts/convert_wan_to_diffusers.py (get_transformer_config Wan-T2V-14B)",
            "pipeline": "WanPipeline.__call__ (diffusers 0.42.1); Wan-Video/Wan2.1@9737cba9 README.md "
            "(negative_prompt, guidance_scale=5.0, num_frames=81)",
        },
        "unconfirmed": [
            "scheduler.folder: derived, the hub scheduler_config.json was not seen; brief suggested flow_shift "
            "5.0 (720P per card): the card applies 5.0 by replacing the scheduler (recorded as 'recommended'), "
            "and the conversion script writes 3.0 for T2V; the folder's own value is unconfirmed",
            "vae: same_as the 1.3B folder by the conversion script; this folder's vae/config.json not seen",
            "net: from the conversion script (optional keys as in the 1.3B entry)",
        ],
    },
    # ------------------------------------------------------------------------------ Wan 2.2 T2V
    # A14B (Wan-AI/Wan2.2-T2V-A14B-Diffusers): two experts, transformer above boundary_ratio x 1000
    # and transformer_2 below.  Scheduler: ostris/ai-toolkit@0c1f6aa1
    # extensions_built_in/diffusion_models/wan22/wan22_14b_model.py scheduler_configUniPC
    # (_diffusers_version 0.35.0.dev0, with time_shift_type / use_dynamic_shifting; used with
    # boundary_ratio_t2v 0.875); the conversion script writes flow_shift 3.0 and boundary_ratio 0.875
    # for "Wan2.2-T2V-A14B".  NOTE: the original Wan2.2 config (Wan-Video/Wan2.2@42bf4cfa
    # wan/configs/wan_t2v_A14B.py) samples with shift 12.0, 40 steps, guide (3.0 low, 4.0 high),
    # boundary 0.875; the diffusers folder keeps flow_shift 3.0 (diffusers issue #12094).
    # transformer_2/config.json: docs corpus huggingface.co/Wan-AI/Wan2.2-T2V-A14B-Diffusers/blob/
    # refs%2Fpr%2F2/transformer_2/config.json (0.35.0.dev0).  Call: guidance_scale=4.0,
    # guidance_scale_2=3.0, num_inference_steps=40, 720x1280, 81 frames, the Chinese negative
    # prompt (Wan2.2's sample_neg_prompt), as copies of the card's example show.
    # ------------------------------------------------------------------------------
    "wan22_t2v_a14b": {
        "repo": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        "scheduler": {
            "folder": {
                "class": "UniPCMultistepScheduler",
                "config": {
                    "beta_end": 0.02,
                    "beta_schedule": "linear",
                    "beta_start": 0.0001,
                    "disable_corrector": [],
                    "dynamic_thresholding_ratio": 0.995,
                    "final_sigmas_type": "zero",
                    "flow_shift": 3.0,
                    "lower_order_final": True,
                    "num_train_timesteps": 1000,
                    "predict_x0": True,
                    "prediction_type": "flow_prediction",
                    "rescale_betas_zero_snr": False,
                    "sample_max_value": 1.0,
                    "solver_order": 2,
                    "solver_p": None,
                    "solver_type": "bh2",
                    "steps_offset": 0,
                    "thresholding": False,
                    "time_shift_type": "exponential",
                    "timestep_spacing": "linspace",
                    "trained_betas": None,
                    "use_beta_sigmas": False,
                    "use_dynamic_shifting": False,
                    "use_exponential_sigmas": False,
                    "use_flow_sigmas": True,
                    "use_karras_sigmas": False,
                },
            },
            "recommended": None,
        },
        "vae": {"same_as": "wan21_t2v_1_3b"},
        "net": {
            "class": "WanTransformer3DModel",
            "config": {
                "in_channels": 16,
                "out_channels": 16,
                "patch_size": [1, 2, 2],
                "qk_norm": "rms_norm_across_heads",
                "cross_attn_norm": True,
                "eps": 1e-06,
                "freq_dim": 256,
                "text_dim": 4096,
                "added_kv_proj_dim": None,
                "image_dim": None,
                "pos_embed_seq_len": None,
                "rope_max_seq_len": 1024,
            },
            "absent": {},
            "model_index": {"boundary_ratio": 0.875, "transformer_2": "WanTransformer3DModel"},
            "note": "transformer (high noise) runs while t >= boundary_ratio * num_train_timesteps, "
            "transformer_2 (low noise) below it; both share this config",
        },
        "pipeline": {
            "class": "WanPipeline",
            "call": {
                "num_inference_steps": 40,
                "guidance_scale": 4.0,
                "guidance_scale_2": 3.0,
                "num_frames": 81,
                "height": 720,
                "width": 1280,
                "negative_prompt": "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
                "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，"
                "畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走",
            },
            "note": "guidance_scale on transformer's steps, guidance_scale_2 on transformer_2's "
            "(WanPipeline defaults guidance_scale_2 to guidance_scale)",
        },
        "source": {
            "scheduler": "ostris/ai-toolkit@0c1f6aa1 extensions_built_in/diffusion_models/wan22/wan22_14b_model.py "
            "(scheduler_configUniPC, 0.35.0.dev0); diffusers@58eb52c0 scripts/convert_wan_to_diffusers.py",
            "vae": "convert_wan_to_diffusers.py convert_vae() for every Wan2.2 model but TI2V (Wan2.1_VAE.pth)",
            "net": "hub transformer_2/config.json (docs corpus, refs/pr/2 page); model_index boundary_ratio: "
            "convert_wan_to_diffusers.py (WanPipeline(..., boundary_ratio=0.875) for Wan2.2 T2V)",
            "pipeline": "card example as copied in public repos (e.g. the QEfficient Wan example and other "
            "callers: guidance_scale=4.0, guidance_scale_2=3.0, num_inference_steps=40, num_frames=81, "
            "720x1280, Chinese negative prompt); Wan-Video/Wan2.2@42bf4cfa wan/configs/shared_config.py "
            "sample_neg_prompt",
        },
        "unconfirmed": [
            "scheduler.folder: ai-toolkit's copy for Wan 2.2 14B, not a mirror of the folder's file",
            "net: only transformer_2/config.json was seen (a PR ref page); transformer/config.json assumed equal",
            "pipeline.call: the card itself was not seen; values from third-party copies of its example",
            "vae: this folder's vae/config.json not seen (same_as the 1.3B folder by the conversion script)",
        ],
    },
    # ------------------------------------------------------------------------------ CogVideoX-2b
    # (THUDM/CogVideoX-2b).  Scheduler: docs corpus huggingface.co/THUDM/CogVideoX-2b/blob/
    # refs%2Fpr%2F2/scheduler/scheduler_config.json (00da947 "Update scheduler/scheduler_config.json",
    # 482 bytes, the size main's bf24ed3 shows), identical to kijai/ComfyUI-CogVideoXWrapper@645365c0
    # configs/scheduler_config_2b.json (0.30.0.dev0); diffusers@58eb52c0
    # scripts/convert_cogvideox_to_diffusers.py writes these keys (snr_shift_scale 3.0 for 2b).
    # VAE: scaling_factor 1.15258426 (conversion script "For CogVideoX-2B, scaling_factor is
    # 1.15258426"; THUDM/CogVideo@e519eced sat/configs/cogvideox_2b.yaml scale_factor 1.15258426).
    # Transformer: kijai/ComfyUI-CogVideoXWrapper@645365c0 configs/transformer_config_2b.json (sine-
    # cosine positions, use_rotary_positional_embeddings false).  Call: CogVideoXPipeline defaults
    # and the card's example (guidance_scale=6, num_inference_steps=50, num_frames=49; 480x720 from
    # the transformer's sample size 60x90 x 8).
    # ------------------------------------------------------------------------------
    "cogvideox_2b": {
        "repo": "THUDM/CogVideoX-2b",
        "scheduler": {
            "folder": {
                "class": "CogVideoXDDIMScheduler",
                "config": {
                    "beta_end": 0.012,
                    "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085,
                    "clip_sample": False,
                    "clip_sample_range": 1.0,
                    "num_train_timesteps": 1000,
                    "prediction_type": "v_prediction",
                    "rescale_betas_zero_snr": True,
                    "sample_max_value": 1.0,
                    "set_alpha_to_one": True,
                    "snr_shift_scale": 3.0,
                    "steps_offset": 0,
                    "timestep_spacing": "trailing",
                    "trained_betas": None,
                },
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderKLCogVideoX",
            "config": {
                "scaling_factor": 1.15258426,
                "shift_factor": None,
                "latents_mean": None,
                "latents_std": None,
                "force_upcast": True,
            },
            "absent": {},
        },
        "net": {
            "class": "CogVideoXTransformer3DModel",
            "config": {
                "in_channels": 16,
                "out_channels": 16,
                "patch_size": 2,
                "sample_frames": 49,
                "sample_height": 60,
                "sample_width": 90,
                "time_embed_dim": 512,
                "max_text_seq_length": 226,
                "flip_sin_to_cos": True,
                "freq_shift": 0,
                "spatial_interpolation_scale": 1.875,
                "temporal_interpolation_scale": 1.0,
                "temporal_compression_ratio": 4,
                "use_rotary_positional_embeddings": False,
            },
            "absent": {
                "patch_size_t": None,
                "use_learned_positional_embeddings": False,
                "ofs_embed_dim": None,
                "patch_bias": True,
            },
        },
        "pipeline": {
            "class": "CogVideoXPipeline",
            "call": {
                "num_inference_steps": 50,
                "guidance_scale": 6.0,
                "num_frames": 49,
                "height": 480,
                "width": 720,
                "use_dynamic_cfg": False,
            },
            "note": "no negative prompt (the pipeline uses ''); use_dynamic_cfg is the pipeline default "
            "(False): the card's example does not pass it.  THUDM/CogVideo inference/cli_demo.py swaps in "
            "CogVideoXDPMScheduler with use_dynamic_cfg=True ('for DDIM scheduler, it should be False')",
        },
        "source": {
            "scheduler": "huggingface.co/THUDM/CogVideoX-2b/blob/refs%2Fpr%2F2/scheduler/scheduler_config.json "
            "(docs corpus); kijai/ComfyUI-CogVideoXWrapper@645365c0 configs/scheduler_config_2b.json; "
            "diffusers@58eb52c0 scripts/convert_cogvideox_to_diffusers.py",
            "vae": "diffusers@58eb52c0 scripts/convert_cogvideox_to_diffusers.py (--scaling_factor default "
            "1.15258426, 'For CogVideoX-2B'); THUDM/CogVideo@e519eced sat/configs/cogvideox_2b.yaml",
            "net": "kijai/ComfyUI-CogVideoXWrapper@645365c0 configs/transformer_config_2b.json (0.30.0.dev0)",
            "pipeline": "CogVideoXPipeline.__call__ (diffusers 0.42.1: 50 steps, guidance_scale 6, "
            "use_dynamic_cfg False; size and frames from the transformer config); card example as copied "
            "in kungfuai/CVlization examples/generative/video_generation/cogvideox/generate.py "
            "(num_inference_steps=50, num_frames=49, guidance_scale=6)",
        },
        "unconfirmed": [
            "vae: the folder's vae/config.json not seen (scaling_factor from the conversion script and the "
            "training config; force_upcast / shift / latents_* as the 5b copy and the class defaults)",
            "net: the transformer config is kijai's copy, not a mirror of the hub page",
            "pipeline.call: the card itself was not seen; brief said 'use_dynamic_cfg per the card': the "
            "copies of the card's example do not pass it (pipeline default False)",
        ],
    },
    # ------------------------------------------------------------------------------ CogVideoX-5b
    # (THUDM/CogVideoX-5b).  Scheduler: kijai/ComfyUI-CogVideoXWrapper@1e269716
    # configs/scheduler_config_5b.json (0.31.0.dev0; snr_shift_scale 1.0), the conversion script's
    # keys with "For 5B, it is 1.0"; THUDM/CogVideo@e519eced sat/configs/cogvideox_5b.yaml
    # shift_scale 1.0, scale_factor 0.7.  VAE: kijai/ComfyUI-CogVideoXWrapper@1e269716
    # configs/vae_config.json (scaling_factor 0.7, force_upcast true).  Transformer:
    # kijai/ComfyUI-CogVideoXWrapper@645365c0 configs/transformer_config_5b.json (3-D rotary
    # positions).  Call: as the 2b.
    # ------------------------------------------------------------------------------
    "cogvideox_5b": {
        "repo": "THUDM/CogVideoX-5b",
        "scheduler": {
            "folder": {
                "class": "CogVideoXDDIMScheduler",
                "config": {
                    "beta_end": 0.012,
                    "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085,
                    "clip_sample": False,
                    "clip_sample_range": 1.0,
                    "num_train_timesteps": 1000,
                    "prediction_type": "v_prediction",
                    "rescale_betas_zero_snr": True,
                    "sample_max_value": 1.0,
                    "set_alpha_to_one": True,
                    "snr_shift_scale": 1.0,
                    "steps_offset": 0,
                    "timestep_spacing": "trailing",
                    "trained_betas": None,
                },
            },
            "recommended": None,
        },
        "vae": {
            "class": "AutoencoderKLCogVideoX",
            "config": {
                "scaling_factor": 0.7,
                "shift_factor": None,
                "latents_mean": None,
                "latents_std": None,
                "force_upcast": True,
            },
            "absent": {},
        },
        "net": {
            "class": "CogVideoXTransformer3DModel",
            "config": {
                "in_channels": 16,
                "out_channels": 16,
                "patch_size": 2,
                "sample_frames": 49,
                "sample_height": 60,
                "sample_width": 90,
                "time_embed_dim": 512,
                "max_text_seq_length": 226,
                "flip_sin_to_cos": True,
                "freq_shift": 0,
                "spatial_interpolation_scale": 1.875,
                "temporal_interpolation_scale": 1.0,
                "temporal_compression_ratio": 4,
                "use_rotary_positional_embeddings": True,
            },
            "absent": {
                "patch_size_t": None,
                "use_learned_positional_embeddings": False,
                "ofs_embed_dim": None,
                "patch_bias": True,
            },
        },
        "pipeline": {
            "class": "CogVideoXPipeline",
            "call": {
                "num_inference_steps": 50,
                "guidance_scale": 6.0,
                "num_frames": 49,
                "height": 480,
                "width": 720,
                "use_dynamic_cfg": False,
            },
            "note": "as the 2b; THUDM/CogVideo cli_demo.py recommends CogVideoXDPMScheduler with "
            "use_dynamic_cfg=True for 5B (not the folder's scheduler, not recorded here)",
        },
        "source": {
            "scheduler": "kijai/ComfyUI-CogVideoXWrapper@1e269716 configs/scheduler_config_5b.json; diffusers@58eb52c0 "
            "scripts/convert_cogvideox_to_diffusers.py ('For 5B, it is 1.0'); THUDM/CogVideo@e519eced "
            "sat/configs/cogvideox_5b.yaml (shift_scale 1.0)",
            "vae": "kijai/ComfyUI-CogVideoXWrapper@1e269716 configs/vae_config.json (scaling_factor 0.7); "
            "THUDM/CogVideo@e519eced sat/configs/cogvideox_5b.yaml (scale_factor 0.7)",
            "net": "kijai/ComfyUI-CogVideoXWrapper@645365c0 configs/transformer_config_5b.json",
            "pipeline": "CogVideoXPipeline.__call__ (diffusers 0.42.1); card example as copied in "
            "kungfuai/CVlization examples/generative/video_generation/cogvideox/generate.py",
        },
        "unconfirmed": [
            "scheduler.folder: kijai's copy (named for 5b, 0.31.0.dev0), not a mirror of the hub file; the hub "
            "tree pages show a 482-byte file for CogVideoX-5b mirrors (vdo/CogVideoX-5b), kijai's copy is 481 "
            "bytes (no final newline): same content as far as can be told",
            "vae: kijai's vae_config.json is not named for 5b, but carries 5b's scaling_factor 0.7",
            "net: kijai's transformer_config_5b.json lacks _class_name; not a verbatim hub copy",
            "pipeline.call: the card itself was not seen (see cogvideox_2b)",
        ],
    },
}


def _entry(key):
    if key not in PUBLISHED:
        raise KeyError(f"no published config recorded for {key!r}; known: {sorted(PUBLISHED)}")
    return PUBLISHED[key]


def scheduler_config(key, which="folder"):
    """(class name, config dict) of a model's scheduler.

    ``which`` is ``"folder"`` (the folder's scheduler_config.json), ``"recommended"``
    (the card's replacement) or the name of one of ``scheduler["alternatives"]``.
    A recommended scheduler is returned as the dict the card hands to
    ``Class.from_config``: the base folder's config with the card's overrides on top.
    Keys the folder file lacks are left to the new class's defaults; diffusers would
    pass the folder class's defaults instead, which agree for every pair recorded
    here (epsilon prediction, "leading" spacing).  Keys the new class does not take
    (``skip_prk_steps``, ...) are ignored by ``from_config`` with a warning.
    """
    sched = _entry(key)["scheduler"]
    if which == "folder":
        spec = sched["folder"]
    elif which == "recommended":
        spec = sched.get("recommended")
        if spec is None:
            raise KeyError(f"{key!r}: the card recommends no other scheduler than the folder's")
    else:
        spec = sched.get("alternatives", {}).get(which)
        if spec is None:
            raise KeyError(
                f"{key!r}: no scheduler {which!r}; have folder, recommended, "
                f"{sorted(sched.get('alternatives', {}))}"
            )
    if "same_as" in spec:
        return scheduler_config(spec["same_as"], "folder")
    if "base" in spec:
        _, config = scheduler_config(spec["base"], "folder")
        config.update(spec["overrides"])
        return spec["class"], config
    return spec["class"], dict(spec["config"])

"""Stable Diffusion 3 / 3.5: the MMDiT with CLIP x2 + T5 text on a rectified flow."""

from __future__ import annotations

from .dit import DiT


class StableDiffusion3(DiT):
    """SD3Transformer2DModel: rectified flow (velocity), CLIP x2 + T5 text, pooled projections."""

    name = "sd3"
    pipelines = (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3PAGPipeline",
        "StableDiffusion3PAGImg2ImgPipeline",
    )
    default_strength, truncate_strength = 0.6, False  # as its img2img pipeline
    vae_shift = True
    # T5 tokens appended to the CLIP ones (zeros without a T5): diffusers' default, or a folder's
    # diffguide.json "max_sequence_length" (the built-in MMDiT has none: 0)
    max_sequence_length = 256

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts,
            prompts,
            prompts,
            device=device,
            num_images_per_prompt=n,
            do_classifier_free_guidance=True,
            negative_prompt=negatives,
            negative_prompt_2=negatives,
            negative_prompt_3=negatives,
            **{"max_sequence_length": self.max_sequence_length, **extra},
        )
        return {"text": pos, "pooled": pooled}, {"text": neg, "pooled": neg_pooled}

    def forward(self, x, tm, cond, net=None):
        return (self.net if net is None else net)(
            hidden_states=x,
            timestep=tm,
            encoder_hidden_states=cond["text"],
            pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]

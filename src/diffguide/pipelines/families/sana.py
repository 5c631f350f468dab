"""Sana and SANA-Sprint: Gemma-2 text, a deep-compression autoencoder, DPM-Solver on a flow /
TrigFlow."""

from __future__ import annotations

import torch

from .base import TransformerFamily


class Sana(TransformerFamily):
    """SanaTransformer2DModel (Sana): Gemma-2 text with a mask (and the pipeline's own "complex
    human instruction" prepended), a deep-compression autoencoder (AutoencoderDC), DPM-Solver on a
    rectified flow. Without resolution binning (the pipeline's option), as PixArt here."""

    name = "sana"
    pipelines = ("SanaPipeline", "SanaPAGPipeline")
    default_strength, truncate_strength = 0.6, False  # as its img2img pipeline
    default_guidance = "cfg:scale=4.5"  # SanaPipeline's default scale
    max_sequence_length = 300

    @property
    def net(self):
        return self.pipe.transformer

    @property
    def factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", None) or 32)

    @property
    def multiple(self) -> int:
        return self.factor * self.net.config.patch_size

    def _instruction(self):
        import inspect

        return (
            inspect.signature(type(self.pipe).__call__)
            .parameters["complex_human_instruction"]
            .default
        )

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        pos, mask, neg, neg_mask = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=negative,
            negative_prompt=negatives or "",
            num_images_per_prompt=n,
            device=device,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self._instruction(),
            **extra,
        )
        return {"text": pos, "mask": mask}, ({"text": neg, "mask": neg_mask} if negative else None)

    def forward(self, x, tm, cond, net=None):
        return (self.net if net is None else net)(
            x,
            encoder_hidden_states=cond["text"],
            encoder_attention_mask=cond["mask"],
            timestep=tm * self.net.config.timestep_scale,
            guidance=cond.get("guidance"),
            attention_kwargs=cond.get("attention"),
            return_dict=False,
        )[0]

    def posterior(self, images):
        vae = self.pipe.vae  # a deterministic encoder
        return vae.encode(
            images.to(vae.device, vae.dtype)
        ).latent.float() * vae.config.scaling_factor, None


class SanaSprint(Sana):
    """SANA-Sprint: the Sana transformer distilled by sCM in TrigFlow, with an embedded guidance
    input.
    The sampler holds x / sigma_d (``TrigFlowSchedule``). The network is a flow model at flow time
    tau = sin t / (cos t + sin t): its input is x scaled to flow coordinates, x (cos t + sin t)^-1 =
    x sqrt(tau^2 + (1 - tau)^2), and its velocity v gives x0 = x_in - tau v (the same, in exact
    arithmetic, as SanaSprintPipeline's TrigFlow conversion), so it is a Pred like any other and
    every sampler and guidance method runs on it; its own sampler is ``consistency``."""

    name = "sana_sprint"
    pipelines = ("SanaSprintPipeline", "SanaSprintImg2ImgPipeline")
    default_guidance = "none"

    def embedded_default(self):
        return (
            4.5 if getattr(self.net.config, "guidance_embeds", False) else None
        )  # SanaSprintPipeline's

    def embed_guidance(self, cond, value, b):
        if not getattr(self.net.config, "guidance_embeds", False):
            return super().embed_guidance(cond, value, b)
        g = torch.full((b,), float(value), dtype=torch.float32, device=cond["text"].device).to(
            cond["text"].dtype
        )
        return {**cond, "guidance": g * self.net.config.guidance_embeds_scale}

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        def one(texts):
            embeds, mask = self.pipe.encode_prompt(
                texts,
                num_images_per_prompt=n,
                device=device,
                clean_caption=False,
                max_sequence_length=self.max_sequence_length,
                complex_human_instruction=self._instruction(),
                **extra,
            )
            return {"text": embeds, "mask": mask}

        pos = one(prompts)
        if not negative:
            return pos, None
        return pos, one(negatives if negatives is not None else [""] * len(prompts))

    def forward(self, x, tm, cond, net=None):
        tau = tm.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        x_in = x * torch.sqrt(tau * tau + (1 - tau) ** 2)
        v = (self.net if net is None else net)(
            x_in,
            encoder_hidden_states=cond["text"],
            encoder_attention_mask=cond["mask"],
            guidance=cond.get("guidance"),
            timestep=tm,
            attention_kwargs=cond.get("attention"),
            return_dict=False,
        )[0]
        return x_in - tau * v.to(x.dtype)

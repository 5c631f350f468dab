"""Flux.1 dev and schnell: packed latent tokens, embedded guidance, a resolution-dependent shift."""

from __future__ import annotations

import torch

from .base import TransformerFamily


def pack2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents to (B, H/2 x W/2, 4C) tokens of 2 x 2 patches (Flux's, Qwen-Image's
    packing)."""
    b, c, h, w = x.shape
    return (
        x.view(b, c, h // 2, 2, w // 2, 2)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(b, (h // 2) * (w // 2), c * 4)
    )


def unpack2(tokens: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class Flux(TransformerFamily):
    """FluxTransformer2DModel (Flux.1 dev / schnell): rectified flow, T5 + CLIP pooled text, latents
    packed 2 x 2 into tokens with positional ids, an embedded guidance input on guidance-distilled
    models (dev), a resolution-dependent shift. The sampler works on the unpacked latent (B, C, H,
    W),
    which is also the shape the initial noise is drawn in (as diffusers draws it, then packs); only
    the network sees tokens. True CFG is ``guidance="cfg:scale=4"`` with a negative prompt."""

    name = "flux"
    default_strength, truncate_strength = 0.6, False  # as its img2img pipeline
    vae_shift = True
    default_guidance = "none"  # guidance-distilled (dev) or timestep-distilled (schnell)
    grid = {"spacing": "uniform_t"}  # FluxPipeline passes sigmas linspace(1, 1/n, n), then 0
    max_sequence_length = 512
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline")

    @property
    def net(self):
        return self.pipe.transformer

    @property
    def channels(self) -> int:
        return self.net.config.in_channels // 4

    @property
    def factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", None) or super().factor)

    @property
    def multiple(self) -> int:
        return 2 * self.factor

    @property
    def default_size(self) -> int:
        return int(getattr(self.pipe, "default_sample_size", 64)) * self.factor

    def seq_len(self, height, width):
        return (height // self.multiple) * (width // self.multiple)

    def embedded_default(self):
        return (
            3.5 if getattr(self.net.config, "guidance_embeds", False) else None
        )  # FluxPipeline's default

    def notice(self, prompts):
        """T5 reads up to max_sequence_length tokens (CLIP only feeds the pooled vector)."""
        return self.long_prompts(
            prompts, getattr(self.pipe, "tokenizer_2", None), self.max_sequence_length
        )

    def embed_guidance(self, cond, value, b):
        if not getattr(self.net.config, "guidance_embeds", False):
            return super().embed_guidance(cond, value, b)
        return {
            **cond,
            "guidance": torch.full(
                (b,), float(value), dtype=torch.float32, device=cond["text"].device
            ),
        }

    def _encode(self, texts, n, device, extra, prefix=""):
        keep = {
            k[len(prefix) :]: v
            for k, v in extra.items()
            if k.startswith(prefix) and (prefix or not k.startswith("negative_"))
        }
        embeds, pooled, _ = self.pipe.encode_prompt(
            texts,
            texts,
            device=device,
            num_images_per_prompt=n,
            max_sequence_length=self.max_sequence_length,
            **keep,
        )
        return {"text": embeds, "pooled": pooled}

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        pos = self._encode(prompts, n, device, extra)
        if not negative:
            return pos, None
        if negatives is None and prompts is not None:
            negatives = [""] * len(prompts)
        return pos, self._encode(negatives, n, device, extra, "negative_")

    def forward(self, x, tm, cond, net=None):
        b, c, h, w = x.shape
        tokens = pack2(x)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
        txt_ids = torch.zeros(cond["text"].shape[1], 3, device=x.device, dtype=cond["text"].dtype)
        out = (self.net if net is None else net)(
            hidden_states=tokens,
            timestep=tm / 1000,
            guidance=cond.get("guidance"),
            pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["text"],
            txt_ids=txt_ids,
            img_ids=img_ids.reshape(-1, 3),
            joint_attention_kwargs=cond.get("attention"),
            return_dict=False,
        )[0]
        return unpack2(out, c, h, w)

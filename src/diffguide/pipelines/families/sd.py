"""Stable Diffusion 1.x/2.x and SDXL: UNets with CLIP text, long prompts in 75-token windows."""

from __future__ import annotations

import torch

from .base import Family, guidance_embedding


def clip_windows(
    tok, prompts: list, window: int, always: bool = False
) -> list[list[list[int]]] | None:
    """Each prompt's tokens cut into windows of ``window`` (no special tokens), every prompt given
    the same number of windows (empty ones pad); None when every prompt fits one window, unless
    ``always``."""
    ids = [tok(p or "", add_special_tokens=False).input_ids for p in prompts]
    if all(len(i) <= window for i in ids) and not always:
        return None
    k = max(1, max(-(-len(i) // window) for i in ids))
    return [[i[j * window : (j + 1) * window] for j in range(k)] for i in ids]


def clip_window_states(
    tok, encoder, windows: list[list[int]], device, layer: int | None, final_norm: bool
):
    """Hidden states of each window ([BOS] + tokens + [EOS], padded as the tokenizer pads) joined
    along the sequence, and the pooled output of the first window. ``layer`` None: the last hidden
    state; else hidden_states[layer] (with the final layer norm where ``final_norm``)."""
    L = tok.model_max_length
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [[tok.bos_token_id, *w, tok.eos_token_id] + [pad] * (L - len(w) - 2) for w in windows]
    ids = torch.tensor(rows, device=device)
    mask = (
        torch.tensor([[1] * (len(w) + 2) + [0] * (L - len(w) - 2) for w in windows], device=device)
        if getattr(encoder.config, "use_attention_mask", False)
        else None
    )
    out = encoder(ids, attention_mask=mask, output_hidden_states=layer is not None)
    h = out[0] if layer is None else out.hidden_states[layer]
    if layer is not None and final_norm:  # transformers 5 flattened CLIPTextModel (no .text_model)
        h = getattr(encoder, "text_model", encoder).final_layer_norm(h)
    return h.reshape(1, -1, h.shape[-1]), out[0][:1] if out[0].ndim == 2 else None


class StableDiffusion(Family):
    """UNet2DConditionModel with CLIP text conditioning (SD 1.x/2.x, pixel-space text-to-image).
    Prompts longer than the CLIP window are encoded in windows of 75 tokens and concatenated."""

    name = "sd"
    pipelines = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionPAGPipeline",
        "StableDiffusionPAGImg2ImgPipeline",
        "LatentConsistencyModelPipeline",
        "LatentConsistencyModelImg2ImgPipeline",
    )

    @property
    def chunks(self) -> bool:
        """Long prompts in windows where the text encoder is CLIP with SD's 77-token window."""
        tok, enc = getattr(self.pipe, "tokenizer", None), getattr(self.pipe, "text_encoder", None)
        return (
            tok is not None
            and enc is not None
            and type(enc).__name__.startswith("CLIPTextModel")
            and tok.model_max_length == 77
        )

    def _long(self, prompts, negatives, device, extra) -> dict | None:
        """prompt_embeds / negative_prompt_embeds for prompts longer than the window, or with
        clip_skip (diffusers' own clip_skip path needs transformers' old CLIPTextModel layout); else
        None (diffusers' encode_prompt)."""
        skip = extra.get("clip_skip")
        if prompts is None or "prompt_embeds" in extra or not (self.chunks or skip is not None):
            return None
        tok = self.pipe.tokenizer
        windows = clip_windows(
            tok,
            list(prompts) + list(negatives or [""] * len(prompts)),
            tok.model_max_length - 2,
            always=skip is not None,
        )
        if windows is None:
            return None
        if len(windows[0]) > 1 and not self.chunks:
            windows = [w[:1] for w in windows]  # cut as diffusers cuts; the notice says so
        layer = None if skip is None else -(skip + 1)
        states = [
            clip_window_states(tok, self.pipe.text_encoder, w, device, layer, True)[0]
            for w in windows
        ]
        dtype = self.pipe.text_encoder.dtype
        return {
            "prompt_embeds": torch.cat(states[: len(prompts)]).to(dtype),
            "negative_prompt_embeds": torch.cat(states[len(prompts) :]).to(dtype),
        }

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        long = self._long(prompts, negatives, device, extra)
        if long is not None:
            prompts, negatives, extra = None, None, {**extra, **long}
        pos, neg = self.pipe.encode_prompt(
            prompts, device, n, True, negative_prompt=negatives, **extra
        )
        return {"text": pos}, {"text": neg}

    def embedded_default(self):
        """An LCM student's guidance-scale embedding (time_cond_proj_dim): LCM's default w 8.5."""
        return 8.5 if getattr(self.net.config, "time_cond_proj_dim", None) else None

    def embed_guidance(self, cond, value, b):
        """LCM: w = value - 1, sinusoidally embedded (get_guidance_scale_embedding) as
        timestep_cond."""
        dim = getattr(self.net.config, "time_cond_proj_dim", None)
        if not dim:
            return super().embed_guidance(cond, value, b)
        emb = guidance_embedding(torch.full((b,), float(value) - 1.0), dim)
        return {**cond, "timestep_cond": emb.to(cond["text"].device, self.net.dtype)}

    def forward(self, x, tm, cond, net=None):
        """net: another UNet of this config (a distillation student) in place of the pipeline's."""
        return (self.net if net is None else net)(
            x,
            tm,
            encoder_hidden_states=cond["text"],
            added_cond_kwargs=cond.get("added"),
            timestep_cond=cond.get("timestep_cond"),
            cross_attention_kwargs=cond.get("attention"),
            return_dict=False,
        )[0]

    scale_embedding = True  # UNet2DConditionModel's time_cond_proj_dim

    def student_pipeline(self, net, scheduler=None):
        """With LCM's scheduler, SD 1.x/2.x's own pipeline becomes diffusers'
        LatentConsistencyModelPipeline; any other (SDXL's) keeps its class and takes the
        scheduler."""
        from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

        p = self.pipe
        if scheduler is None or type(p) is not StableDiffusionPipeline:
            return super().student_pipeline(net, scheduler)
        return LatentConsistencyModelPipeline(
            vae=getattr(p, "vae", None),
            text_encoder=p.text_encoder,
            tokenizer=p.tokenizer,
            unet=net,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


class StableDiffusionXL(StableDiffusion):
    """SDXL: two text encoders, pooled text embedding and size/crop time ids as added conditions.
    Long prompts: windows through both encoders, the pooled embedding of the first window."""

    name = "sdxl"
    pipelines = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLPAGPipeline",
        "StableDiffusionXLPAGImg2ImgPipeline",
    )
    default_strength = 0.3  # StableDiffusionXLImg2ImgPipeline's
    vae_stats = vae_upcast = True

    @property
    def chunks(self) -> bool:
        tok = getattr(self.pipe, "tokenizer_2", None)
        return tok is not None and tok.model_max_length == 77

    def _long(self, prompts, negatives, device, extra):
        if prompts is None or "prompt_embeds" in extra or not self.chunks:
            return None
        pairs = [
            (t, e)
            for t, e in (
                (self.pipe.tokenizer, self.pipe.text_encoder),
                (self.pipe.tokenizer_2, self.pipe.text_encoder_2),
            )
            if t is not None
        ]
        texts = list(prompts) + list(negatives or [""] * len(prompts))
        windows = clip_windows(pairs[-1][0], texts, pairs[-1][0].model_max_length - 2)
        if windows is None:
            return None
        skip = extra.get("clip_skip")
        layer = -2 if skip is None else -(skip + 2)
        embeds, pooled = [], []
        for w in windows:
            parts = [clip_window_states(t, e, w, device, layer, False) for t, e in pairs]
            embeds.append(torch.cat([h for h, _ in parts], dim=-1))
            pooled.append(parts[-1][1])
        b, dtype = len(prompts), self.pipe.text_encoder_2.dtype
        out = {
            "prompt_embeds": torch.cat(embeds[:b]).to(dtype),
            "pooled_prompt_embeds": torch.cat(pooled[:b]).to(dtype),
        }
        if negatives is None and self.pipe.config.force_zeros_for_empty_prompt:
            out.update(
                negative_prompt_embeds=torch.zeros_like(out["prompt_embeds"]),
                negative_pooled_prompt_embeds=torch.zeros_like(out["pooled_prompt_embeds"]),
            )
        else:
            out.update(
                negative_prompt_embeds=torch.cat(embeds[b:]).to(dtype),
                negative_pooled_prompt_embeds=torch.cat(pooled[b:]).to(dtype),
            )
        return out

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        long = self._long(prompts, negatives, device, extra)
        if long is not None:
            prompts, negatives, extra = None, None, {**extra, **long}
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts,
            device=device,
            num_images_per_prompt=n,
            do_classifier_free_guidance=True,
            negative_prompt=negatives,
            **extra,
        )
        return {"text": pos, "added": {"text_embeds": pooled}}, {
            "text": neg,
            "added": {"text_embeds": neg_pooled},
        }

    def extra(self, cond, height, width):
        te2 = getattr(self.pipe, "text_encoder_2", None)
        proj = (
            te2.config.projection_dim
            if te2 is not None
            else int(cond["added"]["text_embeds"].shape[-1])
        )
        ids = self.pipe._get_add_time_ids(
            (height, width),
            (0, 0),
            (height, width),
            dtype=cond["text"].dtype,
            text_encoder_projection_dim=proj,
        )
        ids = ids.to(cond["text"].device).expand(cond["text"].shape[0], -1)
        return {**cond, "added": {**cond["added"], "time_ids": ids}}

"""Model families: how to condition, call and decode each kind of diffusers network.

A family turns prompts into condition dicts (text encoders run through the diffusers pipeline's own
``encode_prompt``, so tokenisation and padding are diffusers'), calls the network as
``forward(x, model_time, cond)`` for ``NetDenoiser``, and decodes latents to images in [0, 1].
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Sequence

import torch

# Tokenizers keep their padding and truncation settings on the object: diffusers' encode_prompt
# tokenises with "max_length" and then "longest", so two threads encoding at once can swap them and
# get text embeddings of the wrong length. Encoding is cheap next to sampling; it runs one at a time.
ENCODE_LOCK = threading.RLock()
UPCAST_LOCK = threading.Lock()


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight w (x 1000), as LCM's pipelines compute it."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = (w.float() * 1000.0)[:, None] * freq[None]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class Family:
    """Base recipe. ``net`` is the denoising network; ``factor`` the pixel size of one latent cell.

    ``default_guidance`` is the method a model runs with when none is asked for. A model with an
    embedded guidance input (a guidance-distilled Flux, an LCM student) gives its default value by
    ``embedded_default`` and writes a value into its condition by ``embed_guidance``."""

    name = "base"
    conditional = True
    default_guidance = "cfg"
    grid = None  # the time grid the pipeline itself passes (overriding the scheduler's), if any
    # the VAE config keys the family's diffusers pipeline reads beside scaling_factor (and so diffguide):
    # shift_factor (SD3, Flux), latents_mean / latents_std and force_upcast in float16 (SDXL)
    vae_shift = vae_stats = vae_upcast = False

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def net(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def channels(self) -> int:
        return self.net.config.in_channels

    @property
    def factor(self) -> int:
        vae = getattr(self.pipe, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    @property
    def default_size(self) -> int:
        size = self.net.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.factor

    @property
    def multiple(self) -> int:
        """Height and width must be multiples of this."""
        return self.factor

    def learned_sigma(self) -> bool:
        cfg = self.net.config
        return getattr(cfg, "out_channels", None) == 2 * cfg.in_channels

    def encode(self, prompts: list, negatives: list, n: int, device, negative: bool = True,
               **extra) -> tuple[dict, dict]:
        """Condition dicts for prompts and negatives, n images each. ``extra``: diffusers'
        ``encode_prompt`` arguments (prompt_embeds, negative_prompt_embeds, clip_skip, lora_scale...).
        ``negative`` False: no guidance method needs the negative, and a family whose negative costs a
        second text encoding (Flux) may skip it."""
        raise NotImplementedError

    def embedded_default(self) -> float | None:
        """The default value of the network's embedded guidance input, or None if it has none."""
        return None

    def embed_guidance(self, cond: dict, value: float, b: int) -> dict:
        raise ValueError(f"{type(self.net).__name__} has no embedded guidance input")

    def seq_len(self, height: int, width: int) -> int:
        """Latent tokens of an image of this size (for resolution-dependent schedules)."""
        return (height // self.factor) * (width // self.factor)

    def default_guidance_for(self, negative: bool) -> str:
        """The method a model runs with when none is asked for (``negative``: a negative prompt was given)."""
        return self.default_guidance

    def notice(self, prompts: Sequence) -> str | None:
        """A line saying which prompts the text encoder cannot read whole (None: all fit). Families
        that encode long prompts in windows (``chunks``) have nothing to say."""
        tok = getattr(self.pipe, "tokenizer", None)
        if tok is None or self.chunks or not self.conditional:
            return None
        window = tok.model_max_length - 2
        long = [p for p in prompts if isinstance(p, str) and len(tok(p, add_special_tokens=False).input_ids) > window]
        if not long:
            return None
        return (f"{len(long)} prompt(s) longer than {type(self.net).__name__}'s text window of {window} tokens; "
                f"only the first {window} are read ({long[0][:40]!r}...)")

    chunks = False  # long prompts are encoded in windows and concatenated (A1111's practice)

    def extra(self, cond: dict, height: int, width: int) -> dict:
        """Resolution-dependent conditions (SDXL time ids, PixArt resolution); none by default."""
        return cond

    def forward(self, x: torch.Tensor, tm: torch.Tensor, cond: Any, net=None) -> torch.Tensor:
        """The network's raw output at x, model time tm; ``net``: another network of this config (a
        distillation student) in place of the pipeline's."""
        raise NotImplementedError

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images in [-1, 1], [B, 3, H, W], to the network's space: the mean and standard deviation
        of the VAE posterior (std None: a deterministic encoder, or a pixel-space model). The
        inverse of ``decode``."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return images.float(), None
        cfg = vae.config
        with self._vae_dtype(vae) as dtype:
            dist = vae.encode(images.to(vae.device, dtype)).latent_dist
        z, std = dist.mean.float(), dist.std.float()
        mean, spread = self._latent_stats(cfg)
        if mean is not None:
            shape = (1, -1, 1, 1)
            scale = cfg.scaling_factor / torch.tensor(spread, device=z.device).view(shape)
            return (z - torch.tensor(mean, device=z.device).view(shape)) * scale, std * scale
        return (z - self._shift(cfg)) * cfg.scaling_factor, std * cfg.scaling_factor

    def _latent_stats(self, cfg):
        """The VAE's per-channel latents_mean and latents_std where the family's pipeline reads them."""
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        return (mean, std) if self.vae_stats and mean is not None and std is not None else (None, None)

    def _shift(self, cfg) -> float:
        return (getattr(cfg, "shift_factor", None) or 0.0) if self.vae_shift else 0.0

    @contextlib.contextmanager
    def _vae_dtype(self, vae):
        """The dtype to run the VAE in: float32 for a float16 VAE with force_upcast where the family's
        pipeline upcasts (SDXL's fp16 VAE overflows), one thread at a time (the cast changes the shared
        VAE); else its own."""
        dtype = vae.dtype
        if not (self.vae_upcast and dtype == torch.float16 and getattr(vae.config, "force_upcast", False)):
            yield dtype
            return
        with UPCAST_LOCK:
            vae.to(torch.float32)
            try:
                yield torch.float32
            finally:
                vae.to(dtype)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior mean of ``posterior``: training data in the network's space."""
        return self.posterior(images)[0]

    default_strength = 0.8  # StableDiffusionImg2ImgPipeline's
    truncate_strength = True  # the UNet img2img pipelines take int(steps * strength) first

    def start_index(self, steps: int, strength: float) -> int:
        """How many of ``steps`` image-to-image skips (SDEdit at ``strength``), rounded as the
        family's img2img pipeline rounds (they differ when steps * strength is not a whole number)."""
        if self.truncate_strength:
            return steps - min(int(steps * strength), steps)
        return int(max(steps - min(steps * strength, steps), 0))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1], float32, [B, 3, H, W]."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None:  # pixel-space model: x is the image in [-1, 1]
            return (x.float() / 2 + 0.5).clamp(0, 1)
        cfg = vae.config
        mean, std = self._latent_stats(cfg)
        if mean is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            mean = torch.tensor(mean, device=x.device).view(shape)
            std = torch.tensor(std, device=x.device).view(shape)
            z = x * std / cfg.scaling_factor + mean
        else:
            z = x / cfg.scaling_factor + self._shift(cfg)
        with self._vae_dtype(vae) as dtype:
            img = vae.decode(z.to(dtype), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)


def clip_windows(tok, prompts: list, window: int, always: bool = False) -> list[list[list[int]]] | None:
    """Each prompt's tokens cut into windows of ``window`` (no special tokens), every prompt given
    the same number of windows (empty ones pad); None when every prompt fits one window, unless
    ``always``."""
    ids = [tok(p or "", add_special_tokens=False).input_ids for p in prompts]
    if all(len(i) <= window for i in ids) and not always:
        return None
    k = max(1, max(-(-len(i) // window) for i in ids))
    return [[i[j * window:(j + 1) * window] for j in range(k)] for i in ids]


def clip_window_states(tok, encoder, windows: list[list[int]], device, layer: int | None, final_norm: bool):
    """Hidden states of each window ([BOS] + tokens + [EOS], padded as the tokenizer pads) joined
    along the sequence, and the pooled output of the first window. ``layer`` None: the last hidden
    state; else hidden_states[layer] (with the final layer norm where ``final_norm``)."""
    L = tok.model_max_length
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [[tok.bos_token_id, *w, tok.eos_token_id] + [pad] * (L - len(w) - 2) for w in windows]
    ids = torch.tensor(rows, device=device)
    mask = torch.tensor([[1] * (len(w) + 2) + [0] * (L - len(w) - 2) for w in windows], device=device) \
        if getattr(encoder.config, "use_attention_mask", False) else None
    out = encoder(ids, attention_mask=mask, output_hidden_states=layer is not None)
    h = out[0] if layer is None else out.hidden_states[layer]
    if layer is not None and final_norm:  # transformers 5 flattened CLIPTextModel (no .text_model)
        h = getattr(encoder, "text_model", encoder).final_layer_norm(h)
    return h.reshape(1, -1, h.shape[-1]), out[0][:1] if out[0].ndim == 2 else None


class StableDiffusion(Family):
    """UNet2DConditionModel with CLIP text conditioning (SD 1.x/2.x, pixel-space text-to-image).
    Prompts longer than the CLIP window are encoded in windows of 75 tokens and concatenated."""

    name = "sd"

    @property
    def chunks(self) -> bool:
        """Long prompts in windows where the text encoder is CLIP with SD's 77-token window."""
        tok, enc = getattr(self.pipe, "tokenizer", None), getattr(self.pipe, "text_encoder", None)
        return tok is not None and enc is not None and type(enc).__name__.startswith("CLIPTextModel") \
            and tok.model_max_length == 77

    def _long(self, prompts, negatives, device, extra) -> dict | None:
        """prompt_embeds / negative_prompt_embeds for prompts longer than the window, or with
        clip_skip (diffusers' own clip_skip path needs transformers' old CLIPTextModel layout); else
        None (diffusers' encode_prompt)."""
        skip = extra.get("clip_skip")
        if prompts is None or "prompt_embeds" in extra or not (self.chunks or skip is not None):
            return None
        tok = self.pipe.tokenizer
        windows = clip_windows(tok, list(prompts) + list(negatives or [""] * len(prompts)),
                               tok.model_max_length - 2, always=skip is not None)
        if windows is None:
            return None
        if len(windows[0]) > 1 and not self.chunks:
            windows = [w[:1] for w in windows]  # cut as diffusers cuts; the notice says so
        layer = None if skip is None else -(skip + 1)
        states = [clip_window_states(tok, self.pipe.text_encoder, w, device, layer, True)[0] for w in windows]
        dtype = self.pipe.text_encoder.dtype
        return {"prompt_embeds": torch.cat(states[:len(prompts)]).to(dtype),
                "negative_prompt_embeds": torch.cat(states[len(prompts):]).to(dtype)}

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        long = self._long(prompts, negatives, device, extra)
        if long is not None:
            prompts, negatives, extra = None, None, {**extra, **long}
        pos, neg = self.pipe.encode_prompt(prompts, device, n, True, negative_prompt=negatives, **extra)
        return {"text": pos}, {"text": neg}

    def embedded_default(self):
        """An LCM student's guidance-scale embedding (time_cond_proj_dim): LCM's default w 8.5."""
        return 8.5 if getattr(self.net.config, "time_cond_proj_dim", None) else None

    def embed_guidance(self, cond, value, b):
        """LCM: w = value - 1, sinusoidally embedded (get_guidance_scale_embedding) as timestep_cond."""
        dim = getattr(self.net.config, "time_cond_proj_dim", None)
        if not dim:
            return super().embed_guidance(cond, value, b)
        emb = guidance_embedding(torch.full((b,), float(value) - 1.0), dim)
        return {**cond, "timestep_cond": emb.to(cond["text"].device, self.net.dtype)}

    def forward(self, x, tm, cond, net=None):
        """net: another UNet of this config (a distillation student) in place of the pipeline's."""
        return (self.net if net is None else net)(x, tm, encoder_hidden_states=cond["text"], added_cond_kwargs=cond.get("added"),
                                 timestep_cond=cond.get("timestep_cond"),
                                 cross_attention_kwargs=cond.get("attention"), return_dict=False)[0]


class StableDiffusionXL(StableDiffusion):
    """SDXL: two text encoders, pooled text embedding and size/crop time ids as added conditions.
    Long prompts: windows through both encoders, the pooled embedding of the first window."""

    name = "sdxl"
    default_strength = 0.3  # StableDiffusionXLImg2ImgPipeline's
    vae_stats = vae_upcast = True

    @property
    def chunks(self) -> bool:
        tok = getattr(self.pipe, "tokenizer_2", None)
        return tok is not None and tok.model_max_length == 77

    def _long(self, prompts, negatives, device, extra):
        if prompts is None or "prompt_embeds" in extra or not self.chunks:
            return None
        pairs = [(t, e) for t, e in ((self.pipe.tokenizer, self.pipe.text_encoder),
                                     (self.pipe.tokenizer_2, self.pipe.text_encoder_2)) if t is not None]
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
        out = {"prompt_embeds": torch.cat(embeds[:b]).to(dtype), "pooled_prompt_embeds": torch.cat(pooled[:b]).to(dtype)}
        if negatives is None and self.pipe.config.force_zeros_for_empty_prompt:
            out.update(negative_prompt_embeds=torch.zeros_like(out["prompt_embeds"]),
                       negative_pooled_prompt_embeds=torch.zeros_like(out["pooled_prompt_embeds"]))
        else:
            out.update(negative_prompt_embeds=torch.cat(embeds[b:]).to(dtype),
                       negative_pooled_prompt_embeds=torch.cat(pooled[b:]).to(dtype))
        return out

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        long = self._long(prompts, negatives, device, extra)
        if long is not None:
            prompts, negatives, extra = None, None, {**extra, **long}
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=n, do_classifier_free_guidance=True,
            negative_prompt=negatives, **extra)
        return {"text": pos, "added": {"text_embeds": pooled}}, {"text": neg, "added": {"text_embeds": neg_pooled}}

    def extra(self, cond, height, width):
        te2 = getattr(self.pipe, "text_encoder_2", None)
        proj = te2.config.projection_dim if te2 is not None else int(cond["added"]["text_embeds"].shape[-1])
        ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width),
                                          dtype=cond["text"].dtype, text_encoder_projection_dim=proj)
        ids = ids.to(cond["text"].device).expand(cond["text"].shape[0], -1)
        return {**cond, "added": {**cond["added"], "time_ids": ids}}


class Unconditional(Family):
    """UNet2DModel (DDPM-style pixel or latent models): no condition; prompts are ignored."""

    name = "unconditional"
    conditional = False

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        _no_extra(self, extra)
        return {}, {}

    def forward(self, x, tm, cond, net=None):
        return (self.net if net is None else net)(x, tm, return_dict=False)[0]


class DiT(Family):
    """DiTTransformer2DModel: class-conditional; the negative is the null class (num_classes)."""

    name = "dit"

    @property
    def net(self):
        return self.pipe.transformer

    @property
    def multiple(self) -> int:
        return self.factor * self.net.config.patch_size

    def labels(self, prompts: Sequence) -> list[int]:
        out = []
        names = {k.lower(): v for k, v in (getattr(self.pipe, "labels", None) or {}).items()}
        classes = self.net.config.num_embeds_ada_norm
        for p in prompts:
            if isinstance(p, str) and p.strip().lstrip("-").isdigit():
                p = int(p)
            if isinstance(p, str):
                if p.strip().lower() not in names:
                    raise ValueError(f"unknown class label {p!r}; give a class index in 0..{classes - 1}"
                                     + (" or a name from pipe.labels" if names else ""))
                p = names[p.strip().lower()]
            if not 0 <= int(p) < classes:
                raise ValueError(f"class label {p} out of range 0..{classes - 1}")
            out.append(int(p))
        return out

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        _no_extra(self, extra)
        pos = torch.tensor(self.labels(prompts), device=device).repeat_interleave(n)
        null = self.net.config.num_embeds_ada_norm
        if negatives is None or all(q in (None, "") for q in negatives):
            neg = torch.full_like(pos, null)
        else:
            neg = torch.tensor(self.labels(negatives), device=device).repeat_interleave(n)
        return {"class": pos}, {"class": neg}

    def forward(self, x, tm, cond, net=None):
        return (self.net if net is None else net)(x, timestep=tm, class_labels=cond["class"], return_dict=False)[0]


class PixArt(DiT):
    """PixArtTransformer2DModel with T5 text conditioning and an attention mask."""

    name = "pixart"

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        if prompts is not None:
            negatives = negatives or [""] * len(prompts)  # its encode_prompt has no None default
        pos, mask, neg, neg_mask = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt=negatives or "",
            num_images_per_prompt=n, device=device, clean_caption=False, **extra)
        return {"text": pos, "mask": mask}, {"text": neg, "mask": neg_mask}

    def extra(self, cond, height, width):
        res = ratio = None
        if getattr(self.net, "use_additional_conditions", False):
            b, dt, dev = cond["text"].shape[0], cond["text"].dtype, cond["text"].device
            res = torch.tensor([[height, width]], dtype=dt, device=dev).expand(b, -1)
            ratio = torch.tensor([[height / width]], dtype=dt, device=dev).expand(b, -1)
        return {**cond, "resolution": res, "aspect_ratio": ratio}

    def forward(self, x, tm, cond, net=None):
        return (self.net if net is None else net)(x, encoder_hidden_states=cond["text"], encoder_attention_mask=cond["mask"],
                        timestep=tm, added_cond_kwargs={"resolution": cond.get("resolution"),
                                                        "aspect_ratio": cond.get("aspect_ratio")},
                        return_dict=False)[0]


class StableDiffusion3(DiT):
    """SD3Transformer2DModel: rectified flow (velocity), CLIP x2 + T5 text, pooled projections."""

    name = "sd3"
    default_strength, truncate_strength = 0.6, False  # as its img2img pipeline
    vae_shift = True

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, prompts, prompts, device=device, num_images_per_prompt=n,
            do_classifier_free_guidance=True, negative_prompt=negatives, negative_prompt_2=negatives,
            negative_prompt_3=negatives, **extra)
        return {"text": pos, "pooled": pooled}, {"text": neg, "pooled": neg_pooled}

    def forward(self, x, tm, cond, net=None):
        return (self.net if net is None else net)(hidden_states=x, timestep=tm, encoder_hidden_states=cond["text"],
                        pooled_projections=cond["pooled"], return_dict=False)[0]


def pack2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents to (B, H/2 x W/2, 4C) tokens of 2 x 2 patches (Flux's, Qwen-Image's packing)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack2(tokens: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class Flux(Family):
    """FluxTransformer2DModel (Flux.1 dev / schnell): rectified flow, T5 + CLIP pooled text, latents
    packed 2 x 2 into tokens with positional ids, an embedded guidance input on guidance-distilled
    models (dev), a resolution-dependent shift. The sampler works on the unpacked latent (B, C, H, W),
    which is also the shape the initial noise is drawn in (as diffusers draws it, then packs); only
    the network sees tokens. True CFG is ``guidance="cfg:scale=4"`` with a negative prompt."""

    name = "flux"
    default_strength, truncate_strength = 0.6, False  # as its img2img pipeline
    vae_shift = True
    default_guidance = "none"  # guidance-distilled (dev) or timestep-distilled (schnell)
    grid = {"spacing": "uniform_t"}  # FluxPipeline passes sigmas linspace(1, 1/n, n), then 0
    max_sequence_length = 512

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
        return 3.5 if getattr(self.net.config, "guidance_embeds", False) else None  # FluxPipeline's default

    def notice(self, prompts):
        """T5 reads up to max_sequence_length tokens (CLIP only feeds the pooled vector)."""
        tok = getattr(self.pipe, "tokenizer_2", None)
        if tok is None:
            return None
        long = [p for p in prompts if isinstance(p, str)
                and len(tok(p, add_special_tokens=False).input_ids) > self.max_sequence_length - 1]
        if not long:
            return None
        return (f"{len(long)} prompt(s) longer than Flux's T5 window of {self.max_sequence_length} tokens; the "
                f"rest is not read ({long[0][:40]!r}...)")

    def embed_guidance(self, cond, value, b):
        if not getattr(self.net.config, "guidance_embeds", False):
            return super().embed_guidance(cond, value, b)
        return {**cond, "guidance": torch.full((b,), float(value), dtype=torch.float32, device=cond["text"].device)}

    def _encode(self, texts, n, device, extra, prefix=""):
        keep = {k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix) and (prefix or not k.startswith("negative_"))}
        embeds, pooled, _ = self.pipe.encode_prompt(texts, texts, device=device, num_images_per_prompt=n,
                                                    max_sequence_length=self.max_sequence_length, **keep)
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
        out = (self.net if net is None else net)(hidden_states=tokens, timestep=tm / 1000, guidance=cond.get("guidance"),
                       pooled_projections=cond["pooled"], encoder_hidden_states=cond["text"], txt_ids=txt_ids,
                       img_ids=img_ids.reshape(-1, 3), joint_attention_kwargs=cond.get("attention"),
                       return_dict=False)[0]
        return unpack2(out, c, h, w)


class QwenImage(Flux):
    """QwenImageTransformer2DModel (Qwen-Image): rectified flow, Qwen2.5-VL text with a mask, 2 x 2
    packed tokens, a 3-D VAE with per-channel latent mean and std, a resolution-dependent shift.
    diffusers' true CFG (a negative prompt and true_cfg_scale 4) renormalises the guided output per
    token to the conditional one's norm: the default here, ``cfg:scale=4,renorm=2,rescale_space=flow``,
    when a negative prompt is given (like diffusers, no guidance without one)."""

    name = "qwenimage"
    max_sequence_length = 1024
    true_cfg = "cfg:scale=4,renorm=2,rescale_space=flow"

    def default_guidance_for(self, negative: bool) -> str:
        return self.true_cfg if negative else "none"

    def embedded_default(self):
        return None if not getattr(self.net.config, "guidance_embeds", False) else 1.0

    def notice(self, prompts):
        return None  # a 1024-token window

    def _encode(self, texts, n, device, extra, prefix=""):
        keep = {k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix) and (prefix or not k.startswith("negative_"))}
        embeds, mask = self.pipe.encode_prompt(texts, device=device, num_images_per_prompt=n,
                                               max_sequence_length=self.max_sequence_length, **keep)
        return {"text": embeds, "mask": mask}

    def forward(self, x, tm, cond, net=None):
        b, c, h, w = x.shape
        out = (self.net if net is None else net)(hidden_states=pack2(x), timestep=tm / 1000, guidance=cond.get("guidance"),
                       encoder_hidden_states=cond["text"], encoder_hidden_states_mask=cond.get("mask"),
                       img_shapes=[[(1, h // 2, w // 2)]] * b, attention_kwargs=cond.get("attention"),
                       return_dict=False)[0]
        return unpack2(out, c, h, w)

    def _stats(self, like):
        cfg = self.pipe.vae.config
        shape = (1, cfg.z_dim, 1, 1)
        return (torch.tensor(cfg.latents_mean, device=like.device).view(shape),
                torch.tensor(cfg.latents_std, device=like.device).view(shape))

    def decode(self, x):
        vae = self.pipe.vae
        mean, std = self._stats(x)
        z = (x.float() * std + mean)[:, :, None]  # a one-frame video
        img = vae.decode(z.to(vae.dtype), return_dict=False)[0][:, :, 0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def posterior(self, images):
        vae = self.pipe.vae
        dist = vae.encode(images.to(vae.device, vae.dtype)[:, :, None]).latent_dist
        z = dist.mean[:, :, 0].float()
        mean, std = self._stats(z)
        return (z - mean) / std, dist.std[:, :, 0].float() / std


class Sana(Family):
    """SanaTransformer2DModel (Sana): Gemma-2 text with a mask (and the pipeline's own "complex human
    instruction" prepended), a deep-compression autoencoder (AutoencoderDC), DPM-Solver on a
    rectified flow. Without resolution binning (the pipeline's option), as PixArt here."""

    name = "sana"
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

        return inspect.signature(type(self.pipe).__call__).parameters["complex_human_instruction"].default

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        pos, mask, neg, neg_mask = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=negative, negative_prompt=negatives or "", num_images_per_prompt=n,
            device=device, clean_caption=False, max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self._instruction(), **extra)
        return {"text": pos, "mask": mask}, ({"text": neg, "mask": neg_mask} if negative else None)

    def forward(self, x, tm, cond, net=None):
        return (self.net if net is None else net)(x, encoder_hidden_states=cond["text"], encoder_attention_mask=cond["mask"],
                        timestep=tm * self.net.config.timestep_scale, guidance=cond.get("guidance"),
                        attention_kwargs=cond.get("attention"), return_dict=False)[0]

    def posterior(self, images):
        vae = self.pipe.vae  # a deterministic encoder
        return vae.encode(images.to(vae.device, vae.dtype)).latent.float() * vae.config.scaling_factor, None


class SanaSprint(Sana):
    """SANA-Sprint: the Sana transformer distilled by sCM in TrigFlow, with an embedded guidance input.
    The sampler holds x / sigma_d (``TrigFlowSchedule``). The network is a flow model at flow time
    tau = sin t / (cos t + sin t): its input is x scaled to flow coordinates, x (cos t + sin t)^-1 =
    x sqrt(tau^2 + (1 - tau)^2), and its velocity v gives x0 = x_in - tau v (the same, in exact
    arithmetic, as SanaSprintPipeline's TrigFlow conversion), so it is a Pred like any other and every
    sampler and guidance method runs on it; its own sampler is ``consistency``."""

    name = "sana_sprint"
    default_guidance = "none"

    def embedded_default(self):
        return 4.5 if getattr(self.net.config, "guidance_embeds", False) else None  # SanaSprintPipeline's

    def embed_guidance(self, cond, value, b):
        if not getattr(self.net.config, "guidance_embeds", False):
            return super().embed_guidance(cond, value, b)
        g = torch.full((b,), float(value), dtype=torch.float32, device=cond["text"].device).to(cond["text"].dtype)
        return {**cond, "guidance": g * self.net.config.guidance_embeds_scale}

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        def one(texts):
            embeds, mask = self.pipe.encode_prompt(texts, num_images_per_prompt=n, device=device, clean_caption=False,
                                                   max_sequence_length=self.max_sequence_length,
                                                   complex_human_instruction=self._instruction(), **extra)
            return {"text": embeds, "mask": mask}
        pos = one(prompts)
        if not negative:
            return pos, None
        return pos, one(negatives if negatives is not None else [""] * len(prompts))

    def forward(self, x, tm, cond, net=None):
        tau = tm.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        x_in = x * torch.sqrt(tau * tau + (1 - tau) ** 2)
        v = (self.net if net is None else net)(x_in, encoder_hidden_states=cond["text"], encoder_attention_mask=cond["mask"],
                     guidance=cond.get("guidance"), timestep=tm, attention_kwargs=cond.get("attention"),
                     return_dict=False)[0]
        return x_in - tau * v.to(x.dtype)


def _no_extra(family: Family, extra: dict) -> None:
    if extra:
        raise ValueError(f"{type(family.net).__name__} models take no {', '.join(sorted(extra))}")


def family_of(pipe) -> Family:
    """Pick the recipe from the pipeline's networks."""
    tr = getattr(pipe, "transformer", None)
    if tr is not None:
        cls = type(tr).__name__
        table = {"DiTTransformer2DModel": DiT, "PixArtTransformer2DModel": PixArt,
                 "SD3Transformer2DModel": StableDiffusion3, "FluxTransformer2DModel": Flux,
                 "QwenImageTransformer2DModel": QwenImage, "SanaTransformer2DModel": Sana}
        if cls == "SanaTransformer2DModel" and type(pipe.scheduler).__name__ == "SCMScheduler":
            return SanaSprint(pipe)
        if cls in table:
            return table[cls](pipe)
        raise ValueError(f"unsupported transformer {cls}; supported: {', '.join(table)}")
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    cls = type(unet).__name__
    if cls == "UNet2DModel":
        return Unconditional(pipe)
    if cls != "UNet2DConditionModel":
        raise ValueError(f"unsupported unet {cls}; supported: UNet2DConditionModel, UNet2DModel")
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return StableDiffusionXL(pipe)
    return StableDiffusion(pipe)

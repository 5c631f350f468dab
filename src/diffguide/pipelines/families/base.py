"""The base recipe every model family derives from, and what families share: the encode and
upcast locks, the guidance embedding of LCM students."""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Sequence

import torch

# Tokenizers keep their padding and truncation settings on the object: diffusers' encode_prompt
# tokenises with "max_length" and then "longest", so two threads encoding at once can swap them and
# get text embeddings of the wrong length. Encoding is cheap next to sampling; it runs one at a
# time.
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
    # the VAE config keys the family's diffusers pipeline reads beside scaling_factor (and so
    # diffguide): shift_factor (SD3, Flux), latents_mean / latents_std and force_upcast in float16
    # (SDXL)
    vae_shift = vae_stats = vae_upcast = False
    video = False  # latents [B, C, frames, h, w]; decode gives [B, 3, frames, H, W]
    default_frames = 1
    first_frame = False  # image= is the clip's first frame (image to video), not an SDEdit start
    temporal = 1  # frames per latent frame (a video VAE's temporal compression)
    # the diffusers pipeline classes the family serves (a subclass of one too; none listed: any):
    # ``family_of`` refuses another pipeline on the same network (CogVideoX image to video)
    pipelines: tuple[str, ...] = ()

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
    def default_hw(self) -> tuple[int, int]:
        """The default (height, width): square unless the family's pipeline says otherwise."""
        return self.default_size, self.default_size

    def finish(self, x: torch.Tensor, cond) -> torch.Tensor:
        """The sampled latents as the family's pipeline leaves them before decoding (``cond``:
        the conditional branch's conditions)."""
        return x

    def draw(self, noise, shape: tuple, device) -> torch.Tensor:
        """The initial noise of ``shape`` as the family's pipeline draws it (its own layout)."""
        return noise.randn(shape, device=device)

    def expert(self):
        """A two-expert model's second network and the network time below which it runs (Wan
        2.2's transformer_2 under boundary_ratio x 1000); None for one network."""
        return None

    def latent_frames(self, frames: int) -> int:
        """The latent frames of a clip of ``frames`` frames (1 for an image model)."""
        return (frames - 1) // self.temporal + 1

    def _memo(self, key, make):
        """``make()`` once per ``key`` (shapes, dtypes, devices of recent calls: a few kept), made
        as ordinary tensors: a later call that differentiates (a noise optimiser, distillation)
        may save them for backward, which an inference-mode tensor refuses."""
        memo = self.__dict__.setdefault("_memos", {})
        if key not in memo:
            if len(memo) >= 16:
                memo.clear()
            with torch.inference_mode(False):
                memo[key] = make()
        return memo[key]

    @property
    def multiple(self) -> int:
        """Height and width must be multiples of this."""
        return self.factor

    def learned_sigma(self) -> bool:
        cfg = self.net.config
        return getattr(cfg, "out_channels", None) == 2 * cfg.in_channels

    def encode(
        self, prompts: list, negatives: list, n: int, device, negative: bool = True, **extra
    ) -> tuple[dict, dict]:
        """Condition dicts for prompts and negatives, n images each. ``extra``: diffusers'
        ``encode_prompt`` arguments (prompt_embeds, negative_prompt_embeds, clip_skip,
        lora_scale...).
        ``negative`` False: no guidance method needs the negative, and a family whose negative
        costs a second text encoding (Flux) may skip it."""
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
        """The method a model runs with when none is asked for (``negative``: a negative prompt was
        given)."""
        return self.default_guidance

    def notice(self, prompts: Sequence) -> str | None:
        """A line saying which prompts the text encoder cannot read whole (None: all fit). Families
        that encode long prompts in windows (``chunks``) have nothing to say."""
        tok = getattr(self.pipe, "tokenizer", None)
        if tok is None or self.chunks or not self.conditional:
            return None
        window = tok.model_max_length - 2
        long = [
            p
            for p in prompts
            if isinstance(p, str) and len(tok(p, add_special_tokens=False).input_ids) > window
        ]
        if not long:
            return None
        return (
            f"{len(long)} prompt(s) longer than {type(self.net).__name__}'s text window of "
            f"{window} tokens; only the first {window} are read ({long[0][:40]!r}...)"
        )

    chunks = False  # long prompts are encoded in windows and concatenated (A1111's practice)

    def long_prompts(self, prompts: Sequence, tok, max_length: int, encoder: str = "T5"):
        """The notice of a T5-style encoder that reads ``max_length`` tokens, the last of them its
        end token (diffusers' encode_prompt truncates the rest); None when ``tok`` is None or all
        fit."""
        if tok is None:
            return None
        long = [
            p
            for p in prompts
            if isinstance(p, str)
            and len(tok(p, add_special_tokens=False).input_ids) > max_length - 1
        ]
        if not long:
            return None
        return (
            f"{len(long)} prompt(s) longer than {type(self.net).__name__}'s {encoder} window of "
            f"{max_length} tokens; the rest is not read ({long[0][:40]!r}...)"
        )

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
        """The VAE's per-channel latents_mean and latents_std where the family's pipeline reads
        them."""
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        return (
            (mean, std) if self.vae_stats and mean is not None and std is not None else (None, None)
        )

    def _shift(self, cfg) -> float:
        return (getattr(cfg, "shift_factor", None) or 0.0) if self.vae_shift else 0.0

    @contextlib.contextmanager
    def _vae_dtype(self, vae):
        """The dtype to run the VAE in: float32 for a float16 VAE with force_upcast where the
        family's
        pipeline upcasts (SDXL's fp16 VAE overflows), one thread at a time (the cast changes the
        shared VAE); else its own."""
        dtype = vae.dtype
        if not (
            self.vae_upcast
            and dtype == torch.float16
            and getattr(vae.config, "force_upcast", False)
        ):
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
        family's img2img pipeline rounds (they differ when steps * strength is not a whole
        number)."""
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

    # -- what distillation asks (distill/); ``net``: this family's network or a trained copy of it

    component = "unet"  # the pipeline component that holds the network
    scale_embedding = False  # the network takes LCM's guidance-scale embedding (timestep_cond)

    def bottleneck(self, net) -> torch.nn.Module:
        """Where DMD2's GAN head reads features (Yin et al. 2024, Sec. 4.3): a UNet's mid block."""
        return net.mid_block

    def bottleneck_width(self, net) -> int:
        """The channels of ``bottleneck(net)``'s output."""
        return net.config.block_out_channels[-1]

    def feature_blocks(self, net) -> list:
        """The blocks whose outputs LADD's heads read (Sauer et al. 2024): a UNet's mid and up
        blocks."""
        return [net.mid_block, *net.up_blocks]

    def feature_widths(self, net) -> list[int]:
        """The channels of ``feature_blocks(net)``'s outputs."""
        channels = net.config.block_out_channels
        return [channels[-1], *reversed(channels)]

    def student_pipeline(self, net, scheduler=None):
        """The family's pipeline with ``net`` (a distilled student) as its network and, if given,
        ``scheduler`` as its scheduler."""
        swap = {self.component: net, **({"scheduler": scheduler} if scheduler is not None else {})}
        return type(self.pipe)(**{**self.pipe.components, **swap})


class TransformerFamily(Family):
    """The transformer families' answers to distillation's questions: a stack of blocks."""

    component = "transformer"

    def bottleneck(self, net):
        """The middle transformer block."""
        blocks = net.transformer_blocks
        return blocks[len(blocks) // 2]

    def bottleneck_width(self, net):
        return net.config.num_attention_heads * net.config.attention_head_dim

    def feature_blocks(self, net):
        """Four blocks spread along the depth (SANA-Sprint, arXiv 2503.09641, reads 2, 8, 14, 19
        of 20)."""
        blocks = list(net.transformer_blocks)
        n = len(blocks)
        picks = range(n)
        if n > 4:  # the middles of four equal quarters
            picks = sorted({min(n - 1, round((2 * k + 1) * n / 8)) for k in range(4)})
        return [blocks[i] for i in picks]

    def feature_widths(self, net):
        return [self.bottleneck_width(net)] * len(self.feature_blocks(net))


def latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-channel VAE's latents_mean and latents_std shaped to broadcast against ``like``
    ([B, C, ...]: Qwen-Image's and Wan's 3-D VAEs)."""
    cfg = vae.config
    shape = (1, cfg.z_dim) + (1,) * (like.ndim - 2)
    return (
        torch.tensor(cfg.latents_mean, device=like.device).view(shape),
        torch.tensor(cfg.latents_std, device=like.device).view(shape),
    )


def encode_pair(family, prompts, negatives, n, device, negative, **extra) -> tuple[dict, dict]:
    """The text of pipelines whose encode_prompt returns (prompt, negative) embeddings and takes
    num_videos_per_prompt (Wan, CogVideoX); no negative embedding: the prompt's stands in."""
    pos, neg = family.pipe.encode_prompt(
        prompt=prompts,
        negative_prompt=None if negatives is None else [q or "" for q in negatives],
        do_classifier_free_guidance=negative,
        num_videos_per_prompt=n,
        max_sequence_length=family.max_sequence_length,
        device=device,
        **extra,
    )
    return {"text": pos}, ({"text": neg} if neg is not None else {"text": pos})


def _no_extra(family: Family, extra: dict) -> None:
    if extra:
        raise ValueError(f"{type(family.net).__name__} models take no {', '.join(sorted(extra))}")

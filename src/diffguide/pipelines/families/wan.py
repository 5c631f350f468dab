"""Wan 2.1 (text to video): a 3-D patch transformer on a rectified flow, UMT5 text, Wan's causal
3-D VAE with per-channel statistics."""

from __future__ import annotations

import torch

from .base import TransformerFamily


class Wan(TransformerFamily):
    """WanTransformer3DModel (WanPipeline): latents [B, 16, (frames - 1) / 4 + 1, H / 8, W / 8],
    the velocity as output, the prompt through UMT5 (512 tokens), CFG 5 by default; 480 x 832, 81
    frames by default, as the pipeline."""

    name = "wan"
    video = True
    default_frames = 81
    max_sequence_length = 512

    @property
    def net(self):
        return self.pipe.transformer

    @property
    def factor(self) -> int:
        return self.pipe.vae.config.scale_factor_spatial

    @property
    def temporal(self) -> int:
        return self.pipe.vae.config.scale_factor_temporal

    @property
    def multiple(self) -> int:
        return self.factor * self.net.config.patch_size[1]

    @property
    def default_hw(self) -> tuple[int, int]:
        return 480, 832

    def expert(self):
        second = getattr(self.pipe, "transformer_2", None)
        ratio = getattr(self.pipe.config, "boundary_ratio", None)
        if second is None or ratio is None:
            return None
        return second, ratio * self.pipe.scheduler.config.num_train_timesteps

    def frames(self, frames: int) -> int:
        if frames % self.temporal != 1:
            raise ValueError(
                f"num_frames must be {self.temporal} k + 1 for {type(self.net).__name__} (e.g. 81 "
                f"or 33), got {frames}"
            )
        return frames

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal + 1

    def seq_len(self, height, width):
        return (height // self.factor) * (width // self.factor)

    def notice(self, prompts):
        return None  # 512 tokens

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        pos, neg = self.pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=None if negatives is None else [q or "" for q in negatives],
            do_classifier_free_guidance=negative,
            num_videos_per_prompt=n,
            max_sequence_length=self.max_sequence_length,
            device=device,
            **extra,
        )
        return {"text": pos}, ({"text": neg} if neg is not None else {"text": pos})

    def forward(self, x, tm, cond, net=None):
        if getattr(self.pipe.config, "expand_timesteps", False):  # Wan 2.2 TI2V: one per token
            _, p_h, p_w = self.net.config.patch_size
            b, _, f, h, w = x.shape
            tm = tm.reshape(-1, 1).expand(b, f * (h // p_h) * (w // p_w))
        return (self.net if net is None else net)(
            hidden_states=x,
            timestep=tm,
            encoder_hidden_states=cond["text"],
            attention_kwargs=cond.get("attention"),
            return_dict=False,
        )[0]

    def _stats(self, like):
        cfg = self.pipe.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        return (
            torch.tensor(cfg.latents_mean, device=like.device).view(shape),
            torch.tensor(cfg.latents_std, device=like.device).view(shape),
        )

    def decode(self, x):
        vae = self.pipe.vae
        mean, std = self._stats(x)
        video = vae.decode((x.float() * std + mean).to(vae.dtype), return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1)

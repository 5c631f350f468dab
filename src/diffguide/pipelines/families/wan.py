"""Wan 2.1 (text to video): a 3-D patch transformer on a rectified flow, UMT5 text, Wan's causal
3-D VAE with per-channel statistics."""

from __future__ import annotations

import functools

import torch

from .base import TransformerFamily, encode_pair, latent_stats


class Wan(TransformerFamily):
    """WanTransformer3DModel (WanPipeline): latents [B, 16, (frames - 1) / 4 + 1, H / 8, W / 8],
    the velocity as output, the prompt through UMT5 (512 tokens), CFG 5 by default; 480 x 832, 81
    frames by default, as the pipeline."""

    name = "wan"
    video = True
    default_frames = 81
    max_sequence_length = 512
    pipelines = ("WanPipeline",)

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

    @functools.cached_property
    def per_token(self) -> bool:
        """Wan 2.2 TI2V-5B (expand_timesteps): one time per latent token; image to video puts the
        first frame's latents in the clip's first latent frame, whose tokens run at time 0."""
        return bool(getattr(self.pipe.config, "expand_timesteps", False))

    def notice(self, prompts):
        tok = getattr(self.pipe, "tokenizer", None)
        return self.long_prompts(prompts, tok, self.max_sequence_length, "UMT5")

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        return encode_pair(self, prompts, negatives, n, device, negative, **extra)

    def inputs(self, x, tm, cond):
        """The network's hidden states and timestep at latents x, model time tm."""
        if self.per_token:  # one per token, as WanPipeline passes them
            _, p_h, p_w = self.net.config.patch_size
            b, _, f, h, w = x.shape
            tm = tm.reshape(-1, 1).expand(b, f * (h // p_h) * (w // p_w))
        return x, tm

    def forward(self, x, tm, cond, net=None):
        x_in, tm = self.inputs(x, tm, cond)
        return (self.net if net is None else net)(
            hidden_states=x_in,
            timestep=tm,
            encoder_hidden_states=cond["text"],
            encoder_hidden_states_image=cond.get("image"),
            attention_kwargs=cond.get("attention"),
            return_dict=False,
        )[0]

    def _stats(self, like):
        return latent_stats(self.pipe.vae, like)

    def decode(self, x):
        vae = self.pipe.vae
        mean, std = self._stats(x)
        video = vae.decode((x.float() * std + mean).to(vae.dtype), return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1)


class WanImageToVideo(Wan):
    """WanImageToVideoPipeline (Wan 2.1 I2V): ``image`` is the clip's first frame, not an SDEdit
    start. The network reads the noisy latents beside a mask of the given frames and the VAE's
    encoding of the first frame followed by black frames (channels 16 + 4 + 16), and, where it has
    an image input (``image_dim``), the CLIP vision encoder's penultimate states."""

    name = "wan_i2v"
    first_frame = True
    pipelines = ("WanImageToVideoPipeline",)

    def __init__(self, pipe):
        super().__init__(pipe)
        if getattr(self.net.config, "pos_embed_seq_len", None) is not None:
            raise ValueError(
                "Wan first-last-frame models (FLF2V: the transformer's pos_embed_seq_len) are not "
                "supported yet; Wan 2.1 I2V and Wan 2.2 TI2V / I2V folders are"
            )

    @property
    def channels(self) -> int:
        return self.pipe.vae.config.z_dim

    def frame_conditions(self, raw, image, b: int, frames: int, device) -> dict:
        """What every branch reads beside the text: the image states and the first frame's
        latent condition with its mask, for ``b`` rows, in the network's dtype (TI2V: the first
        frame's latents, in float32 for ``finish``, and in the network's dtype)."""
        out = {}
        dtype = self.net.dtype
        if self.net.config.image_dim is not None:
            out["image"] = self.pipe.encode_image(raw, device).repeat(b, 1, 1).to(dtype)
        vae = self.pipe.vae
        video = image.to(device, torch.float32)[:, :, None]
        if not self.per_token:  # Wan 2.1: the first frame, then black ones, encoded together
            blank = video.new_zeros(*video.shape[:2], frames - 1, *video.shape[3:])
            video = torch.cat([video, blank], 2)
        z = vae.encode(video.to(vae.dtype)).latent_dist.mode().float()
        mean, std = self._stats(z)
        z = ((z - mean) / std).repeat(b, 1, 1, 1, 1)
        if self.per_token:
            out["first"], out["first_in"] = z, z.to(dtype)
            return out
        _, _, f, h, w = z.shape
        t = self.temporal  # the first frame's mask spans the temporal factor, then one per frame
        mask = torch.zeros(b, 1, (f - 1) * t + t, h, w, device=device)
        mask[:, :, :t] = 1
        mask = mask.view(b, f, t, h, w).transpose(1, 2)
        out["condition"] = torch.cat([mask, z], 1).to(dtype)
        return out

    def inputs(self, x, tm, cond):
        # the casts are no-ops in the network's dtype (a distillation student's may differ)
        if not self.per_token:
            return torch.cat([x, cond["condition"].to(x.dtype)], 1), tm
        keep, times = self._keep(x, tm.dtype)  # keep: 0 on the first latent frame, 1 elsewhere
        x_in = (1 - keep) * cond["first_in"].to(x.dtype) + keep * x
        return x_in, tm.reshape(-1, 1) * times[None]

    def _keep(self, x, time_dtype=torch.float32):
        """(keep: 0 on the first latent frame, 1 elsewhere, shaped as one row of x; the time
        factor of each token), made once per shape."""

        def make():
            keep = torch.ones(1, 1, *x.shape[2:], dtype=x.dtype, device=x.device)
            keep[:, :, 0] = 0
            _, p_h, p_w = self.net.config.patch_size
            return keep, keep[0, 0, :, ::p_h, ::p_w].flatten().to(time_dtype)

        return self._memo(("keep", tuple(x.shape[2:]), x.dtype, time_dtype, x.device), make)

    def finish(self, x, cond):
        """TI2V: the given first frame's latents in the clip's first latent frame."""
        if not self.per_token or cond is None:
            return x
        keep, _ = self._keep(x)
        return (1 - keep) * cond["first"][: x.shape[0]].to(x.dtype) + keep * x

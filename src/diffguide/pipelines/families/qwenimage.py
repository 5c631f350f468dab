"""Qwen-Image: Flux-like packing, Qwen2.5-VL text, a 3-D VAE with per-channel statistics."""

from __future__ import annotations


from .base import latent_stats
from .flux import Flux, pack2, unpack2


class QwenImage(Flux):
    """QwenImageTransformer2DModel (Qwen-Image): rectified flow, Qwen2.5-VL text with a mask, 2 x 2
    packed tokens, a 3-D VAE with per-channel latent mean and std, a resolution-dependent shift.
    diffusers' true CFG (a negative prompt and true_cfg_scale 4) renormalises the guided output per
    token to the conditional one's norm: the default here,
    ``cfg:scale=4,renorm=2,rescale_space=flow``,
    when a negative prompt is given (like diffusers, no guidance without one)."""

    name = "qwenimage"
    pipelines = ("QwenImagePipeline", "QwenImageImg2ImgPipeline")
    max_sequence_length = 1024
    true_cfg = "cfg:scale=4,renorm=2,rescale_space=flow"

    def default_guidance_for(self, negative: bool) -> str:
        return self.true_cfg if negative else "none"

    def embedded_default(self):
        return None if not getattr(self.net.config, "guidance_embeds", False) else 1.0

    def notice(self, prompts):
        return None  # a 1024-token window

    def _encode(self, texts, n, device, extra, prefix=""):
        keep = {
            k[len(prefix) :]: v
            for k, v in extra.items()
            if k.startswith(prefix) and (prefix or not k.startswith("negative_"))
        }
        embeds, mask = self.pipe.encode_prompt(
            texts,
            device=device,
            num_images_per_prompt=n,
            max_sequence_length=self.max_sequence_length,
            **keep,
        )
        return {"text": embeds, "mask": mask}

    def forward(self, x, tm, cond, net=None):
        b, c, h, w = x.shape
        out = (self.net if net is None else net)(
            hidden_states=pack2(x),
            timestep=tm / 1000,
            guidance=cond.get("guidance"),
            encoder_hidden_states=cond["text"],
            encoder_hidden_states_mask=cond.get("mask"),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            attention_kwargs=cond.get("attention"),
            return_dict=False,
        )[0]
        return unpack2(out, c, h, w)

    def _stats(self, like):
        return latent_stats(self.pipe.vae, like)

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

"""CogVideoX (text to video): a 3-D patch transformer on a v-prediction VP schedule with CogVideoX's
SNR shift, T5 text, a causal 3-D VAE; its latents are frames-first ([B, F, C, h, w])."""

from __future__ import annotations

from .base import TransformerFamily, encode_pair


class CogVideoX(TransformerFamily):
    """CogVideoXTransformer3DModel (CogVideoXPipeline, version 1.0: no temporal patches). diffguide
    keeps the latents [B, C, F, h, w] as every video family does; the network and the first draw
    of noise see the pipeline's frames-first layout. The 3-D rotary table (CogVideoX-5b) is made
    as the pipeline makes it. Its dynamic CFG is ``cfg:weight_schedule=cogvideox``."""

    name = "cogvideox"
    video = True
    max_sequence_length = 226
    default_guidance = "cfg:scale=6"  # CogVideoXPipeline's default scale
    pipelines = ("CogVideoXPipeline",)

    @property
    def net(self):
        return self.pipe.transformer

    @property
    def factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def temporal(self) -> int:
        return self.pipe.vae.config.temporal_compression_ratio

    @property
    def multiple(self) -> int:
        return self.factor * self.net.config.patch_size

    @property
    def default_frames(self) -> int:
        return self.net.config.sample_frames

    @property
    def default_hw(self) -> tuple[int, int]:
        cfg = self.net.config
        return cfg.sample_height * self.factor, cfg.sample_width * self.factor

    def frames(self, frames: int) -> int:
        if self.net.config.patch_size_t is not None:
            raise ValueError(
                "CogVideoX 1.5 (temporal patches, patch_size_t) is not supported yet; CogVideoX "
                "1.0 folders are"
            )
        return frames

    def notice(self, prompts):
        tok = getattr(self.pipe, "tokenizer", None)
        return self.long_prompts(prompts, tok, self.max_sequence_length)

    def draw(self, noise, shape, device):
        b, c, f, h, w = shape  # CogVideoXPipeline draws [B, F, C, h, w]
        return noise.randn((b, f, c, h, w), device=device).permute(0, 2, 1, 3, 4)

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        return encode_pair(self, prompts, negatives, n, device, negative, **extra)

    def _rotary(self, x):
        """The 3-D rotary table (cos, sin), made once per clip size, dtype and device."""
        if not self.net.config.use_rotary_positional_embeddings:
            return None
        b, c, f, h, w = x.shape
        return self._memo(
            ("rotary", f, h, w, x.device, x.dtype),
            lambda: self.pipe._prepare_rotary_positional_embeddings(
                h * self.factor, w * self.factor, f, x.device
            ),
        )

    def forward(self, x, tm, cond, net=None):
        out = (self.net if net is None else net)(
            hidden_states=x.permute(0, 2, 1, 3, 4),
            encoder_hidden_states=cond["text"],
            timestep=tm,
            image_rotary_emb=self._rotary(x),
            attention_kwargs=cond.get("attention"),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4)

"""Unconditional UNet2DModel folders (DDPM-style)."""

from __future__ import annotations

from .base import Family, _no_extra


class Unconditional(Family):
    """UNet2DModel (DDPM-style pixel or latent models): no condition; prompts are ignored."""

    name = "unconditional"
    conditional = False
    pipelines = ()  # any pipeline of a UNet2DModel (DDPMPipeline, DDIMPipeline, ...)

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        _no_extra(self, extra)
        return {}, {}

    def forward(self, x, tm, cond, net=None):
        return (self.net if net is None else net)(x, tm, return_dict=False)[0]

"""FreSca (WikiChao/FreSca; ComfyUI, comfy_extras/nodes_fresca.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fft as fft

from ..core.pred import as_images, Pred
from ..core.registry import register
from .cfg import ComfyPatch


def fourier_filter(x: torch.Tensor, low: float, high: float, cutoff: int) -> torch.Tensor:
    """x scaled by ``low`` in the centred 2 f x 2 f box of its (shifted) 2-D spectrum over the last
    two axes, f = min(cutoff, side // 2) per side, and by ``high`` elsewhere (the node's
    Fourier_filter; in float32, float64 kept)."""
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    freq = fft.fftshift(fft.fftn(x, dim=(-2, -1)), dim=(-2, -1))
    h, w = freq.shape[-2:]
    mask = torch.full((h, w), float(high), device=x.device, dtype=x.dtype)
    fh, fw = min(cutoff, h // 2), min(cutoff, w // 2)
    mask[h // 2 - fh : h // 2 + fh, w // 2 - fw : w // 2 + fw] = low
    out = fft.ifftn(fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(dtype)


@register("guidance", "fresca")
@dataclass(frozen=True)
class FreSca(ComfyPatch):
    """FreSca (ComfyUI's nodes_fresca.py): CFG with the guidance c - u scaled in the Fourier domain,
    u + scale F(c - u), F multiplying the centred (2 freq_cutoff)^2 low-frequency box of each
    image's spectrum by scale_low and the rest by scale_high. On x0 as the node (deltas in every
    output space are proportional, so the space does not matter); a video's frames are filtered
    one by one. ``scale`` is the sampler's CFG scale (ComfyUI's KSampler default 8)."""

    scale_low: float = 1.0
    scale_high: float = 1.25
    freq_cutoff: int = 20

    def __post_init__(self):
        super().__post_init__()
        for name in ("scale_low", "scale_high"):
            v = getattr(self, name)
            if not 0 <= v <= 10:
                raise ValueError(f"{name} must be in [0, 10], got {v!r}")
        if (
            isinstance(self.freq_cutoff, bool)
            or not isinstance(self.freq_cutoff, int)
            or not 1 <= self.freq_cutoff <= 10000
        ):
            raise ValueError(
                f"freq_cutoff must be an integer in [1, 10000], got {self.freq_cutoff!r}"
            )

    def guide(self, x, pt, c, u):
        if c.x0.ndim < 4:
            raise ValueError(
                f"FreSca needs image-shaped outputs (B, C, H, W) or videos, got {tuple(c.x0.shape)}"
            )
        # F is linear, so filtering x0's and eps's deltas keeps x = a x0 + s eps; and it acts per
        # image, so both go through one FFT round trip, stacked on the batch axis
        d = c - u
        both = torch.cat([d.x0, d.eps])
        f = fourier_filter(as_images(both), self.scale_low, self.scale_high, self.freq_cutoff)
        fx, fe = f.reshape(both.shape).split(d.x0.shape[0])
        return Pred(u.x0 + self.scale * fx, u.eps + self.scale * fe)

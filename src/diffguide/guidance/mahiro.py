"""Mahiro (ComfyUI, comfy_extras/nodes_mahiro.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.pred import Pred
from ..core.registry import register
from .cfg import ComfyPatch


def signed_sqrt(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(v.abs()) * v.sign()


@register("guidance", "mahiro")
@dataclass(frozen=True)
class Mahiro(ComfyPatch):
    """Mahiro (ComfyUI's nodes_mahiro.py): CFG on x0, g = u + scale (c - u), mixed with the "leap"
    scale c by their similarity: with sim the cosine over channels of signed square roots of
    scale u and (scale c + g) / 2, averaged over the other axes, and k = 2 (sim + 1), the output is
    (k g + (4 - k) scale c) / 4. The node has no option of its own; ``scale`` is the sampler's
    CFG scale (ComfyUI's KSampler defaults to 8). sim is averaged per sample; the node averages it
    over the batch too (the same for a batch of one)."""

    def guide(self, x, pt, pc, pu):
        c, u = pc.x0, pu.x0
        cfg = u + self.scale * (c - u)
        leap = c * self.scale
        merge = (leap + cfg) / 2
        cos = F.cosine_similarity(signed_sqrt(u * self.scale), signed_sqrt(merge), dim=1)
        sim = cos.flatten(1).mean(1) if cos.ndim > 1 else cos  # per sample
        k = (2 * (sim + 1)).view(-1, *([1] * (c.ndim - 1)))
        out = (k * cfg + (4 - k) * leap) / 4
        return Pred.from_x0(x, out, pt.a, pt.s)

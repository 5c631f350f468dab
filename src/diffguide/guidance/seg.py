"""Smoothed Energy Guidance (Hong 2024, arXiv 2408.00760)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.registry import register
from .perturb import BlurredQuery, PerturbedGuidance


@register("guidance", "seg")
@dataclass(frozen=True)
class SEG(PerturbedGuidance):
    """SEG (Hong 2024, eq. 12): C + scale (C - P), P with the queries of the self-attention
    ``layers``
    blurred over the token grid by a Gaussian of std ``sigma`` tokens (equivalent to blurring the
    attention weights, Sec. 3.3); ``sigma=inf`` (or above 9999, the authors' threshold) replaces
    them by their mean. Defaults as the authors' SDXL example (scale 3, sigma 100, the mid block).
    Layers as PAG's. diffusers' SmoothedEnergyGuidance hook swaps the two cases (finite sigma
    averages, infinite blurs); this follows the authors' code. The grid is the latent's: each
    frame of a clip, and a non-square image, blurred on its own sides.
    """

    layers: str = "auto"
    sigma: float = 100.0

    def __post_init__(self):
        super().__post_init__()
        if not self.sigma > 0 or math.isnan(self.sigma):
            raise ValueError(
                f"SEG sigma must be > 0 (inf: the mean of the queries), got {self.sigma!r}"
            )

    def perturbation(self):
        return BlurredQuery(self.layers, self.sigma if math.isfinite(self.sigma) else 1e30)

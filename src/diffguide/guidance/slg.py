"""Skip-Layer Guidance (Stability AI's SD3.5 recipe; diffusers' StableDiffusion3Pipeline)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.registry import register
from .perturb import PerturbedGuidance, SkipBlocks


@register("guidance", "slg")
@dataclass(frozen=True)
class SLG(PerturbedGuidance):
    """SLG: C + scale (C - P), P with the transformer blocks ``layers`` skipped (their inputs passed
    through), during steps start n < i < stop n. Defaults are SD3.5 Medium's recipe as
    StableDiffusion3Pipeline ships it (blocks 7;8;9, scale 2.8, steps 1% to 20%); "auto" picks
    7;8;9 where the network has them and its middle block otherwise. ``cfg+slg`` equals the
    pipeline's ``skip_guidance_layers`` (which also keeps CFG's scale separate), in one forward.

    ``layers``: ";"-separated integers (``transformer_blocks.i``) or regular expressions searched
    in block names ("single_transformer_blocks.3", "mid_block" on a UNet).
    """

    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2
    layers: str = "auto"

    def perturbation(self):
        return SkipBlocks(self.layers)

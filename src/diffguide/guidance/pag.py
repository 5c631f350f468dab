"""Perturbed-Attention Guidance (Ahn et al. 2024, arXiv 2403.17377)."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.registry import register
from .perturb import IdentityAttention, PerturbedGuidance


@register("guidance", "pag")
@dataclass(frozen=True)
class PAG(PerturbedGuidance):
    """PAG (Ahn et al. 2024, eq. 11): C + scale (C - P), P with the self-attention maps of ``layers``
    replaced by the identity (each token attends to itself: the layer outputs its value projection).

    ``layers``: ";"-separated diffusers pag_applied_layers (regular expressions searched in module
    names: "mid", "down_blocks.1", "up_blocks.0.attentions.1"), or integers naming
    ``transformer_blocks.i``; "auto" is "mid" on a UNet (the paper's and StableDiffusionPAGPipeline's
    default) and the middle transformer block elsewhere. ``cfg:scale=7.5+pag:scale=3`` is diffusers'
    PAG pipeline with CFG, its three branches in one forward.
    """

    layers: str = "auto"

    def perturbation(self):
        return IdentityAttention(self.layers)

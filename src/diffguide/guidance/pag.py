"""Perturbed-Attention Guidance (Ahn et al. 2024, arXiv 2403.17377)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.registry import register
from .perturb import IdentityAttention, PerturbedGuidance, check_joint_rule


@register("guidance", "pag")
@dataclass(frozen=True)
class PAG(PerturbedGuidance):
    """PAG (Ahn et al. 2024, eq. 11): C + scale (C - P), P with the self-attention maps of
    ``layers``
    replaced by the identity (each token attends to itself: the layer outputs its value projection).

    ``layers``: ";"-separated diffusers pag_applied_layers (regular expressions searched in module
    names: "mid", "down_blocks.1", "up_blocks.0.attentions.1"), or integers naming
    ``transformer_blocks.i``; "auto" is "mid" on a UNet (the paper's and
    StableDiffusionPAGPipeline's default) and the middle transformer block elsewhere.
    ``cfg:scale=7.5+pag:scale=3`` is diffusers'
    PAG pipeline with CFG, its three branches in one forward.

    ``joint``: the rule on joint text-image attention (SD3, Flux, Qwen-Image). "diagonal" (default,
    StableDiffusion3PAGPipeline's): image tokens attend to themselves and to the text tokens, the
    text tokens' attention is unchanged; "values": every token of both streams outputs its value
    projection (diffusers' modular PAG guider). Plain self-attention has one rule, the identity.
    """

    layers: str = "auto"
    joint: str = "diagonal"

    def __post_init__(self):
        super().__post_init__()
        check_joint_rule(self.joint)  # when the spec is parsed, not at the first perturbed step

    def perturbation(self):
        return IdentityAttention(self.layers, self.joint)

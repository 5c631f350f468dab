"""Spatiotemporal skip guidance (STG: Hyung et al. 2024, junhahyung/STGuidance)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.guided import Branch
from ..core.registry import register
from .cfg import check_space, output_space, rescaled
from .perturb import IdentityAttention, PerturbedGuidance, SkipBlocks, in_window

MODES = {"r": "STG-R: the blocks skipped", "a": "STG-A: their self-attention the identity"}


@register("guidance", "stg")
@dataclass(frozen=True)
class STG(PerturbedGuidance):
    """STG as the authors' diffusers pipelines run it: U + cfg (C - U) + scale (C - P), P the
    conditional prediction with the blocks ``layers`` skipped (``mode`` r, STG-R) or their
    self-attention made the identity (a, STG-A), then scaled towards C's std by ``rescale`` (their
    do_rescaling, 0.7; here per sample, in ``rescale_space``, so that a clip does not depend on its
    batch; they take one std over the whole batch). P runs in the same forward as C and U, during
    steps start n < i < stop n."""

    scale: float = 1.0
    cfg: float = 6.0
    mode: str = "r"
    layers: str = "auto"
    rescale: float = 0.7
    rescale_space: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            modes = "; ".join(f"{k} ({v})" for k, v in MODES.items())
            raise ValueError(f"STG mode {self.mode!r}: choose {modes}")
        if not 0 <= self.rescale <= 1:
            raise ValueError(f"rescale must be in [0, 1], got {self.rescale!r}")
        check_space(self.rescale_space)

    def perturbation(self):
        return SkipBlocks(self.layers) if self.mode == "r" else IdentityAttention(self.layers)

    def branches(self, pt, state=None):
        out = {"c": Branch("pos")}
        if self.cfg != 1:
            out["u"] = Branch("neg")
        if self.scale != 0 and in_window(pt, self.start, self.stop):
            out["p"] = Branch("pos", perturb=self._perturb)
        return out

    def combine(self, x, pt, preds, state):
        c = preds["c"]
        guided = preds["u"] + self.cfg * (c - preds["u"]) if "u" in preds else c
        if "p" in preds:
            guided = guided + self.scale * (c - preds["p"])
        if self.rescale > 0 and len(preds) > 1:
            space = output_space(self.rescale_space, pt)
            guided = rescaled(x, pt, c, guided, self.rescale, space)
        return guided, state

"""CFG with Lumina-Image 2.0's renormalisation and CFG truncation (diffusers' Lumina2Pipeline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.guided import Branch, Guidance, Point
from ..core.pred import Pred
from ..core.registry import register
from .cfg import check_finite, check_space, output_space


@register("guidance", "cfg_renorm")
@dataclass(frozen=True)
class CFGRenorm(Guidance):
    """CFG renormalisation and truncation as diffusers' Lumina2Pipeline (cfg_normalization,
    cfg_trunc_ratio): g = u + scale (c - u) on the raw output in ``space`` (auto: the model's own),
    then, with ``normalize``, g ||c|| / ||g|| with the norms taken along the last axis only (the
    pipeline's torch.norm(dim=-1): per row of the latent's width, not per sample; an exact rescale
    to the conditional norm, not a cap). Step i of n runs the conditional branch alone where
    (i + 1) / n > ``trunc_ratio``, and every step does where scale <= 1 (the pipeline's
    do_classifier_free_guidance is scale > 1)."""

    scale: float = 4.0
    trunc_ratio: float = 1.0
    normalize: bool = True
    space: str = "auto"

    def __post_init__(self):
        check_finite(self, "scale")
        if not 0 <= self.trunc_ratio <= 1:
            raise ValueError(f"trunc_ratio must be in [0, 1], got {self.trunc_ratio!r}")
        check_space(self.space)

    def _on(self, pt: Point) -> bool:
        if self.scale <= 1:
            return False
        if pt.step is None or pt.steps is None:  # no step count reported: never truncated
            return True
        return not (pt.step + 1) / pt.steps > self.trunc_ratio

    def branches(self, pt: Point, state=None):
        return {"c": Branch("pos"), "u": Branch("neg")} if self._on(pt) else {"c": Branch("pos")}

    def combine(self, x, pt, preds, state):
        if "u" not in preds:
            return preds["c"], state
        space = output_space(self.space, pt)
        c, u = (preds[k].output(space, pt.a, pt.s) for k in ("c", "u"))
        guided = u + self.scale * (c - u)
        if self.normalize:
            cond_norm = torch.norm(c, dim=-1, keepdim=True)
            guided = guided * (cond_norm / torch.norm(guided, dim=-1, keepdim=True))
        return Pred.from_output(space, guided, x, pt.a, pt.s), state

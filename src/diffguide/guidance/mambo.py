"""MAMBO-G: magnitude-aware mitigation for boosted guidance (arXiv 2508.03442)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.guided import Branch, Guidance, Point
from ..core.pred import Pred
from ..core.registry import register
from .cfg import (
    _in_guider_window,
    check_finite,
    check_rescale,
    check_space,
    check_window,
    output_space,
    rescaled,
)


@register("guidance", "mambo")
@dataclass(frozen=True)
class MAMBO(Guidance):
    """MAMBO-G (arXiv 2508.03442) as diffusers' MagnitudeAwareGuidance: CFG whose weight decays
    with the per-sample ratio r = ||c - u|| / ||u|| (over all non-batch dims) of the raw output in
    ``space`` (auto: the model's own): u + (1 + (scale - 1) exp(-alpha r)) (c - u), or with
    ``original`` (use_original_formulation) c + scale exp(-alpha r) (c - u).

    Guidance runs on steps int(start n) <= i < int(stop n) (and not where scale is 1, 0 with
    ``original``); elsewhere only the conditional branch is evaluated. ``rescale`` is diffusers'
    guidance_rescale (Lin et al. 2023, Sec. 3.4) on the same output."""

    scale: float = 10.0
    alpha: float = 8.0
    rescale: float = 0.0
    original: bool = False
    start: float = 0.0
    stop: float = 1.0
    space: str = "auto"

    def __post_init__(self):
        check_finite(self, "scale", "alpha")
        check_rescale(self.rescale)
        check_window(self.start, self.stop)
        check_space(self.space)

    def _on(self, pt: Point) -> bool:
        off = math.isclose(self.scale, 0.0 if self.original else 1.0)
        return _in_guider_window(pt, self.start, self.stop) and not off

    def branches(self, pt: Point, state=None):
        return {"c": Branch("pos"), "u": Branch("neg")} if self._on(pt) else {"c": Branch("pos")}

    def combine(self, x, pt, preds, state):
        if "u" not in preds:
            return preds["c"], state
        space = output_space(self.space, pt)
        c, u = (preds[k].output(space, pt.a, pt.s) for k in ("c", "u"))
        dims = tuple(range(1, c.ndim))
        diff = c - u
        norm = torch.linalg.vector_norm
        ratio = norm(diff, dim=dims, keepdim=True) / norm(u, dim=dims, keepdim=True)
        decay = torch.exp(-self.alpha * ratio)
        if self.original:
            out = c + self.scale * decay * diff
        else:
            out = u + (1.0 + (self.scale - 1.0) * decay) * diff
        guided = Pred.from_output(space, out, x, pt.a, pt.s)
        if self.rescale > 0:
            guided = rescaled(x, pt, preds["c"], guided, self.rescale, space)
        return guided, state

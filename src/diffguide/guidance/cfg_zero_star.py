"""CFG-Zero* (Fan et al. 2025, arXiv 2503.18886)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.guided import Branch, Guidance, Point
from ..core.pred import Pred
from ..core.registry import register
from .cfg import check_space, output_space


@register("guidance", "cfg_zero_star")
@dataclass(frozen=True)
class CFGZeroStar(Guidance):
    """CFG-Zero* (Fan et al. 2025): s* u + scale (c - s* u), s* = <c, u> / ||u||^2 per sample (eq.
    8, the optimised scale), and a zero output for the first ``zero_init_steps`` steps (Sec. 4.2;
    no network is run then). Both act on the raw output in ``space`` (auto: the model's own, the
    velocity on flow models as in the paper), as diffusers' ClassifierFreeZeroStarGuidance and the
    authors' code do.

    ``zero_init_steps`` counts the zeroed steps: the authors' pipelines (WeichenFan/CFG-Zero-star,
    models/*/pipeline.py) zero step i while ``i <= zero_steps``, so theirs is ``zero_init_steps -
    1``;
    the default 1 is their SD3 and Flux default ``zero_steps=0`` (HiDream and their CogView4 and
    Hunyuan examples use 1, i.e. 2 here). Their Flux.1-dev pipeline (guidance-distilled, no
    true CFG) uses the zero-init alone: ``cfg_zero_star:scale=1`` here, where c is the output and s*
    never enters (no unconditional branch runs)."""

    scale: float = 5.0
    zero_init_steps: int = 1
    space: str = "auto"

    def __post_init__(self):
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        if self.zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be >= 0, got {self.zero_init_steps!r}")
        check_space(self.space)

    def _zero(self, pt: Point) -> bool:
        return pt.step is not None and pt.step < self.zero_init_steps

    def branches(self, pt: Point, state=None):
        if self._zero(pt):
            return {}
        return {"c": Branch("pos")} if self.scale == 1 else {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        space = output_space(self.space, pt)
        if self._zero(pt):
            return Pred.from_output(space, torch.zeros_like(x), x, pt.a, pt.s), state
        if "u" not in preds:
            return preds["c"], state
        c, u = (preds[k].output(space, pt.a, pt.s) for k in ("c", "u"))
        cf, uf = c.flatten(1).float(), u.flatten(1).float()
        star = (
            ((cf * uf).sum(1) / ((uf * uf).sum(1) + 1e-8))
            .to(u.dtype)
            .view(-1, *([1] * (u.ndim - 1)))
        )
        return Pred.from_output(space, star * u + self.scale * (c - star * u), x, pt.a, pt.s), state

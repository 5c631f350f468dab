"""Adaptive Projected Guidance (Sadat, Hilliges, Weber 2024, arXiv 2410.02416)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.guided import Branch, Guidance, Point
from ..core.pred import Pred
from ..core.registry import register

SPACES = ("x0", "eps", "v", "flow")
BASES = ("cond", "uncond")


@register("guidance", "apg")
@dataclass(frozen=True)
class APG(Guidance):
    """APG (Sadat et al. 2024, Alg. 1) on the prediction in ``space`` (the paper's: x0).

    diff = P_c - P_u, accumulated with momentum (diff + momentum * previous, momentum < 0 is the
    paper's reverse momentum), clamped to L2 norm ``norm_threshold`` per sample, split into parts
    parallel and orthogonal to P_c (in float64, over all non-batch dims); update = orth + eta par.
    base="cond": P_c + (scale - 1) update (the paper, scale = its w = diffusers' scale).
    base="uncond": P_u + scale update, diffusers' AdaptiveProjectedGuidance, which applies it to the
    raw model output: space="eps" (or "v", "flow") with base="uncond", eta=1, momentum=0 reproduces
    that guider with the same rescale (norm_threshold). norm_threshold <= 0 turns the clamp off.
    """

    scale: float = 5.0
    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = -0.5
    space: str = "x0"
    base: str = "cond"

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"unknown APG space {self.space!r}; choose one of: {', '.join(SPACES)}")
        if self.base not in BASES:
            raise ValueError(f"unknown APG base {self.base!r}; choose one of: {', '.join(BASES)}")
        for name in ("scale", "eta", "norm_threshold", "momentum"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"APG {name} must be a finite number, got {getattr(self, name)!r}")

    def branches(self, pt: Point, state=None):
        return {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        pc = preds["c"].output(self.space, pt.a, pt.s)
        pu = preds["u"].output(self.space, pt.a, pt.s)
        diff = pc - pu
        if self.momentum != 0:
            diff = diff if state is None else diff + self.momentum * state
            state = diff
        dims = tuple(range(1, diff.ndim))
        if self.norm_threshold > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.clamp(self.norm_threshold / norm, max=1.0)
        d, unit = diff.double(), torch.nn.functional.normalize(pc.double(), dim=dims)
        par = (d * unit).sum(dim=dims, keepdim=True) * unit
        update = ((d - par) + self.eta * par).to(diff.dtype)
        out = pc + (self.scale - 1) * update if self.base == "cond" else pu + self.scale * update
        return Pred.from_output(self.space, out, x, pt.a, pt.s), state

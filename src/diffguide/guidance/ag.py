"""Adaptive Guidance (Castillo et al. 2023, arXiv 2312.12487): CFG until the branches agree."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.guided import Branch, Guidance, Point
from ..core.registry import register

SPACES = ("x0", "eps")


@register("guidance", "ag")
@dataclass(frozen=True)
class AdaptiveGuidance(Guidance):
    """AG (Castillo et al. 2023): CFG until cos(P_c, P_u) reaches threshold, then conditional only.

    Decided per sample: once a sample's cosine reaches the threshold it is conditional-only for the
    rest of the run, and its unconditional rows are no longer evaluated (NFE falls). The paper
    compares the eps predictions
    (space="eps"); at high noise both are close to x/sigma, so that cosine starts near 1, whereas in
    x0 (as ComfyUI's port does) it rises along the trajectory. centre=True (default) takes each
    prediction's mean out first (a correlation): a constant part shared by both predictions, such as
    a flat background in pixels or a latent's offset, no longer counts as agreement, so the same
    threshold means the same on pixels and latents. threshold > 1: always CFG; threshold -1: CFG on
    the first evaluation only. ``diffguide tune ag`` picks a threshold for a target NFE.
    """

    capturable = False  # the switch reads the cosine back on the host

    scale: float = 5.0
    threshold: float = 0.99
    space: str = "x0"
    centre: bool = True

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"unknown AG space {self.space!r}; choose one of: {', '.join(SPACES)}")
        if not math.isfinite(self.scale) or not math.isfinite(self.threshold):
            raise ValueError(
                f"AG scale and threshold must be finite, got {self.scale!r}, {self.threshold!r}"
            )

    def init_state(self):
        return None  # [B] bool: conditional-only from now on

    def branches(self, pt: Point, state=None):
        if self.scale == 1 or (state is not None and bool(state.all())):
            return {"c": Branch("pos")}
        rows = (
            None
            if state is None or not bool(state.any())
            else tuple((~state).nonzero()[:, 0].tolist())
        )
        return {"c": Branch("pos"), "u": Branch("neg", rows=rows)}

    def combine(self, x, pt, preds, state):
        c = preds["c"]
        if "u" not in preds:
            return c, state
        if state is None:
            state = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        rows = (~state).nonzero()[:, 0]
        u = preds["u"]
        cr = type(c)(c.x0[rows], c.eps[rows])
        guided = u + self.scale * (cr - u)
        a = getattr(cr, self.space).flatten(1).double()
        b = getattr(u, self.space).flatten(1).double()
        if self.centre:
            a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        done = torch.nn.functional.cosine_similarity(a, b, dim=1) >= self.threshold
        x0, eps = c.x0.clone(), c.eps.clone()
        x0[rows], eps[rows] = guided.x0, guided.eps
        state = state.clone()
        state[rows] = done.to(state.device)
        return type(c)(x0, eps), state

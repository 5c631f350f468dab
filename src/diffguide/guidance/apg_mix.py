"""APG mixed with CFG, as HunyuanImage-2.1 guides (diffusers' AdaptiveProjectedMixGuidance)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.guided import Branch, Guidance, Point
from ..core.pred import Pred
from ..core.registry import register
from .apg import project
from .cfg import (
    _in_guider_window,
    check_finite,
    check_rescale,
    check_space,
    check_window,
    output_space,
    rescaled,
)


@register("guidance", "apg_mix")
@dataclass(frozen=True)
class APGMix(Guidance):
    """CFG, then APG (Sadat et al. 2024) from step ``apg_start_step + 1`` on, as diffusers'
    AdaptiveProjectedMixGuidance (HunyuanImage-2.1), on the raw output in ``space`` (auto: the
    model's own). CFG steps: u + scale (c - u); APG steps: u + apg_scale update, update = the
    momentum average of c - u (d + momentum * previous, accumulated over the CFG steps too; 0 turns
    it off) clamped to the L2 radius ``norm_threshold`` (diffusers'
    adaptive_projected_guidance_rescale; 0: no clamp), orthogonal to c plus eta times parallel.
    ``original`` (use_original_formulation) puts c in place of u as the base. Guidance, and the
    momentum, run on steps int(start n) <= i < int(stop n) while scale is not 1 (0 with
    ``original``); APG also needs apg_scale not 1 (0). ``rescale`` is diffusers' guidance_rescale
    (Lin et al. 2023, Sec. 3.4) on the same output."""

    scale: float = 3.5
    rescale: float = 0.0
    apg_scale: float = 10.0
    momentum: float = -0.5
    norm_threshold: float = 10.0
    eta: float = 0.0
    original: bool = False
    start: float = 0.0
    stop: float = 1.0
    apg_start_step: int = 5
    space: str = "auto"

    def __post_init__(self):
        check_finite(self, "scale", "apg_scale", "momentum", "norm_threshold", "eta")
        check_rescale(self.rescale)
        check_window(self.start, self.stop)
        check_space(self.space)
        if isinstance(self.apg_start_step, bool) or not isinstance(self.apg_start_step, int):
            raise ValueError(f"apg_start_step must be an integer, got {self.apg_start_step!r}")
        if self.apg_start_step < 0:
            raise ValueError(f"apg_start_step must be >= 0, got {self.apg_start_step!r}")

    def _off(self, scale: float) -> bool:
        return math.isclose(scale, 0.0 if self.original else 1.0)

    def _cfg_on(self, pt: Point) -> bool:
        return _in_guider_window(pt, self.start, self.stop) and not self._off(self.scale)

    def _apg_on(self, pt: Point) -> bool:
        return (
            self._cfg_on(pt)
            and pt.step is not None
            and pt.step > self.apg_start_step
            and not self._off(self.apg_scale)
        )

    def branches(self, pt: Point, state=None):
        return (
            {"c": Branch("pos"), "u": Branch("neg")} if self._cfg_on(pt) else {"c": Branch("pos")}
        )

    def combine(self, x, pt, preds, state):
        if "u" not in preds:
            return preds["c"], state
        space = output_space(self.space, pt)
        c, u = (preds[k].output(space, pt.a, pt.s) for k in ("c", "u"))
        diff = c - u
        if self.momentum != 0:
            state = diff if state is None else diff + self.momentum * state
        base = c if self.original else u
        if self._apg_on(pt):
            avg = diff if self.momentum == 0 else state
            orth, par = project(avg, c, self.norm_threshold)
            # rounded to the output's dtype before they are added, as diffusers' normalized_guidance
            update = orth.to(avg.dtype) + self.eta * par.to(avg.dtype)
            out = base + self.apg_scale * update
        else:
            out = base + self.scale * diff
        guided = Pred.from_output(space, out, x, pt.a, pt.s)
        if self.rescale > 0:
            guided = rescaled(x, pt, preds["c"], guided, self.rescale, space)
        return guided, state

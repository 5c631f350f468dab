"""Skimmed CFG (Extraltodeus/Skimmed_CFG, ComfyUI custom node "Skimmed CFG")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.guided import Point
from ..core.pred import Pred, _coef
from ..core.registry import register
from ..core.schedule import ode_scale
from .cfg import ComfyPatch

MAX_SKIM = 10.0  # the node's widget range for Skimming_CFG: [0, 10]


def comfy_input(x: torch.Tensor, pt: Point) -> torch.Tensor:
    """ComfyUI's sampling-space x: x / a on VP-type (eps, v) models, x itself on flow (CONST)
    models, where a + s = 1 (the schedule's ode_space: x/a or x/(a+s))."""
    # inf where alpha is 0 on VP (a zero-terminal-SNR table's first level)
    return x / ode_scale(pt.schedule, _coef(pt.a, x), _coef(pt.s, x))


def skim(x, cond, uncond, scale, skimming_scale, disable_flipping_filter):
    """The node's skimmed_CFG(x_orig, cond, uncond, cond_scale, skimming_scale, ...): cond with its
    "outer influence" (where the guided x0 overshoots) pulled back to a CFG of skimming_scale.
    Its x - ((x - u) + k ((x - c) - (x - u))) is u + k (c - u), written so here: x only enters the
    sign test, which at an infinite x (a zero-terminal-SNR level, alpha 0) reads -sign(x)."""
    denoised = uncond + scale * (cond - uncond)
    mask = ((cond - uncond).sign() == cond.sign()) & (
        cond.sign() == (cond * scale - uncond * (scale - 1)).sign()
    )
    if not disable_flipping_filter:
        step = torch.where(torch.isfinite(x), denoised - x, -x)
        mask = mask & (denoised.sign() == step.sign())
    low = uncond + skimming_scale * (cond - uncond)
    return torch.where(mask, cond - (denoised - low) / scale, cond)


@register("guidance", "skimmed_cfg")
@dataclass(frozen=True)
class SkimmedCFG(ComfyPatch):
    """Skimmed CFG (Extraltodeus/Skimmed_CFG, node "Skimmed CFG", its default use): before CFG on
    x0, u then c are "skimmed" where CFG at ``scale`` overshoots (the signs of c - u, c, the guided
    x0 and its step from x agree), falling back to CFG at ``skimming_cfg`` there; u is skimmed
    against c at scale (to CFG 0 with full_skim_negative), then c against the new u at scale - 1,
    as the node does. disable_flipping_filter drops the x-dependent sign test (ComfyUI's x: x/a,
    or x on flow models). ``scale`` is the sampler's CFG scale (ComfyUI's KSampler default 8)."""

    skimming_cfg: float = 7.0
    full_skim_negative: bool = False
    disable_flipping_filter: bool = False

    def __post_init__(self):  # stricter than ComfyPatch's: skim divides by the scale
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"scale must be a finite number other than 0, got {self.scale!r}")
        if not 0 <= self.skimming_cfg <= MAX_SKIM:
            raise ValueError(
                f"skimming_cfg must be in [0, {MAX_SKIM:g}], got {self.skimming_cfg!r}"
            )

    def guide(self, x, pt, pc, pu):
        c, u = pc.x0, pu.x0
        xc = comfy_input(x.to(c.dtype), pt)
        flip, g = self.disable_flipping_filter, self.scale
        u = skim(xc, u, c, g, 0.0 if self.full_skim_negative else self.skimming_cfg, flip)
        c = skim(xc, c, u, g - 1, self.skimming_cfg, flip)
        guided = u + (c - u) * g
        if isinstance(pt.ve, torch.Tensor):  # the node skips sigma <= 0 (never, in sampling)
            keep = _coef(pt.ve > 0, guided)
            guided = torch.where(keep, guided, pu.x0 + (pc.x0 - pu.x0) * g)
        elif pt.ve <= 0:
            guided = pu.x0 + (pc.x0 - pu.x0) * g
        return Pred.from_x0(x, guided, pt.a, pt.s)

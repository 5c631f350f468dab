"""Composition: any method under a weight schedule, interval and rescale; sums of methods.

Both act on a method's guidance delta G - C, where G is its guided prediction and C the plain
conditional one: Modulated returns C + k(t) (G - C), Sum returns C + sum_i (G_i - C). For CFG,
G - C = (scale - 1)(C - U), so k(t) reproduces CFG's own weight schedules. The conditional branch is
shared: identical branches of the parts are evaluated once, in one forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.guided import Branch, Guidance, Point
from ..core.registry import combinator
from .cfg import check_shaping, rescaled, weight_factor


def _prefixed(prefix: str, d):
    return {f"{prefix}.{k}": v for k, v in d.items()}


def _part(prefix: str, preds):
    p = prefix + "."
    return {k[len(p) :]: v for k, v in preds.items() if k.startswith(p)}


@combinator("@")
@dataclass(frozen=True)
class Modulated(Guidance):
    """``inner`` with its delta scaled by k(progress) (Wang et al. 2024 shapes, mean 1 over the run,
    clamp_* floored at ``floor``), applied only while the VE level lies in [sigma_lo, sigma_hi]
    (Kynkaanniemi et al. 2024; outside, only the conditional branch runs), then std-rescaled towards
    the conditional prediction by ``rescale`` (Lin et al. 2023) in ``rescale_space``."""

    inner: Guidance
    weight_schedule: str = "constant"
    floor: float = 0.0  # on the multiplier k of the inner method's delta (never reversed)
    sigma_lo: float = 0.0
    sigma_hi: float = math.inf
    rescale: float = 0.0
    rescale_space: str = "x0"

    def __post_init__(self):
        if not isinstance(self.inner, Guidance):
            raise ValueError(f"Modulated wraps a Guidance, got {type(self.inner).__name__}")
        check_shaping(self)

    @property
    def needs_grad(self):
        return self.inner.needs_grad

    @property
    def capturable(self):
        return self.inner.capturable

    def init_state(self):
        return self.inner.init_state()

    def check(self, models):
        self.inner.check(models)

    def prompt_sets(self):
        return self.inner.prompt_sets()

    def conditions(self, pt, conds, x, noise):
        return self.inner.conditions(pt, conds, x, noise) if self._active(pt) else {}

    def _active(self, pt: Point) -> bool:
        ve = pt.ve if pt.t.ndim == 0 else float(pt.ve.mean())
        return self.sigma_lo <= ve <= self.sigma_hi

    def branches(self, pt: Point, state=None):
        k = weight_factor(pt, self.weight_schedule, self.floor)
        if not self._active(pt) or (not hasattr(k, "ndim") and k == 0):  # C alone: skip the rest
            return {"c": Branch("pos")}
        return {"c": Branch("pos"), **_prefixed("i", self.inner.branches(pt, state))}

    def combine(self, x, pt, preds, state):
        c = preds["c"]
        inner = _part("i", preds)
        if not inner:
            return c, state
        g, state = self.inner.combine(x, pt, inner, state)
        k = weight_factor(pt, self.weight_schedule, self.floor)
        out = g if k == 1 else c + k * (g - c)
        if self.rescale > 0:
            out = rescaled(x, pt, c, out, self.rescale, self.rescale_space)
        return out, state


@combinator("+")
@dataclass(frozen=True)
class Sum(Guidance):
    """C + sum_i (G_i - C): e.g. CFG + TSG, or ICG + TSG as in Sadat et al. 2024."""

    parts: tuple

    def __post_init__(self):
        if len(self.parts) < 2 or not all(isinstance(p, Guidance) for p in self.parts):
            raise ValueError("Sum needs two or more Guidance objects")

    @property
    def needs_grad(self):
        return any(p.needs_grad for p in self.parts)

    @property
    def capturable(self):
        return all(p.capturable for p in self.parts)

    def init_state(self):
        return tuple(p.init_state() for p in self.parts)

    def check(self, models):
        for p in self.parts:
            p.check(models)

    def prompt_sets(self):
        out = {}
        for p in self.parts:
            out.update(p.prompt_sets())
        return out

    def conditions(self, pt, conds, x, noise):
        out = {}
        for p in self.parts:
            out.update(p.conditions(pt, conds, x, noise))
        return out

    def branches(self, pt: Point, state=None):
        state = state or (None,) * len(self.parts)
        out = {"c": Branch("pos")}
        for i, (p, s) in enumerate(zip(self.parts, state)):
            out.update(_prefixed(str(i), p.branches(pt, s)))
        return out

    def combine(self, x, pt, preds, state):
        c = preds["c"]
        total, states = c, []
        for i, (p, s) in enumerate(zip(self.parts, state)):
            g, s = p.combine(x, pt, _part(str(i), preds), s)
            total = total + (g - c)
            states.append(s)
        return total, tuple(states)

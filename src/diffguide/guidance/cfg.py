"""Classifier-free guidance with weight schedules, a guidance interval and rescale."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.guided import Branch, Guidance, Point
from ..core.pred import Pred
from ..core.registry import register

WEIGHT_SCHEDULES = ("constant", "linear", "cosine", "clamp_linear", "clamp_cosine")
RESCALE_SPACES = ("x0", "eps", "v")


@register("guidance", "none")
@dataclass(frozen=True)
class NoGuidance(Guidance):
    """The conditional prediction alone (one evaluation per step)."""

    def branches(self, pt: Point, state=None):
        return {"c": Branch("pos")}

    def combine(self, x, pt, preds, state):
        return preds["c"], state


@register("guidance", "cfg")
@dataclass(frozen=True)
class CFG(Guidance):
    """Classifier-free guidance (Ho & Salimans 2022): u + scale (c - u), scale as in diffusers.

    weight_schedule varies w = scale - 1 with progress p (0 at noise, 1 at data) keeping its mean
    (Wang et al. 2024, Sec. 3): linear 2 w p, cosine w (1 - cos pi p), clamp_* = max(floor, .).
    Guidance applies only while the VE level s/a lies in [sigma_lo, sigma_hi] (Kynkaanniemi et al.
    2024), read at each evaluation's own level (the authors' Heun sampler decides once per step, so
    its correction at t_next may differ at the interval's edges); elsewhere, and wherever the scale
    is 1, only the conditional branch is evaluated. rescale
    mixes in the guided prediction rescaled to the conditional one's per-sample std (Lin et al. 2023,
    Sec. 3.4) in rescale_space; diffusers rescales the raw output (eps, or v for v-models).
    """

    scale: float = 5.0
    weight_schedule: str = "constant"
    floor: float = 1.0
    sigma_lo: float = 0.0
    sigma_hi: float = math.inf
    rescale: float = 0.0
    rescale_space: str = "x0"

    def __post_init__(self):
        if self.weight_schedule not in WEIGHT_SCHEDULES:
            raise ValueError(f"unknown weight_schedule {self.weight_schedule!r}; choose one of: "
                             f"{', '.join(WEIGHT_SCHEDULES)}")
        if self.rescale_space not in RESCALE_SPACES:
            raise ValueError(f"unknown rescale_space {self.rescale_space!r}; choose one of: "
                             f"{', '.join(RESCALE_SPACES)}")
        if not 0 <= self.rescale <= 1:
            raise ValueError(f"rescale must be in [0, 1], got {self.rescale!r}")
        if not 0 <= self.sigma_lo <= self.sigma_hi:
            raise ValueError(f"need 0 <= sigma_lo <= sigma_hi, got {self.sigma_lo!r}, {self.sigma_hi!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")

    def scale_at(self, pt: Point):
        """The diffusers-convention scale at this point: a float in sampling, [B] in training."""
        p, ve = pt.progress, pt.ve
        if isinstance(p, torch.Tensor) or isinstance(ve, torch.Tensor):
            p = torch.as_tensor(p, dtype=torch.float64)
            ve = torch.as_tensor(ve, dtype=torch.float64)
            cos, clamp, where = torch.cos, lambda w: w.clamp(min=self.floor), torch.where
        else:
            cos, clamp = math.cos, lambda w: max(w, self.floor)
            where = lambda c, a, b: a if c else b
        w, sched = self.scale - 1.0, self.weight_schedule
        if sched == "constant":
            w = w + 0 * p
        elif sched.endswith("linear"):
            w = 2 * w * p
        else:
            w = w * (1 - cos(math.pi * p))
        if sched.startswith("clamp"):
            w = clamp(w)
        inside = (ve >= self.sigma_lo) & (ve <= self.sigma_hi)
        return where(inside, 1 + w, 1 + 0 * w)

    def branches(self, pt: Point, state=None):
        g = self.scale_at(pt)
        if isinstance(g, torch.Tensor):  # per-sample scales (training): skip only if all agree
            g = g.unique().tolist()
            g = g[0] if len(g) == 1 else None
        if g == 1:
            return {"c": Branch("pos")}
        if g == 0:
            return {"u": Branch("neg")}
        return {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        if "u" not in preds or "c" not in preds:
            return preds.get("c", preds.get("u")), state
        c, u = preds["c"], preds["u"]
        g = self.scale_at(pt)
        guided = u + g * (c - u)
        if self.rescale > 0:
            guided = self._rescale(x, pt, c, guided)
        return guided, state

    def _rescale(self, x, pt, c: Pred, guided: Pred) -> Pred:
        space = self.rescale_space
        pc, pg = c.output(space, pt.a, pt.s), guided.output(space, pt.a, pt.s)
        dims = tuple(range(1, pg.ndim))
        ratio = pc.std(dim=dims, keepdim=True) / pg.std(dim=dims, keepdim=True)
        return Pred.from_output(space, pg * (self.rescale * ratio + (1 - self.rescale)), x, pt.a, pt.s)

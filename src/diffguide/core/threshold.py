"""Thresholding of the x0 prediction: dynamic (Saharia et al. 2022, Sec. 2.3) and static clipping.

By default both move the renoise eps with x0 so that x = a x0 + s eps still holds (what an update
written in x, as DPM-Solver++ and DDPM's posterior, does; for CFG++-style predictions the eps offset
is kept). ``keep_eps=True`` leaves the model's eps alone, as diffusers' DDIM does unless
``use_clipped_model_output``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pred import Pred, _coef

MODES = ("diffusers", "imagen")


@dataclass(frozen=True)
class DynamicThreshold:
    """Per sample, s = quantile(|x0|, ratio); x0 <- clip(x0, -s, s) / s.

    mode="diffusers": s = clamp(q, 1, max_value), as diffusers' ``_threshold_sample`` (a max_value
    below 1 makes s = max_value, as torch's clamp does there).
    mode="imagen": s = max(q, max_value), the paper with DPM-Solver's ``thresholding_max_val``
    floor. Never use it on latents.
    """

    ratio: float = 0.995
    max_value: float = 1.0
    mode: str = "diffusers"
    keep_eps: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(
                f"unknown threshold mode {self.mode!r}; choose one of: {', '.join(MODES)}"
            )
        if not 0 < self.ratio <= 1:
            raise ValueError(f"threshold ratio must be in (0, 1], got {self.ratio!r}")
        if not self.max_value > 0:
            raise ValueError(f"threshold max_value must be > 0, got {self.max_value!r}")

    def __call__(self, pred: Pred, x: torch.Tensor, a, s) -> Pred:
        x0 = pred.x0
        flat = x0.reshape(x0.shape[0], -1).abs()
        q = torch.quantile(flat if flat.dtype == torch.float64 else flat.float(), self.ratio, dim=1)
        if self.mode == "diffusers":
            q = q.clamp(1.0, self.max_value)
        else:
            q = q.clamp(min=self.max_value)
        q = q.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return _with_x0(pred, torch.maximum(torch.minimum(x0, q), -q) / q, a, s, self.keep_eps)


@dataclass(frozen=True)
class Clip:
    """Static thresholding: x0 <- clip(x0, -limit, limit) (diffusers' ``clip_sample``, DDPM's
    default)."""

    limit: float = 1.0
    keep_eps: bool = False

    def __post_init__(self):
        if not self.limit > 0:
            raise ValueError(f"clip limit must be > 0, got {self.limit!r}")

    def __call__(self, pred: Pred, x: torch.Tensor, a, s) -> Pred:
        return _with_x0(pred, pred.x0.clamp(-self.limit, self.limit), a, s, self.keep_eps)


def _with_x0(pred: Pred, new: torch.Tensor, a, s, keep_eps: bool) -> Pred:
    if keep_eps:
        return Pred(new, pred.eps, pred.x0_hist)
    return Pred(new, pred.eps + (_coef(a, new) / _coef(s, new)) * (pred.x0 - new), pred.x0_hist)

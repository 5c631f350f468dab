"""Dynamic thresholding of the x0 prediction (Saharia et al. 2022, Sec. 2.3), for pixel-space models."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .pred import Pred, _coef

MODES = ("diffusers", "imagen")


@dataclass(frozen=True)
class DynamicThreshold:
    """Per sample, s = quantile(|x0|, ratio); x0 <- clip(x0, -s, s) / s.

    mode="diffusers": s = clamp(q, 1, max_value), as diffusers' ``_threshold_sample``.
    mode="imagen": s = max(q, max_value), the paper with DPM-Solver's ``thresholding_max_val`` floor.
    Never use it on latents. The renoise eps moves with x0 so that x = a x0 + s eps still holds (the
    diffusers update for consistent predictions); for CFG++-style predictions its offset is kept.
    """

    ratio: float = 0.995
    max_value: float = 1.0
    mode: str = "diffusers"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown threshold mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"threshold ratio must be in (0, 1], got {self.ratio!r}")
        if not self.max_value >= 1 and self.mode == "diffusers":
            raise ValueError(f"threshold max_value must be >= 1, got {self.max_value!r}")

    def __call__(self, pred: Pred, x: torch.Tensor, a, s) -> Pred:
        x0 = pred.x0
        flat = x0.reshape(x0.shape[0], -1).abs()
        q = torch.quantile(flat if flat.dtype == torch.float64 else flat.float(), self.ratio, dim=1)
        if self.mode == "diffusers":
            q = q.clamp(1.0, self.max_value)
        else:
            q = q.clamp(min=self.max_value)
        q = q.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        new = torch.maximum(torch.minimum(x0, q), -q) / q
        return Pred(new, pred.eps + (_coef(a, x0) / _coef(s, x0)) * (x0 - new))

"""Trajectory stitching (T-Stitch, Pan et al. 2024, arXiv 2402.14167): a small model for the first
steps of a run, the large one after, on one trajectory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stitch:
    """Which network runs which steps, on one trajectory: model ``model`` wherever a guidance
    method asks for "main" on the first floor(fraction * n) of n steps (T-Stitch, the authors' SD
    rule: small while (i + 1) / n <= fraction) or, with ``below``, on the steps whose network time
    is below it (Wan 2.2's low-noise expert under ``boundary_ratio`` x 1000). ``guidance``, if
    given, guides those steps instead of the run's method (Wan 2.2's ``guidance_scale_2``).
    ``reset``: start the sampler's history afresh at the switch (a first-order step); by default it
    is kept, as in the authors' pipelines."""

    fraction: float = 0.4
    model: str = "small"
    reset: bool = False
    below: float | None = None
    guidance: object = None

    def __post_init__(self):
        if not 0 <= self.fraction <= 1 or not math.isfinite(self.fraction):
            raise ValueError(f"stitch fraction must be in [0, 1], got {self.fraction!r}")

    def small_steps(self, n: int) -> int:
        return int(math.floor(self.fraction * n + 1e-9))

    def uses_small(self, i: int, n: int, time: float | None = None) -> bool:
        if self.below is not None:
            return time is not None and time < self.below
        return i < self.small_steps(n)


def check_same_schedule(large, small) -> None:
    """Refuse stitching models whose noise schedules differ (the trajectory would jump)."""
    a, b = large.schedule, small.schedule
    if type(a) is not type(b):
        raise ValueError(
            f"cannot stitch: the models' schedules differ ({type(a).__name__} vs "
            f"{type(b).__name__})"
        )
    ts = torch.linspace(float(a.t_min), float(a.t_max), 33, dtype=torch.float64)
    if not (
        torch.allclose(a.alpha(ts), b.alpha(ts), atol=1e-6)
        and torch.allclose(a.sigma(ts), b.sigma(ts), atol=1e-6)
    ):
        raise ValueError(
            "cannot stitch: the models' noise schedules differ (alpha and sigma must agree at "
            "every t)"
        )

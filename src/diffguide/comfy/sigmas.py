"""diffguide's time grids as ComfyUI SIGMAS for a ComfyUI model."""

from __future__ import annotations

import torch

from ..core.registry import parse_options
from ..core.spacing import SPACING_OPTIONS, SPACINGS, timesteps
from . import levels


def grid_sigmas(
    model_sampling, spacing: str, steps: int, denoise: float = 1.0, options: str = ""
) -> torch.Tensor:
    """The sigmas of diffguide's ``spacing`` grid of ``steps`` steps on this model, float32 on
    the CPU as ComfyUI's schedulers give them. ``denoise`` < 1 keeps the last ``steps`` steps of a
    grid of steps / denoise (ComfyUI's BasicScheduler); 0 gives no sigmas."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    if not 0 <= denoise <= 1:
        raise ValueError(f"denoise must be in [0, 1], got {denoise!r}")
    if denoise == 0:
        return torch.zeros(0)
    schedule = levels.model_schedule(model_sampling)
    total = steps if denoise == 1 else int(steps / denoise)
    # the spec grammar's parser; an option the spacing lacks is named by timesteps()
    grid = parse_options("spacing", options, dict.fromkeys(SPACING_OPTIONS[spacing]))
    ts = timesteps(schedule, total, spacing, **grid)
    return levels.sigmas_of(schedule, ts)[-(steps + 1) :].float()

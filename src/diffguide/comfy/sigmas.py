"""diffguide's time grids as ComfyUI SIGMAS for a ComfyUI model."""

from __future__ import annotations

import torch

from ..core.spacing import SPACINGS, timesteps
from . import levels


def _value(text: str):
    """A spacing option's value: true/false, an integer, a number, else the text (a model name)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(low)
        except ValueError:
            pass
    return text.strip()


def spacing_options(text: str) -> dict:
    """'rho=5, sigma_min=0.1' as {'rho': 5, 'sigma_min': 0.1}; '' as {}."""
    options = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"spacing option {item!r} is not key=value")
        options[key.strip()] = _value(value)
    return options


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
    ts = timesteps(schedule, total, spacing, **spacing_options(options))
    return levels.sigmas_of(schedule, ts)[-(steps + 1) :].float()

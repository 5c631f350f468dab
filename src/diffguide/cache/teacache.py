"""TeaCache (Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
Model"; ali-vilab/TeaCache)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..core.registry import number_list
from ..core.registry import register
from .base import Cache

# the authors' rescaling polynomials (highest power first, as numpy.poly1d)
COEFFICIENTS = {
    "flux": "498.651651;-283.781631;55.8554382;-3.82021401;0.264230861",
    "identity": "1;0",
}


@dataclass(frozen=True)
class TeaCache(Cache):
    """Skips the whole block stack for a group while the accumulated, rescaled relative L1 change
    of its timestep-modulated input (the first block's ``norm1(x, temb)``; the input itself where
    the block has no such norm) stays under ``threshold``; the first and last steps always run
    (TeaCache, Sec. 3.3-3.4). ``coefficients`` (';'-separated, highest power first) rescale the
    change: "auto" takes the authors' Flux polynomial on Flux and the identity elsewhere."""

    threshold: float = 0.4
    coefficients: str = "auto"
    per: str = "branch"

    decides = "input"

    def __post_init__(self):
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")
        if self.coefficients != "auto":
            _poly(self.coefficients)
        super().__post_init__()

    def decide(self, state, key, rows) -> bool:
        entry = state.entries.setdefault(key, {"calls": 0, "acc": 0.0})
        i, entry["calls"] = entry["calls"], entry["calls"] + 1
        current = modulated(rows).detach()
        previous, entry["input"] = entry.get("input"), current
        if i == 0 or (state.steps is not None and i == state.steps - 1) or previous is None:
            entry["acc"] = 0.0
            return True
        change = float((current - previous).abs().mean() / previous.abs().mean())
        entry["acc"] += _value(self._coefficients(rows.block), change)
        if entry["acc"] < self.threshold:
            return False
        entry["acc"] = 0.0
        return True

    def _coefficients(self, block) -> tuple:
        name = self.coefficients
        if name == "auto":
            name = "flux" if type(block).__name__.startswith("Flux") else "identity"
        return _poly(name)


@functools.lru_cache(maxsize=32)
def _poly(name: str) -> tuple:
    error = (
        f"coefficients must be auto, {', '.join(COEFFICIENTS)} or numbers separated by ';', "
        f"got {name!r}"
    )
    out = number_list(COEFFICIENTS.get(name, name), error)
    if not out:
        raise ValueError(error)
    return out


def _value(coefficients: tuple, x: float) -> float:
    out = 0.0
    for c in coefficients:  # Horner, highest power first
        out = out * x + c
    return out


def modulated(rows):
    """The first block's timestep-modulated input for these rows: ``norm1(x, emb=temb)`` where the
    block has an adaptive norm (SD3, Flux, Qwen-Image), else its input."""
    norm, temb = getattr(rows.block, "norm1", None), rows.argument("temb")
    if norm is not None and temb is not None:
        try:
            out = norm(rows.probe, emb=temb)
        except TypeError:  # a norm without a time input
            return rows.probe
        return out[0] if isinstance(out, tuple) else out
    return rows.probe


register("cache", "teacache")(TeaCache)

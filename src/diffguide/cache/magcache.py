"""MagCache (Ma et al. 2025; Zehong-Ma/MagCache, diffusers' ``MagCacheConfig``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from functools import cached_property

from ..core.registry import number_list
from ..core.registry import register
from .base import Cache, CacheState

# Flux.1-dev at 28 steps, from the authors (as diffusers' FLUX_MAG_RATIOS)
FLUX_RATIOS = (
    "1.0;1.21094;1.11719;1.07812;1.0625;1.03906;1.03125;1.03906;1.02344;1.03125;1.02344;0.98047;"
    "1.01562;1.00781;1.0;1.00781;1.0;1.00781;1.0;1.0;0.99609;0.99609;0.98047;0.98828;0.96484;"
    "0.95703;0.93359;0.89062"
)


@functools.lru_cache(maxsize=64)
def ratio_list(text: str) -> tuple[float, ...]:
    """'1.0;0.98;...' -> floats (a spec's list is separated by ';')."""
    out = number_list(text, f"ratios must be numbers separated by ';', got {text!r}")
    if not out or not all(r > 0 for r in out):
        raise ValueError(f"ratios must be positive numbers separated by ';', got {text!r}")
    return out


@functools.lru_cache(maxsize=64)
def nearest(ratios: tuple, n: int) -> tuple:
    """The calibrated ratios at n steps: nearest-index resampling, as the authors and diffusers."""
    if n == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (n - 1)
    return tuple(ratios[int(round(i * scale))] for i in range(n))


@dataclass(frozen=True)
class MagCache(Cache):
    """Skips the whole block stack for a group while the product of its calibrated residual
    magnitude ratios stays near 1: each step past the first ``retention`` share multiplies the
    ratio, adds |1 - ratio| to the error, and the kept residual (output - input of the stack) is
    reused while the error is at most ``threshold`` and at most ``max_skip`` steps in a row
    (MagCache, Alg. 1). ``ratios`` (';'-separated, one per step, resampled to the run's steps)
    come from ``diffguide tune cache``, or ``flux`` for Flux.1-dev's published ones. The
    decisions depend only on the step, so a captured CUDA graph replays them."""

    ratios: str = ""
    threshold: float = 0.06
    max_skip: int = 3
    retention: float = 0.2
    steps: int = 0  # the step count the ratios are resampled to; 0: the run's
    per: str = "branch"

    decides = "input"
    capturable = True

    def __post_init__(self):
        if not self.ratios:
            raise ValueError(
                "magcache needs its model's ratios: ratios=... from 'diffguide tune cache', or "
                "ratios=flux (Flux.1-dev's)"
            )
        self._ratios  # parsed (and checked) now
        if not self.threshold >= 0 or self.max_skip < 0 or not 0 <= self.retention <= 1:
            raise ValueError(
                f"need threshold >= 0, max_skip >= 0 and 0 <= retention <= 1; got "
                f"{self.threshold!r}, {self.max_skip!r}, {self.retention!r}"
            )
        super().__post_init__()

    @cached_property
    def _ratios(self) -> tuple[float, ...]:
        return ratio_list(FLUX_RATIOS if self.ratios == "flux" else self.ratios)

    def decide(self, state, key, rows) -> bool:
        entry = state.entries.setdefault(key, {"calls": 0, "ratio": 1.0, "err": 0.0, "run": 0})
        i, entry["calls"] = entry["calls"], entry["calls"] + 1  # this group's forward count
        n = self.steps or state.steps or i + 1
        table = nearest(self._ratios, n)
        if i < int(self.retention * n + 0.5):
            return True
        entry["ratio"] *= table[i] if i < len(table) else 1.0
        entry["run"] += 1
        entry["err"] += abs(1.0 - entry["ratio"])
        if "rest" in entry and entry["err"] <= self.threshold and entry["run"] <= self.max_skip:
            return False
        entry.update(ratio=1.0, err=0.0, run=0)
        return True


register("cache", "magcache")(MagCache)


@dataclass(frozen=True)
class Calibration(Cache):
    """Runs every block and records, per group and forward, MagCache's ratio: the mean over tokens
    of |r_t| / |r_t-1|, r the stack's residual (the authors' calibration; 1.0 at the first).
    ``sink`` collects {branch label: [ratios of one run]} across runs."""

    sink: list = field(default_factory=list, compare=False)
    decides = "input"
    name = "magcache calibration"

    def init_state(self):
        state = super().init_state()
        self.sink.append({})
        return state

    def decide(self, state, key, rows) -> bool:
        return True

    def ran(self, state, key, entry) -> None:
        r = entry["rest"][0].float()
        r = r.flatten(2).transpose(1, 2) if r.ndim == 4 else r  # [B, C, H, W]: channels last
        prev = entry.get("previous")
        ratio = 1.0 if prev is None else float((r.norm(dim=-1) / (prev.norm(dim=-1) + 1e-8)).mean())
        entry["previous"] = r
        self.sink[-1].setdefault(label(key), []).append(ratio)


def label(key) -> str:
    """A group key's branch in words: its condition, and its perturbation where it has one."""
    branch = key[0] if isinstance(key, tuple) else key
    if isinstance(branch, str):
        return branch
    perturb = getattr(branch, "perturb", None)
    return branch.cond + ("" if perturb is None else "+" + type(perturb).__name__)


def share(ratios: tuple, steps: int, threshold: float, max_skip: int, retention: float) -> float:
    """The share of forwards MagCache runs at these settings (its decisions depend on the step
    only)."""
    cache = MagCache(";".join(map(str, ratios)), threshold, max_skip, retention, steps)
    state, ran = CacheState(steps=steps), 0
    for _ in range(steps):
        go = cache.decide(state, "k", None)
        entry = state.entries["k"]
        go = go or "rest" not in entry  # as a forward runs when nothing is kept yet
        if go:
            entry["rest"] = True
        ran += go
    return ran / steps

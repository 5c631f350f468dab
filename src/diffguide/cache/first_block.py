"""First-block cache (ParaAttention's dynamic caching; diffusers' ``FirstBlockCacheConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.registry import register
from .base import Cache


@dataclass(frozen=True)
class FirstBlockCache(Cache):
    """The first block always runs; when its residual (output - input) differs from the one kept
    at the group's last full pass by less than ``threshold`` (mean |r - r_kept| / mean |r_kept|),
    the other blocks are skipped and their kept residual added (ParaAttention's first-block cache,
    as diffusers' hook). ``per`` "branch" decides for each branch's rows of the batched forward;
    "batch" once for the whole forward, as diffusers' hook on a pipeline that batches CFG."""

    threshold: float = 0.05
    per: str = "branch"

    def __post_init__(self):
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")
        super().__post_init__()

    def decide(self, state, key, rows) -> bool:
        residual = rows.probe
        entry = state.entries.setdefault(key, {})
        kept = entry.get("first")
        if kept is None or kept.shape != residual.shape:
            go = True
        else:
            change = (residual - kept).abs().mean() / kept.abs().mean()
            go = bool(change.item() > self.threshold)
        if go:  # kept from full passes only: a run of skips drifts from it until one runs
            entry["first"] = residual.detach()
        return go


register("cache", "first_block")(FirstBlockCache)

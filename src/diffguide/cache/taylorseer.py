"""TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting"; Shenyi-Z/TaylorSeer, diffusers'
``TaylorSeerCacheConfig``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..core.registry import register
from ..guidance.perturb import _cached
from .base import Cache, _module, active, wrap
from .modules import ModuleForward

# the modules diffusers' hook forecasts by default: the blocks' attention layers
ATTENTION = (
    r"blocks.*attn",
    r"transformer_blocks.*attn",
    r"single_transformer_blocks.*attn",
    r"temporal_transformer_blocks.*attn",
)
MODULES = ("attention", "lite")


@dataclass(frozen=True)
class TaylorSeer(Cache):
    """Forecasts module outputs between full steps by a Taylor series in the step index, its
    derivatives the divided differences of the last full steps' outputs (TaylorSeer, Eq. 8):
    the first ``warmup`` steps run, then one in ``interval``; from step ``until`` (0: never)
    every step runs again. ``modules``: "attention" forecasts the blocks' attention layers (the
    rest of each block runs), "lite" forecasts the output projection and skips every block
    (diffusers' lite mode). Factors are kept in the network's dtype (diffusers' default is
    bfloat16)."""

    interval: int = 5
    warmup: int = 3
    until: int = 0
    order: int = 1
    modules: str = "attention"
    per: str = "branch"

    capturable = True

    def __post_init__(self):
        if self.interval < 1 or self.warmup < 0 or self.until < 0 or self.order < 0:
            raise ValueError(
                f"need interval >= 1, warmup >= 0, until >= 0 and order >= 0; got "
                f"{self.interval!r}, {self.warmup!r}, {self.until!r}, {self.order!r}"
            )
        if self.modules not in MODULES:
            raise ValueError(f"modules must be one of {', '.join(MODULES)}, got {self.modules!r}")
        super().__post_init__()

    def check(self, denoiser) -> None:
        if not self._targets(_module(denoiser, self.name))[0]:
            raise ValueError(
                f"cache 'taylorseer' finds no attention layer in a block list of "
                f"{type(_module(denoiser, self.name)).__name__} (names such as "
                "transformer_blocks.0.attn)"
            )

    def _targets(self, net) -> tuple[list, set]:
        """(modules, the ids of the ones skipped: the others' output is forecast)."""
        if self.modules == "lite":
            blocks = [
                m for n, m in net.named_modules() if re.fullmatch(r"[^.]*block[^.]*\.[^.]+", n)
            ]
            out = getattr(net, "proj_out", None)
            found = [*blocks, out] if out is not None and blocks else []
            return found, {id(m) for m in found} - {id(out)}
        found = [m for n, m in net.named_modules() if any(re.fullmatch(p, n) for p in ATTENTION)]
        return found, set()

    def apply(self, denoiser, state, groups: list):
        net = _module(denoiser, self.name)
        targets, skipped = _cached(net, ("taylorseer", self.modules), lambda: self._targets(net))
        state.shared["skipped"] = skipped  # for ``keep``, which sees module ids only
        fwd = ModuleForward(self, state, self.folded(groups), (0, len(targets)))
        return active(fwd, targets, wrap)

    def decide(self, state, key, rows) -> bool:
        entry = state.entries.setdefault(key, {"calls": 0, "kept": {}})
        i = entry["step"] = entry["calls"]
        entry["calls"] += 1
        return (
            i < self.warmup
            or (i - self.warmup - 1) % self.interval == 0
            or bool(self.until and i >= self.until)
        )

    def ready(self, entry) -> bool:
        return bool(entry["kept"])

    def keep(self, state, entry, module, rows) -> None:
        """A full step's output: zeros of its shape for a skipped module, else the Taylor factors
        (order o from the divided difference of order o - 1 with the module's last full step)."""
        outs = rows if isinstance(rows, tuple) else (rows,)
        step, prev = entry["step"], entry["kept"].get(module)
        if module in state.shared["skipped"]:
            zeros = [None if f is None else torch.zeros_like(f) for f in outs]
            entry["kept"][module] = ("zeros", step, zeros, isinstance(rows, tuple))
            return
        new = []
        for j, f in enumerate(outs):
            if f is None:
                new.append(None)
                continue
            factors = [f.detach()]
            old = prev[2][j] if prev is not None and j < len(prev[2]) else None
            for o in range(self.order if old else 0):
                if o >= len(old) or old[o].shape != factors[o].shape:
                    break
                factors.append((factors[o] - old[o]) / (step - prev[1]))
            new.append(factors)
        entry["kept"][module] = ("taylor", step, new, isinstance(rows, tuple))

    def reuse(self, state, entry, module):
        kind, last, kept, is_tuple = entry["kept"][module]
        if kind == "zeros":
            outs = kept
        else:
            k = entry["step"] - last
            outs = [
                None if f is None else sum(f[o] * (k**o / math.factorial(o)) for o in range(len(f)))
                for f in kept
            ]
        return tuple(outs) if is_tuple else outs[0]


register("cache", "taylorseer")(TaylorSeer)

"""Time-step Guidance (Sadat, Kansy, Hilliges, Weber 2024, arXiv 2407.02687)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..core.guided import Branch, Guidance, Point
from ..core.registry import register
from ..core.sample import draw

# where diffusers networks embed the time step: UNets' time_embedding, DiT/PixArt/SD3's
# timestep_embedder (SDXL's add_embedding is also a TimestepEmbedding but embeds text and sizes)
EMBEDDERS = ("time_embedding", "timestep_embedder", "time_embedder")  # the last: Wan's


@dataclass(frozen=True)
class TimeEmbeddingNoise:
    """Branch perturbation: add ``level`` * std(emb) * n, n ~ N(0, I), to the network's time-step
    embedding through forward hooks (removed on exit; one n per forward, shared by all
    embedders)."""

    level: float

    def apply(self, denoiser, noise):
        module = getattr(denoiser, "module", None)
        if not isinstance(module, torch.nn.Module):
            raise ValueError(
                "TSG needs a denoiser with .module (the network) to hook its time-step "
                "embedding; NetDenoiser(..., module=net) or a GuidedPipeline provides it"
            )
        targets = [m for name, m in module.named_modules() if name.rsplit(".", 1)[-1] in EMBEDDERS]
        if not targets:
            raise ValueError(
                f"TSG found no time-step embedding ({' or '.join(EMBEDDERS)}) in "
                f"{type(module).__name__}"
            )
        return self._hooked(targets, noise)

    @contextlib.contextmanager
    def _hooked(self, targets, noise):
        drawn = {}

        def hook(mod, args, out):
            key = tuple(out.shape)
            if key not in drawn:
                drawn[key] = draw(noise, out)
            std = out.float().flatten(1).std(dim=1).view(-1, *([1] * (out.ndim - 1))).to(out.dtype)
            return out + self.level * std * drawn[key]

        handles = [m.register_forward_hook(hook) for m in targets]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


@register("guidance", "tsg")
@dataclass(frozen=True)
class TSG(Guidance):
    """TSG (Sadat et al. 2024): D(t~) + scale (D(t) - D(t~)), emb(t~) = emb(t) + noise u^alpha
    std(emb) n.

    u in [0, 1] is the noise time (1 at pure noise); guidance acts while t_lo <= u <= t_hi,
    elsewhere
    only D(t) is evaluated. The perturbed branch is the same network under a forward hook, not a
    copy.
    Works on unconditional models; conditional ones use the prompt in both branches. The paper's
    code
    is not public: the form emb + s t^alpha n is from its text as reviewers quote it; the std(emb)
    factor (which makes ``noise`` independent of the embedding's scale) is our choice, and the
    defaults are the values reported for unconditional SD (scale 3, s 1.25, alpha 1, t in
    [100, 900]); for conditional SD they are scale 4, s 3, alpha 0.25, t in [400, 1000].
    """

    scale: float = 3.0
    noise: float = 1.25
    alpha: float = 1.0
    t_lo: float = 0.1
    t_hi: float = 0.9

    def __post_init__(self):
        for name in ("scale", "noise", "alpha"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"TSG {name} must be a finite number, got {getattr(self, name)!r}")
        if not 0 <= self.t_lo <= self.t_hi <= 1:
            raise ValueError(f"need 0 <= t_lo <= t_hi <= 1, got {self.t_lo!r}, {self.t_hi!r}")

    def _u(self, pt: Point) -> float:
        return float(1 - pt.progress) if pt.t.ndim == 0 else float((1 - pt.progress).mean())

    def branches(self, pt: Point, state=None):
        u = self._u(pt)
        if self.scale == 1 or not self.t_lo <= u <= self.t_hi:
            return {"c": Branch("pos")}
        return {
            "c": Branch("pos"),
            "p": Branch("pos", perturb=TimeEmbeddingNoise(self.noise * u**self.alpha)),
        }

    def combine(self, x, pt, preds, state):
        if "p" not in preds:
            return preds["c"], state
        p = preds["p"]
        return p + self.scale * (preds["c"] - p), state

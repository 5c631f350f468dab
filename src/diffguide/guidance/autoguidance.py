"""AutoGuidance (Karras et al. 2024, arXiv 2406.02507)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.guided import Branch, Guidance
from ..core.registry import register


@register("guidance", "autoguidance")
@dataclass(frozen=True)
class AutoGuidance(Guidance):
    """AutoGuidance (Karras et al. 2024, eq. 1 with a bad model): D_guide + scale (D - D_guide), the
    guide a weaker version of the same model (smaller, or trained less) given the same condition
    (``cond=neg`` gives it the negative prompt instead, CFG-style). The guide is the run's model
    ``model`` (default "guide": ``guide_model=`` in a pipeline, ``--guide-model`` on the command
    line, e.g. builtin-small for the built-in model). Its combine rule is diffusers'
    AutoGuidance guider's; there the "bad version" is the main model with layers skipped, which
    ``slg`` is here."""

    scale: float = 2.0
    cond: str = "pos"
    model: str = "guide"

    def __post_init__(self):
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        if self.cond not in ("pos", "neg"):
            raise ValueError(f"autoguidance cond must be pos or neg, got {self.cond!r}")

    def check(self, models):
        if self.model not in models:
            raise ValueError(
                f"autoguidance needs a guide model {self.model!r} (a weaker version of the model): "
                "guide_model= in Python, --guide-model on the command line (e.g. builtin-small "
                "for the built-in model)"
            )

    def branches(self, pt, state=None):
        if self.scale == 1:
            return {"c": Branch("pos")}
        return {"c": Branch("pos"), "g": Branch(self.cond, model=self.model)}

    def combine(self, x, pt, preds, state):
        if "g" not in preds:
            return preds["c"], state
        g = preds["g"]
        return g + self.scale * (preds["c"] - g), state

"""Tangential Classifier-Free Guidance (Kwon et al. 2025, arXiv 2503.18137)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.guided import Branch, Guidance
from ..core.pred import Pred
from ..core.registry import register
from .cfg import check_space, output_space


@register("guidance", "tcfg")
@dataclass(frozen=True)
class TCFG(Guidance):
    """TCFG (Kwon et al. 2025, Alg. 1): the unconditional output keeps only its component along the
    first right-singular vector of the stacked [c; u] (per sample, flattened), dropping the
    tangential one, then u' + scale (c - u'), in ``space`` (auto: the model's own output), as
    diffusers' TangentialClassifierFreeGuidance."""

    scale: float = 5.0
    space: str = "auto"
    # on CUDA torch.linalg.svd reads its solver's status back on the host (a check the meta device
    # skips)
    capturable = False

    def __post_init__(self):
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        check_space(self.space)

    def branches(self, pt, state=None):
        return {"c": Branch("pos")} if self.scale == 1 else {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        if "u" not in preds:
            return preds["c"], state
        space = output_space(self.space, pt)
        c, u = (preds[k].output(space, pt.a, pt.s) for k in ("c", "u"))
        stacked = torch.stack([c, u], 1).flatten(2).float()
        v1 = torch.linalg.svd(stacked, full_matrices=False).Vh[:, :1]  # [B, 1, D]
        uf = u.reshape(u.shape[0], 1, -1).float()
        u_par = ((uf @ v1.transpose(1, 2)) @ v1).reshape(u.shape).to(u.dtype)
        return Pred.from_output(space, u_par + self.scale * (c - u_par), x, pt.a, pt.s), state

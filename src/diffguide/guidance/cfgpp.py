"""CFG++ (Chung et al. 2024, arXiv 2406.08070): guided x0, renoised with the unconditional eps."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.guided import Branch, Guidance, Point
from ..core.pred import Pred
from ..core.registry import register

HISTORIES = ("uncond", "guided")


@register("guidance", "cfgpp")
@dataclass(frozen=True)
class CFGpp(Guidance):
    """CFG++ (Chung et al. 2024, Alg. 1): Pred(x0 = D_u + scale (D_c - D_u), eps = eps_u).

    ``scale`` is the paper's lambda in [0, 1] (not a CFG scale: one DDIM step equals CFG at about
    lambda ve / (ve - ve'), which grows with the number of steps). Every sampler reads the Pred as
    data anchor plus renoise, so the renoise part is always eps_u:
    - DDIM, Euler, Euler ancestral: x' = a' (D_lam + ve_down eps_u + ve_up z), the paper's DDIM
      update and its euler(_a)_cfg++; on a flow schedule x' = (1 - t') D_lam + t' eps_u.
    - DPM++ 2M/3M (and SDE): anchor D_lam plus the multistep correction, renoise e^{-eta h} eps_u.
      The correction's history is the unconditional x0 (history="uncond"), which reproduces the
      authors' and ComfyUI's dpm++_2m_cfg++; history="guided" differences the guided x0 instead.
    - DPM++ 2S and Heun: both evaluations are CFG++ Preds; their x0 (guided) and eps (uncond) enter
      the update exactly where a plain prediction's would.
    """

    scale: float = 0.6
    history: str = "uncond"

    def __post_init__(self):
        if not 0 <= self.scale <= 1:
            raise ValueError(f"CFG++ scale is lambda in [0, 1], got {self.scale!r} (a CFG scale of "
                             f"5-7.5 corresponds to roughly 0.4-0.6)")
        if self.history not in HISTORIES:
            raise ValueError(f"unknown history {self.history!r}; choose one of: {', '.join(HISTORIES)}")

    def branches(self, pt: Point, state=None):
        if self.scale == 0:  # the unconditional sampler
            return {"u": Branch("neg")}
        return {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        u = preds["u"]
        x0 = u.x0 if "c" not in preds else u.x0 + self.scale * (preds["c"].x0 - u.x0)
        return Pred(x0, u.eps, u.x0 if self.history == "uncond" else None), state

"""CFG++ (Chung et al. 2024, arXiv 2406.08070): guided x0, renoised with the unconditional eps."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.guided import Branch, Guidance, Point
from ..core.pred import Pred
from ..core.registry import register

HISTORIES = ("uncond", "guided")


def step_ratios(ve) -> list[float]:
    """ve / (ve - ve') per step of a grid of VE levels: one CFG++ step with lambda equals a CFG step
    with scale lambda times this (Euler/DDIM; the last step onto ve' = 0 is 1)."""
    ve = [float(v) for v in ve]
    return [a / (a - b) for a, b in zip(ve[:-1], ve[1:]) if a > b]


def equivalence(ve, lambdas=(0.4, 0.6, 1.0)) -> str:
    """'lambda 0.4 / 0.6 / 1.0 act like CFG 1.7 / 2.5 / 4.2' (the median over the grid's steps)."""
    r = sorted(step_ratios(ve))
    med = r[len(r) // 2] if len(r) % 2 else (r[len(r) // 2 - 1] + r[len(r) // 2]) / 2
    return (
        f"lambda {' / '.join(f'{lam:g}' for lam in lambdas)} act like CFG "
        f"{' / '.join(f'{lam * med:.1f}' for lam in lambdas)} per step (median over its {len(r)} "
        f"steps); for a CFG scale s take lambda about s / {med:.1f}"
    )


def default_grid_ve():
    """The VE levels of diffguide's default grid (25 steps) on SD's schedule, for hints."""
    from ..core.schedule import VPSchedule
    from ..core.spacing import timesteps

    sched = VPSchedule.from_betas(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return sched.ve(timesteps(sched, 25, "linspace", drop_last=True)).tolist()


@register("guidance", "cfgpp")
@dataclass(frozen=True)
class CFGpp(Guidance):
    """CFG++ (Chung et al. 2024, Alg. 1): Pred(x0 = D_u + scale (D_c - D_u), eps = eps_u).

    ``scale`` is the paper's lambda in [0, 1] (not a CFG scale: one DDIM step equals CFG at
    lambda ve / (ve - ve'), which grows with the number of steps; ``equivalence`` says it for a
    grid). Every sampler reads the Pred as
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
            raise ValueError(
                f"CFG++ scale is lambda in [0, 1], got {self.scale!r}; on the default 25-step "
                f"grid of an SD schedule {equivalence(default_grid_ve())}"
            )
        if self.history not in HISTORIES:
            raise ValueError(
                f"unknown history {self.history!r}; choose one of: {', '.join(HISTORIES)}"
            )

    def branches(self, pt: Point, state=None):
        if self.scale == 0:  # the unconditional sampler
            return {"u": Branch("neg")}
        return {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        u = preds["u"]
        x0 = u.x0 if "c" not in preds else u.x0 + self.scale * (preds["c"].x0 - u.x0)
        return Pred(x0, u.eps, u.x0 if self.history == "uncond" else None), state

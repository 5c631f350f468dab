"""LinearAG (Castillo et al. 2023, arXiv 2312.12487, Sec. 5): unconditional predictions estimated
by a per-step affine map of past ones, fitted once on recorded CFG trajectories."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..core.guided import Branch, Guidance, Point
from ..core.pred import Pred
from ..core.registry import register

AFTER = ("cond", "cfg")
REUSE = (1.0, 1.0, -1.0, 0.0)  # u ~ c + (u_prev - c_prev): the last guidance difference reused


@lru_cache(maxsize=8)
def load(path: str) -> tuple:
    """Per-evaluation coefficients (a, b, g, d) from a ``diffguide calibrate-linearag`` file."""
    try:
        with open(path) as f:
            data = json.load(f)
        rows = tuple(
            tuple(float(v) for v in r) if r is not None else None for r in data["coefficients"]
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read LinearAG coefficients {path!r}: {e}") from None
    if any(r is not None and len(r) != 4 for r in rows):
        raise ValueError(
            f"LinearAG coefficients {path!r}: each row must have 4 numbers (a, b, g, d)"
        )
    return rows


@register("guidance", "linear_ag")
@dataclass(frozen=True)
class LinearAG(Guidance):
    """LinearAG (Castillo et al. 2023): CFG with the unconditional x0 estimated on alternate steps.

    On every other evaluation while progress < ``until`` the unconditional x0 is estimated as a c +
    b u_prev + g c_prev + d x (x0 space;
    c, u: this and the previous evaluation's conditional and unconditional x0) instead of evaluated.
    After ``until``: conditional only (after="cond", as AG) or plain CFG. ``coefficients``: a file
    written by ``diffguide calibrate-linearag`` (least squares per evaluation on CFG trajectories);
    empty, or an evaluation the file does not cover, reuses the last difference, (1, 1, -1, 0).
    The paper's exact features are not public; these are our choice.
    """

    scale: float = 5.0
    coefficients: str = ""
    until: float = 0.5
    after: str = "cond"

    def __post_init__(self):
        if self.after not in AFTER:
            raise ValueError(f"unknown after {self.after!r}; choose one of: {', '.join(AFTER)}")
        if not math.isfinite(self.scale) or not 0 <= self.until <= 1:
            raise ValueError(
                f"need a finite scale and 0 <= until <= 1, got {self.scale!r}, {self.until!r}"
            )
        if self.coefficients and not os.path.isfile(self.coefficients):
            raise ValueError(f"LinearAG coefficients file {self.coefficients!r} not found")

    def init_state(self):
        return {"k": 0, "prev": None}

    def _progress(self, pt: Point) -> float:
        return float(pt.progress) if pt.t.ndim == 0 else float(pt.progress.mean())

    def branches(self, pt: Point, state=None):
        k, prev = (state or self.init_state())["k"], (state or {}).get("prev")
        if self._progress(pt) >= self.until:
            return (
                {"c": Branch("pos")}
                if self.after == "cond"
                else {"c": Branch("pos"), "u": Branch("neg")}
            )
        if prev is not None and k % 2 == 1:
            return {"c": Branch("pos")}  # estimated
        return {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        state = dict(state or self.init_state())
        c, k = preds["c"], state["k"]
        if "u" in preds:
            u = preds["u"]
        elif self._progress(pt) < self.until and state["prev"] is not None:
            rows = load(self.coefficients) if self.coefficients else ()
            a, b, g, d = rows[k] if k < len(rows) and rows[k] is not None else REUSE
            c_prev, u_prev = state["prev"]
            u = Pred.from_x0(x, a * c.x0 + b * u_prev + g * c_prev + d * x, pt.a, pt.s)
        else:
            state.update(k=k + 1, prev=None)
            return c, state
        state.update(k=k + 1, prev=(c.x0, u.x0))
        return u + self.scale * (c - u), state


@dataclass(frozen=True)
class Recorder(Guidance):
    """CFG that appends (x, c x0, u x0) of every evaluation to ``sink`` (for calibration)."""

    scale: float = 5.0
    sink: list = field(default_factory=list, compare=False, hash=False)
    capturable = False  # it copies every evaluation to the host

    def branches(self, pt, state=None):
        return {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        c, u = preds["c"], preds["u"]
        self.sink.append(
            (x.detach().double().cpu(), c.x0.detach().double().cpu(), u.x0.detach().double().cpu())
        )
        return u + self.scale * (c - u), state


def fit(runs: list[list]) -> list:
    """Least-squares (a, b, g, d) per evaluation index from Recorder sinks (one list per run):
    u_k ~ a c_k + b u_{k-1} + g c_{k-1} + d x_k over every sample and pixel; None for k = 0."""
    n = min(len(r) for r in runs)
    out = [None]
    for k in range(1, n):
        feats, target = [], []
        for r in runs:
            x, c, u = r[k]
            _, c1, u1 = r[k - 1]
            feats.append(torch.stack([c.flatten(), u1.flatten(), c1.flatten(), x.flatten()], 1))
            target.append(u.flatten())
        A, y = torch.cat(feats), torch.cat(target)
        sol = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
        out.append([float(v) for v in sol])
    return out

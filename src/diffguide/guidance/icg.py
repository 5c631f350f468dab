"""Independent Condition Guidance (Sadat, Kansy, Hilliges, Weber 2024, arXiv 2407.02687)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..core.guided import MODEL_INPUTS, Branch, Guidance, Point, _rows
from ..core.registry import register
from ..core.sample import draw

CONDITIONS = ("random", "null", "prompts")
POOL = (
    "icg_prompts"  # the condition name under which a pipeline passes the encoded stand-in prompts
)


def independent(pos: Any, neg: Any, noise, classes: int = 0) -> Any:
    """A condition drawn independently of the prompt, shaped like ``pos``.

    Parts equal in pos and neg (SDXL's size ids), integer masks and the model's own inputs
    (``MODEL_INPUTS``: an embedded guidance value) are kept; other float tensors become
    Gaussian noise with each sample's std of ``pos``; integer tensors (class labels) become uniform
    random labels in [0, classes), classes defaulting to the null label in ``neg`` (DiT's
    convention)."""
    if isinstance(pos, Mapping):
        return {
            k: v
            if k in MODEL_INPUTS
            else independent(v, neg.get(k) if isinstance(neg, Mapping) else None, noise, classes)
            for k, v in pos.items()
        }
    if isinstance(pos, (list, tuple)):
        negs = neg if isinstance(neg, (list, tuple)) and len(neg) == len(pos) else [None] * len(pos)
        return type(pos)(independent(p, q, noise, classes) for p, q in zip(pos, negs))
    if not isinstance(pos, torch.Tensor):
        return pos
    if isinstance(neg, torch.Tensor) and neg.shape == pos.shape and torch.equal(neg, pos):
        return pos
    if not pos.is_floating_point() and pos.ndim > 1:  # an attention mask: the prompt's
        return pos
    if pos.is_floating_point():
        std = (
            pos.float().flatten(1).std(dim=1).view(-1, *([1] * (pos.ndim - 1)))
            if pos.ndim > 1
            else pos.float().std()
        )
        return (draw(noise, pos) * std).to(pos.dtype)
    k = classes or (int(neg.max()) if isinstance(neg, torch.Tensor) and neg.numel() else 0)
    if k < 2:
        raise ValueError(
            "ICG on class labels needs the number of classes: pass classes=N (the "
            "negative condition is not a null label it could be read from)"
        )
    u = draw(noise, pos.float())  # uniform labels from normal draws: floor(k Phi(u))
    return (torch.special.ndtr(u) * k).long().clamp(max=k - 1).to(pos.device)


def stand_in_prompts(spec: str) -> list[str] | None:
    """ICG's prompts option: a file (one per line, # comments), texts joined by '|', or '' (None:
    the pipeline's own caption set)."""
    import os

    if not spec:
        return None
    if os.path.isfile(spec):
        with open(spec) as f:
            texts = [t.strip() for t in f if t.strip() and not t.lstrip().startswith("#")]
    else:
        texts = [t.strip() for t in spec.split("|") if t.strip()]
    if not texts:
        raise ValueError(
            f"ICG prompts {spec!r} has no prompts (a file with one per line, or texts joined by "
            "'|')"
        )
    return texts


def _count(cond) -> int:
    if isinstance(cond, torch.Tensor):
        return int(cond.shape[0])
    if isinstance(cond, Mapping):
        return next(_count(v) for v in cond.values() if isinstance(v, (torch.Tensor, Mapping)))
    raise ValueError("ICG's prompt pool holds no tensors")


@register("guidance", "icg")
@dataclass(frozen=True)
class ICG(Guidance):
    """ICG (Sadat et al. 2024): D(y^) + scale (D(y) - D(y^)), y^ independent of the prompt.

    y^ is redrawn at every evaluation from the run's noise source (per sample): for text models
    Gaussian noise with the std of the prompt's embedding (the paper's scaled Gaussian), for
    class-conditional ones a uniform random class. condition="prompts" draws y^ from real prompts
    instead (the paper's alternative): ``prompts`` is a file with one per line, or texts joined by
    '|'; empty means the model's own caption set (the toy world's for the built-in models). No
    condition-dropout training is needed. condition="null" uses the null condition: exactly CFG.
    """

    scale: float = 5.0
    condition: str = "random"
    classes: int = 0
    prompts: str = ""

    @property
    def capturable(self):  # random labels and prompts are picked on the host at every evaluation
        return self.condition == "null"

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(
                f"unknown ICG condition {self.condition!r}; choose one of: {', '.join(CONDITIONS)}"
            )
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        if self.classes < 0:
            raise ValueError(
                f"classes must be >= 0 (0: read from the null label), got {self.classes!r}"
            )

    def prompt_sets(self):
        if self.condition != "prompts" or self.scale == 1:
            return {}
        return {POOL: stand_in_prompts(self.prompts)}

    def conditions(self, pt: Point, conds, x, noise):
        if self.condition == "null" or self.scale == 1:
            return {}
        if conds.get("pos") is None:
            raise ValueError("ICG needs a conditional model and a prompt (condition 'pos')")
        if self.condition == "prompts":
            pool = conds.get(POOL)
            if pool is None:
                raise ValueError(
                    f"ICG condition=prompts needs its prompts encoded: GuidedPipeline does this; "
                    f"with bare denoisers pass conds={{'{POOL}': <encoded prompts>}}"
                )
            k = _count(pool)
            u = draw(
                noise, torch.zeros(x.shape[0], device=x.device)
            )  # per sample, uniform index below
            idx = (torch.special.ndtr(u) * k).long().clamp(max=k - 1).cpu().tolist()
            return {"icg": _rows(pool, idx)}
        return {"icg": independent(conds["pos"], conds.get("neg"), noise, self.classes)}

    def branches(self, pt: Point, state=None):
        if self.scale == 1:
            return {"c": Branch("pos")}
        return {"c": Branch("pos"), "u": Branch("neg" if self.condition == "null" else "icg")}

    def combine(self, x, pt, preds, state):
        if "u" not in preds:
            return preds["c"], state
        u = preds["u"]
        return u + self.scale * (preds["c"] - u), state

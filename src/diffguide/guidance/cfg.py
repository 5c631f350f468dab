"""Classifier-free guidance with weight schedules, a guidance interval and rescale."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.guided import Branch, Guidance, Point
from ..core.pred import Pred
from ..core.registry import register

# "cogvideox": CFG's own (CogVideoXPipeline's use_dynamic_cfg), not a multiplier of a delta; only
# a guider that names it in check_shaping's ``own`` takes it
WEIGHT_SCHEDULES = ("constant", "linear", "cosine", "clamp_linear", "clamp_cosine", "cogvideox")
OWN_SCHEDULES = ("cogvideox",)
RESCALE_SPACES = ("x0", "eps", "v", "flow")


def weight_factor(pt: Point, schedule: str, floor: float = 0.0):
    """The schedule's multiplier at progress p (mean 1 over p in [0, 1]); clamp_* floored at floor.
    A float in sampling, a [B] tensor when pt has one level per sample. ``schedule`` is one that
    check_shaping let through without ``own`` (not a guider's own rule)."""
    p = pt.progress
    if isinstance(p, torch.Tensor):
        p = p.to(torch.float64)
        cos, clamp = torch.cos, lambda k: k.clamp(min=floor)
    else:
        cos, clamp = math.cos, lambda k: max(k, floor)
    if schedule == "constant":
        k = 1.0 + 0 * p
    elif schedule.endswith("linear"):
        k = 2 * p
    else:
        k = 1 - cos(math.pi * p)
    return clamp(k) if schedule.startswith("clamp") else k


def check_shaping(g, own: tuple = ()) -> None:
    """Validate the weight_schedule, interval and rescale options (CFG's and Modulated's); ``own``:
    the OWN_SCHEDULES that g computes itself (CFG's cogvideox), refused elsewhere."""
    if g.weight_schedule in OWN_SCHEDULES and g.weight_schedule not in own:
        raise ValueError(
            f"weight_schedule {g.weight_schedule} is CFG's own; give it as cfg:weight_schedule="
        )
    if g.weight_schedule not in WEIGHT_SCHEDULES:
        raise ValueError(
            f"unknown weight_schedule {g.weight_schedule!r}; choose one of: "
            f"{', '.join(WEIGHT_SCHEDULES)}"
        )
    if g.rescale_space not in RESCALE_SPACES:
        raise ValueError(
            f"unknown rescale_space {g.rescale_space!r}; choose one of: {', '.join(RESCALE_SPACES)}"
        )
    if not 0 <= g.rescale <= 1:
        raise ValueError(f"rescale must be in [0, 1], got {g.rescale!r}")
    if not 0 <= g.sigma_lo <= g.sigma_hi:
        raise ValueError(f"need 0 <= sigma_lo <= sigma_hi, got {g.sigma_lo!r}, {g.sigma_hi!r}")


OUTPUT_SPACES = ("auto", "eps", "x0", "v", "flow")


def output_space(space: str, pt: Point) -> str:
    """``auto``: the main network's own output kind (eps, v, flow; x0 for x0 models), as diffusers'
    guiders see the raw output; eps where the kind is unknown."""
    if space != "auto":
        return space
    kind = pt.kind or "eps"
    return "x0" if kind == "sample" else kind


def check_space(space: str) -> None:
    if space not in OUTPUT_SPACES:
        raise ValueError(f"unknown space {space!r}; choose one of: {', '.join(OUTPUT_SPACES)}")


def check_finite(g, *names: str) -> None:
    for name in names:
        if not math.isfinite(getattr(g, name)):
            raise ValueError(f"{name} must be a finite number, got {getattr(g, name)!r}")


def check_rescale(rescale: float) -> None:
    if not 0 <= rescale <= 1:
        raise ValueError(f"rescale must be in [0, 1], got {rescale!r}")


def check_window(start: float, stop: float) -> None:
    if not 0 <= start <= stop <= 1:
        raise ValueError(f"need 0 <= start <= stop <= 1, got start={start!r}, stop={stop!r}")


def _in_guider_window(pt: Point, start: float, stop: float) -> bool:
    """diffusers' guider window: int(start n) <= step < int(stop n) for step ``step`` of ``n``;
    True where the sampler reports no step count (as diffusers with no num_inference_steps).
    (perturb.in_window is another rule: SD3's for SLG.)"""
    if pt.step is None or pt.steps is None:
        return True
    return int(start * pt.steps) <= pt.step < int(stop * pt.steps)


def rescaled(x, pt: Point, c: Pred, guided: Pred, phi: float, space: str) -> Pred:
    """Lin et al. 2023, Sec. 3.4: mix in guided rescaled to c's per-sample std, in ``space``."""
    pc, pg = c.output(space, pt.a, pt.s), guided.output(space, pt.a, pt.s)
    dims = tuple(range(1, pg.ndim))
    ratio = pc.std(dim=dims, keepdim=True) / pg.std(dim=dims, keepdim=True)
    return Pred.from_output(space, pg * (phi * ratio + (1 - phi)), x, pt.a, pt.s)


def renormed(x, pt: Point, c: Pred, guided: Pred, patch: int, space: str) -> Pred:
    """The guided prediction scaled, per patch x patch block over all channels, to the L2 norm of
    the conditional one, in ``space`` (QwenImagePipeline's true CFG: per 2 x 2 latent token of the
    raw flow output)."""
    pc, pg = c.output(space, pt.a, pt.s), guided.output(space, pt.a, pt.s)
    b, ch, h, w = pg.shape
    if h % patch or w % patch:
        raise ValueError(f"renorm={patch} needs height and width divisible by it, got {h}x{w}")

    def block_norm(v):
        return torch.linalg.vector_norm(
            v.reshape(b, ch, h // patch, patch, w // patch, patch), dim=(1, 3, 5), keepdim=True
        )

    ratio = (
        (block_norm(pc) / block_norm(pg))
        .expand(b, ch, h // patch, patch, w // patch, patch)
        .reshape(b, ch, h, w)
    )
    return Pred.from_output(space, pg * ratio, x, pt.a, pt.s)


@register("guidance", "none")
@dataclass(frozen=True)
class NoGuidance(Guidance):
    """The conditional prediction alone (one evaluation per step)."""

    def branches(self, pt: Point, state=None):
        return {"c": Branch("pos")}

    def combine(self, x, pt, preds, state):
        return preds["c"], state


@register("guidance", "cfg")
@dataclass(frozen=True)
class CFG(Guidance):
    """Classifier-free guidance (Ho & Salimans 2022): u + scale (c - u), scale as in diffusers.

    weight_schedule varies w = scale - 1 with progress p (0 at noise, 1 at data) keeping its mean
    (Wang et al. 2024, Sec. 3): linear 2 w p, cosine w (1 - cos pi p), clamp_* = max(floor, .).
    Guidance applies only while the VE level s/a lies in [sigma_lo, sigma_hi] (Kynkaanniemi et al.
    2024), read at each evaluation's own level (the authors' Heun sampler decides once per step, so
    its correction at t_next may differ at the interval's edges); elsewhere, and wherever the scale
    is 1, only the conditional branch is evaluated. rescale
    mixes in the guided prediction rescaled to the conditional one's per-sample std (Lin et al.
    2023, Sec. 3.4) in rescale_space; diffusers rescales the raw output (eps, or v for v-models).
    renorm=p keeps the conditional prediction's L2 norm over each p x p block (all channels) in
    rescale_space: renorm=2, rescale_space=flow is QwenImagePipeline's norm-preserving true CFG.
    """

    scale: float = 5.0
    weight_schedule: str = "constant"
    floor: float = 1.0  # on the guidance weight w = scale - 1 (Wang et al.'s clamp at 1)
    sigma_lo: float = 0.0
    sigma_hi: float = math.inf
    rescale: float = 0.0
    rescale_space: str = "x0"
    renorm: int = 0

    def __post_init__(self):
        check_shaping(self, own=OWN_SCHEDULES)
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        if self.renorm < 0:
            raise ValueError(f"renorm must be 0 (off) or a patch size >= 1, got {self.renorm!r}")

    def scale_at(self, pt: Point):
        """The diffusers-convention scale at this point: a float in sampling, [B] in training."""
        ve, sched = pt.ve, self.weight_schedule
        if sched == "cogvideox":
            return self._cogvideox(pt)
        w = (self.scale - 1.0) * weight_factor(pt, sched.replace("clamp_", ""))
        if isinstance(w, torch.Tensor) or isinstance(ve, torch.Tensor):
            w, ve = (
                torch.as_tensor(w, dtype=torch.float64),
                torch.as_tensor(ve, dtype=torch.float64),
            )
            clamp, where = lambda v: v.clamp(min=self.floor), torch.where
        else:
            clamp, where = lambda v: max(v, self.floor), lambda c, a, b: a if c else b
        if sched.startswith("clamp"):
            w = clamp(w)
        inside = (ve >= self.sigma_lo) & (ve <= self.sigma_hi)
        return where(inside, 1 + w, 1 + 0 * w)

    def _cogvideox(self, pt: Point) -> float:
        """CogVideoXPipeline's use_dynamic_cfg, as written there: 1 + scale (1 - cos(pi ((n - t) /
        n)^5)) / 2 with n the step count and t the network's (integer) timestep."""
        if pt.steps is None or pt.time is None:  # a plan's probe of the branches: both are needed
            return 1 + self.scale
        n = pt.steps
        w = 1 + self.scale * (1 - math.cos(math.pi * ((n - pt.time) / n) ** 5.0)) / 2
        return w if self.sigma_lo <= pt.ve <= self.sigma_hi else 1.0

    def branches(self, pt: Point, state=None):
        g = self.scale_at(pt)
        if isinstance(g, torch.Tensor):  # per-sample scales (training): skip only if all agree
            g = g.unique().tolist()
            g = g[0] if len(g) == 1 else None
        if g == 1:
            return {"c": Branch("pos")}
        if g == 0:
            return {"u": Branch("neg")}
        return {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        if "u" not in preds or "c" not in preds:
            return preds.get("c", preds.get("u")), state
        c, u = preds["c"], preds["u"]
        g = self.scale_at(pt)
        guided = u + g * (c - u)
        if self.rescale > 0:
            guided = rescaled(x, pt, c, guided, self.rescale, self.rescale_space)
        if self.renorm:
            guided = renormed(x, pt, c, guided, self.renorm, self.rescale_space)
        return guided, state


@dataclass(frozen=True)
class ComfyPatch(Guidance):
    """Base of ComfyUI's cfg-function patches (Mahiro, Skimmed CFG, FreSca): ``scale`` is the
    sampler's CFG scale (ComfyUI's KSampler default 8), and at scale 1 ComfyUI runs no uncond and
    leaves c as it is, so only c is evaluated then. Subclasses write ``guide(x, pt, c, u)``."""

    scale: float = 8.0

    def __post_init__(self):
        check_finite(self, "scale")

    def branches(self, pt: Point, state=None):
        return {"c": Branch("pos")} if self.scale == 1 else {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        if "u" not in preds:
            return preds["c"], state
        return self.guide(x, pt, preds["c"], preds["u"]), state

    def guide(self, x, pt: Point, c: Pred, u: Pred) -> Pred:
        raise NotImplementedError

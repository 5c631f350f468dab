"""A diffguide guidance method as a ComfyUI GUIDER, built the way ComfyUI builds its own guiders
(comfy.samplers.CFGGuider subclasses such as PerpNeg's and DualCFG's).

Each evaluation asks the method for its branches, runs the conditions they need (positive,
negative) through ComfyUI's ``calc_cond_batch`` in one batched call, turns each denoised output
into Pred(x0, eps) at the model's level (``levels``) and hands them to the method's own
``combine``: the guidance maths is diffguide's. ComfyUI's model patches around a guider still act:
``sampler_pre_cfg_function`` on the branch outputs, ``sampler_post_cfg_function`` on the result
(with the conditional and unconditional outputs, as ComfyUI's own guiders pass them); a
``sampler_cfg_function`` does not, the method takes its place.

What a guider cannot give is refused by name before sampling (``refusal``): branches that perturb
the network (PAG, SEG, SLG, STG, TPG, NAG, TSG), a second model (AutoGuidance), conditions the
method draws itself (ICG's), a renoise eps other than the guided one (CFG++: a guider returns only
the denoised sample) and gradients.
"""

from __future__ import annotations

import functools
import math

import torch

from ..core.guided import Guidance, Point
from ..core.pred import Pred
from ..core.registry import parse_spec
from . import levels

_PERTURBED = (
    "evaluates the network with its {what} perturbed in an extra branch, which a ComfyUI guider "
    "cannot run (it calls the model as it is)"
)
REFUSED = {
    "pag": _PERTURBED.format(what="self-attention"),
    "seg": _PERTURBED.format(what="self-attention"),
    "slg": _PERTURBED.format(what="layers"),
    "stg": _PERTURBED.format(what="spatio-temporal layers"),
    "tpg": _PERTURBED.format(what="tokens"),
    "nag": _PERTURBED.format(what="cross-attention"),
    "tsg": _PERTURBED.format(what="time-step embedding"),
    "autoguidance": "needs a second (guide) model, which a ComfyUI guider of one MODEL has not",
    "cfgpp": "renoises with the unconditional eps, and a ComfyUI guider returns only the denoised "
    "sample; cfg:scale=LAMBDA with ComfyUI's *_cfg_pp samplers is CFG++",
}
# ComfyUI's conditions by diffguide's names
CONDITIONS = {"pos": "positive", "neg": "negative"}


def leaves(guidance: Guidance) -> list[Guidance]:
    """The registered methods a composed spec is made of ('+' sums, '@' modulations)."""
    if hasattr(guidance, "parts"):
        return [g for part in guidance.parts for g in leaves(part)]
    if hasattr(guidance, "inner"):
        return leaves(guidance.inner)
    return [guidance]


def refusal(guidance: Guidance) -> str | None:
    """Why a ComfyUI guider cannot run this method ('<method> <reason>'), or None when it can."""
    if guidance.needs_grad:
        return "the spec differentiates through the network, which a ComfyUI guider cannot"
    for g in leaves(guidance):
        name = getattr(g, "name", type(g).__name__)
        if name in REFUSED:
            return f"{name} {REFUSED[name]}"
        if name == "icg" and g.condition != "null" and g.scale != 1:
            return (
                f"icg with condition={g.condition} draws its own conditions at every "
                "evaluation, which a ComfyUI guider cannot encode (condition=null is CFG)"
            )
    return None


def checked_guidance(spec: str) -> Guidance:
    """A guidance spec parsed and checked for a ComfyUI guider; ValueError names what fails."""
    guidance = parse_spec("guidance", spec)
    why = refusal(guidance)
    if why is not None:
        raise ValueError(f"DiffguideGuider cannot run {spec!r}: {why}")
    return guidance


def _branch_error(name, branch) -> str | None:
    """Why a branch the method asked for cannot run in a guider (a safety net behind
    ``refusal``)."""
    if branch.perturb is not None:
        return f"branch {name!r} perturbs the network"
    if branch.model != "main":
        return f"branch {name!r} needs model {branch.model!r}"
    if branch.cond not in CONDITIONS:
        return f"branch {name!r} needs condition {branch.cond!r}"
    return None


class GuidedRun:
    """One sampling run of a guidance method inside a ComfyUI guider: its schedule, its state."""

    def __init__(self, guidance: Guidance, model_sampling, sigmas=None):
        self.guidance, self.state = guidance, guidance.init_state()
        top = None if sigmas is None else levels.finite_top(sigmas)
        self.schedule = levels.model_schedule(model_sampling, top=top)
        self.kind = levels.output_kind(model_sampling)
        self.grid = None  # the run's sigmas as floats, read once

    def point(self, sigma: float, model_options: dict) -> Point:
        """Where the sampler is: the level's time, and its step of ComfyUI's grid (the count of
        grid levels above it: a Heun correction at the next level counts as the next step)."""
        t = levels.times(self.schedule, torch.tensor([sigma]))[0]
        if self.grid is None:
            grid = model_options.get("transformer_options", {}).get("sample_sigmas")
            self.grid = [] if grid is None else [float(v) for v in grid]
        step = steps = None
        if len(self.grid) > 1:
            step = sum(v > sigma * (1 + 1e-6) for v in self.grid)
            steps = len(self.grid) - 1
        clock = lambda t: float(self.schedule.model_time(t))
        return Point(t, self.schedule, step, steps, self.kind, clock)

    def denoised(self, model, conds: dict, x, timestep, model_options: dict, calc) -> torch.Tensor:
        """The guided denoised sample at ComfyUI's x and sigma; ``calc`` is calc_cond_batch."""
        sigma = float(timestep.flatten()[0])
        if not torch.all(timestep == timestep.flatten()[0]):
            raise ValueError("DiffguideGuider needs one noise level for the whole batch")
        pt = self.point(sigma, model_options)
        branches = dict(self.guidance.branches(pt, self.state))
        for name, branch in branches.items():
            why = _branch_error(name, branch)
            if why is not None:
                raise ValueError(f"DiffguideGuider: {why}, which a ComfyUI guider cannot give")
        needed = {b.cond for b in branches.values()}
        if model_options.get("disable_cfg1_optimization", False):
            needed.add("neg")  # a hook reads the negative's output (ComfyUI's *_cfg_pp samplers)
        # ComfyUI's order, [cond, uncond], with None for a condition that is not evaluated
        wanted = [conds.get(CONDITIONS[k]) if k in needed else None for k in ("pos", "neg")]
        out = calc(model, wanted, x, timestep, model_options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn(self._pre_args(wanted, out, model, x, timestep, model_options))
        by_cond = dict(zip(("pos", "neg"), out))
        if sigma == 0:  # no eps at the data end: nothing left to guide
            return by_cond["pos" if "pos" in needed else "neg"]
        guided = self._combine(x, pt, branches, by_cond)
        for fn in model_options.get("sampler_post_cfg_function", []):
            guided = fn(self._post_args(guided, model, wanted, out, x, timestep, model_options))
        return guided

    def _combine(self, x, pt: Point, branches: dict, by_cond: dict) -> torch.Tensor:
        """The method's combine on Preds in the schedule's coordinates; the guided x0 back."""
        c = levels.scale_at(self.schedule, pt.t)
        xs = x * c
        preds = {}
        for name, b in branches.items():
            rows = slice(None) if b.rows is None else list(b.rows)
            preds[name] = Pred.from_x0(xs[rows], by_cond[b.cond][rows].to(x.dtype), pt.a, pt.s)
        guided, self.state = self.guidance.combine(xs, pt, preds, self.state)
        return guided.x0.to(x.dtype)

    def _scale(self) -> float:
        """The method's scale where it has one (ComfyUI's hooks read a cond_scale)."""
        scale = getattr(self.guidance, "scale", 1.0)
        return float(scale) if isinstance(scale, (int, float)) and math.isfinite(scale) else 1.0

    def _pre_args(self, wanted, out, model, x, timestep, model_options) -> dict:
        """The arguments ComfyUI's sampling_function gives a sampler_pre_cfg_function."""
        return {
            "conds": wanted,
            "conds_out": out,
            "cond_scale": self._scale(),
            "timestep": timestep,
            "input": x,
            "sigma": timestep,
            "model": model,
            "model_options": model_options,
        }

    def _post_args(self, guided, model, wanted, out, x, timestep, model_options) -> dict:
        """The arguments ComfyUI's cfg_function gives a sampler_post_cfg_function."""
        return {
            "denoised": guided,
            "cond": wanted[0],
            "uncond": wanted[1],
            "cond_scale": self._scale(),
            "model": model,
            "uncond_denoised": out[1],
            "cond_denoised": out[0],
            "sigma": timestep,
            "model_options": model_options,
            "input": x,
        }


@functools.lru_cache(maxsize=None)
def guider_class():
    """The CFGGuider subclass (made once, when ComfyUI is there to subclass)."""
    import comfy.samplers

    class DiffguideCFGGuider(comfy.samplers.CFGGuider):
        """ComfyUI's CFGGuider with a diffguide guidance method in place of its CFG."""

        def set_guidance(self, guidance: Guidance):
            self.guidance = guidance
            self.run = None

        def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
            # a fresh run (the method's state: APG's momentum, AG's switches) for every sampling
            ms = self.model_patcher.get_model_object("model_sampling")
            self.run = GuidedRun(self.guidance, ms, sigmas)
            return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            if self.run is None:  # called outside sample(): a run of its own
                ms = self.model_patcher.get_model_object("model_sampling")
                self.run = GuidedRun(self.guidance, ms)
            calc = comfy.samplers.calc_cond_batch
            return self.run.denoised(self.inner_model, self.conds, x, timestep, model_options, calc)

    return DiffguideCFGGuider


def make_guider(model, positive, negative, spec: str):
    """A ComfyUI GUIDER for MODEL ``model`` guiding with the diffguide spec ``spec``."""
    guidance = checked_guidance(spec)
    guider = guider_class()(model)
    guider.set_conds(positive, negative)
    guider.set_guidance(guidance)
    return guider

"""A diffguide guidance method as a ComfyUI GUIDER, built the way ComfyUI builds its own guiders
(comfy.samplers.CFGGuider subclasses such as PerpNeg's and DualCFG's).

Each evaluation asks the method for its branches, runs the conditions they need (positive,
negative) through ComfyUI's ``calc_cond_batch`` in one batched call, turns each denoised output
into Pred(x0, eps) at the model's level (``levels``) and hands them to the method's own
``combine``: the guidance maths is diffguide's. ComfyUI's model patches around a guider still act:
``sampler_calc_cond_batch_function`` in place of calc_cond_batch (SkipLayerGuidanceDiTSimple's),
``sampler_pre_cfg_function`` on the branch outputs, ``sampler_post_cfg_function`` on the result
(with the conditional and unconditional outputs, as ComfyUI's own guiders pass them); a
``sampler_cfg_function`` does not, the method takes its place. ComfyUI's cfg stands for the
method's scale: a wrapper that sets the guider's cfg for some evaluations (CFGOverride) sets the
method's scale there, and a spec without one numeric scale is refused when that happens.

What a guider cannot give is refused by name before sampling (``refusal``): branches that perturb
the network (PAG, SEG, SLG, STG, TPG, NAG, TSG), a second model (AutoGuidance), conditions the
method draws itself (ICG's), a renoise eps other than the guided one (CFG++: a guider returns only
the denoised sample) and gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ..core.guided import Guidance, Point
from ..core.pred import Pred
from ..core.registry import parse_spec
from ..core.spacing import comfy_times
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


def scale_of(guidance: Guidance) -> float | None:
    """The method's one numeric scale, which ComfyUI's cfg stands for (through '@' modulations;
    1 for none, the conditional alone); None for a sum, a scale schedule or a method without one."""
    if isinstance(getattr(guidance, "inner", None), Guidance):
        return scale_of(guidance.inner)
    if getattr(guidance, "name", None) == "none":
        return 1.0
    scale = getattr(guidance, "scale", None)
    number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    return float(scale) if number and math.isfinite(scale) else None


def _settable(guidance: Guidance) -> bool:
    """True when the method (or the one a modulation wraps) has a numeric scale field to set."""
    if isinstance(getattr(guidance, "inner", None), Guidance):
        return _settable(guidance.inner)
    fields = dataclasses.fields(guidance) if dataclasses.is_dataclass(guidance) else ()
    return any(f.name == "scale" for f in fields) and scale_of(guidance) is not None


def with_scale(guidance: Guidance, cfg: float, spec: str) -> Guidance:
    """The method with ComfyUI's cfg as its scale (a wrapper such as CFGOverride set the guider's
    cfg); ValueError in one line where the spec has no single scale for it to set."""
    if scale_of(guidance) == cfg:
        return guidance
    if not _settable(guidance):
        raise ValueError(
            f"DiffguideGuider: a model wrapper (ComfyUI's CFGOverride, ...) set the guider's cfg "
            f"to {cfg:g}, and {spec!r} has no single scale for it to set; give the range in the "
            "spec instead (e.g. its @sigma_lo=,sigma_hi= interval)"
        )
    if isinstance(getattr(guidance, "inner", None), Guidance):
        return dataclasses.replace(guidance, inner=with_scale(guidance.inner, cfg, spec))
    return dataclasses.replace(guidance, scale=cfg)


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
        """Where the sampler is: the level's time, and its step of ComfyUI's grid: i for a level in
        (sigma_i+1, sigma_i], so a midpoint (dpm_2's, dpmpp_sde's) and a first flow sigma of 1
        moved down (offset_first_sigma_for_snr) stay in their step, while an evaluation at
        sigma_i+1 itself (a Heun correction) counts as the next step."""
        t = comfy_times(self.schedule, torch.tensor([sigma]))[0]
        if self.grid is None:
            grid = model_options.get("transformer_options", {}).get("sample_sigmas")
            self.grid = [] if grid is None else [float(v) for v in grid]
        step = steps = None
        if len(self.grid) > 1:
            # grid levels at or above sigma (float32 rounding aside), less the step's own
            step = max(0, sum(v >= sigma * (1 - 1e-6) for v in self.grid) - 1)
            steps = len(self.grid) - 1
        clock = lambda t: float(self.schedule.model_time(t))
        return Point(t, self.schedule, step, steps, self.kind, clock)

    def denoised(
        self, model, conds: dict, x, timestep, model_options: dict, calc, guidance=None
    ) -> torch.Tensor:
        """The guided denoised sample at ComfyUI's x and sigma; ``calc`` is calc_cond_batch;
        ``guidance``: the run's method with another scale for this evaluation (ComfyUI's cfg)."""
        sigma = float(timestep.flatten()[0])
        if not torch.all(timestep == timestep.flatten()[0]):
            raise ValueError("DiffguideGuider needs one noise level for the whole batch")
        if model_options.get("sampler_cfg_function") is not None:
            # it would replace the method's combine; ignoring it would drop the user's patch
            raise ValueError(
                "DiffguideGuider: the model carries a sampler_cfg_function (a patch such as "
                "RescaleCFG's that replaces CFG's combine), which the guidance method takes the "
                "place of; remove the patch (diffguide's cfg:rescale=R is RescaleCFG)"
            )
        guidance = self.guidance if guidance is None else guidance
        pt = self.point(sigma, model_options)
        branches = dict(guidance.branches(pt, self.state))
        for name, branch in branches.items():
            why = _branch_error(name, branch)
            if why is not None:
                raise ValueError(f"DiffguideGuider: {why}, which a ComfyUI guider cannot give")
        needed = {b.cond for b in branches.values()}
        if model_options.get("disable_cfg1_optimization", False):
            needed.add("neg")  # a hook reads the negative's output (ComfyUI's *_cfg_pp samplers)
        # ComfyUI's order, [cond, uncond], with None for a condition that is not evaluated
        wanted = [conds.get(CONDITIONS[k]) if k in needed else None for k in ("pos", "neg")]
        hook = model_options.get("sampler_calc_cond_batch_function")
        if hook is None:
            out = calc(model, wanted, x, timestep, model_options)
        else:  # as ComfyUI's sampling_function calls it (SkipLayerGuidanceDiTSimple's)
            args = {"conds": wanted, "input": x, "sigma": timestep, "model": model}
            out = hook({**args, "model_options": model_options})
        scale = _scale(guidance)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn(_pre_args(wanted, out, scale, model, x, timestep, model_options))
        by_cond = dict(zip(("pos", "neg"), out))
        if sigma == 0:  # no eps at the data end: nothing left to guide
            return by_cond["pos" if "pos" in needed else "neg"]
        guided = self._combine(guidance, x, pt, branches, by_cond)
        for fn in model_options.get("sampler_post_cfg_function", []):
            args = _post_args(guided, scale, model, wanted, out, x, timestep, model_options)
            guided = fn(args)
        return guided

    def _combine(self, guidance, x, pt: Point, branches: dict, by_cond: dict) -> torch.Tensor:
        """The method's combine on Preds in the schedule's coordinates; the guided x0 back."""
        c = levels.scale_at(self.schedule, pt.t)
        xs = x * c
        preds = {}
        for name, b in branches.items():
            rows = slice(None) if b.rows is None else list(b.rows)
            preds[name] = Pred.from_x0(xs[rows], by_cond[b.cond][rows].to(x.dtype), pt.a, pt.s)
        guided, self.state = guidance.combine(xs, pt, preds, self.state)
        return guided.x0.to(x.dtype)


def _scale(guidance: Guidance) -> float:
    """The method's scale where it has one (ComfyUI's hooks read a cond_scale), else 1."""
    scale = scale_of(guidance)
    return 1.0 if scale is None else scale


def _pre_args(wanted, out, scale, model, x, timestep, model_options) -> dict:
    """The arguments ComfyUI's sampling_function gives a sampler_pre_cfg_function."""
    return {
        "conds": wanted,
        "conds_out": out,
        "cond_scale": scale,
        "timestep": timestep,
        "input": x,
        "sigma": timestep,
        "model": model,
        "model_options": model_options,
    }


def _post_args(guided, scale, model, wanted, out, x, timestep, model_options) -> dict:
    """The arguments ComfyUI's cfg_function gives a sampler_post_cfg_function."""
    return {
        "denoised": guided,
        "cond": wanted[0],
        "uncond": wanted[1],
        "cond_scale": scale,
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

        def set_guidance(self, guidance: Guidance, spec: str | None = None):
            self.guidance, self.run = guidance, None
            self.spec = repr(guidance) if spec is None else spec
            # ComfyUI's cfg stands for the method's scale (None: it has no single one); a wrapper
            # that changes it (CFGOverride) changes the scale of the evaluations it wraps
            self.cfg = self.own_cfg = scale_of(guidance)
            self.rescaled = {}

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
            guidance = self._guidance()
            args = (self.inner_model, self.conds, x, timestep, model_options, calc)
            return self.run.denoised(*args, guidance=guidance)

        def _guidance(self) -> Guidance:
            """The method at the guider's cfg as a wrapper left it for this evaluation."""
            cfg = self.cfg
            if cfg == self.own_cfg:
                return self.guidance
            if cfg not in self.rescaled:
                self.rescaled[cfg] = with_scale(self.guidance, float(cfg), self.spec)
            return self.rescaled[cfg]

    return DiffguideCFGGuider


def make_guider(model, positive, negative, spec: str):
    """A ComfyUI GUIDER for MODEL ``model`` guiding with the diffguide spec ``spec``."""
    guidance = checked_guidance(spec)
    guider = guider_class()(model)
    guider.set_conds(positive, negative)
    guider.set_guidance(guidance, spec)
    return guider

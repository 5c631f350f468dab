"""diffguide's guidance methods as diffusers guiders, for diffusers' modular pipelines.

A diffusers guider is told the step (``set_state``), splits the conditions into one batch per
forward pass (``prepare_inputs``), may change the network around each forward (``prepare_models``,
``cleanup_models``) and combines the raw outputs (``__call__``). ``DiffguideGuidance`` does each
with the diffguide method's own parts: its branches are the batches, its perturbations are entered
around their forward (and left however it ends), the outputs become Preds at the noise level the
pipeline's scheduler scales the network's input with, the method's own ``combine`` guides them,
and the result goes back in the network's output kind.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput

from ..core.guided import Branch, Guidance, Point, row_mask
from ..core.pred import Pred
from ..core.registry import parse_spec, to_spec
from ..core.schedule import FlowSchedule, VPSchedule
from ..guidance import ICG, NAG, TPG, TSG, AdaptiveGuidance, AutoGuidance, CFGpp, Modulated, Sum
from .schedulers import _DDIM_LIKE, _DPM_LIKE, _EULER_LIKE, _FLOW, from_scheduler

# why a method cannot be a diffusers guider: each needs something a guider is not given
REFUSED = {
    CFGpp: "it renoises the guided x0 with the unconditional eps, two outputs, and a diffusers "
    "scheduler takes one and re-derives the other from it",
    AutoGuidance: "its guide is a second model, and a diffusers guider runs the pipeline's one "
    "denoiser (diffusers' AutoGuidance skips layers of that one: slg here)",
    AdaptiveGuidance: "it drops the unconditional branch image by image (a subset of the batch's "
    "rows), and a diffusers guider runs whole batches",
    ICG: "it draws a random condition at every evaluation from the run's per-image generators, "
    "which a diffusers guider does not see",
    TSG: "it draws its time-embedding noise from the run's per-image generators, which a diffusers "
    "guider does not see",
    TPG: "its token permutations follow each image's seed in the run's generators, which a "
    "diffusers guider does not see",
    NAG: "its conditional forward also reads the negative prompt's encodings, and a diffusers "
    "guider gives each forward one condition",
}


def refusal(method: Guidance) -> str | None:
    """Why ``method`` (or a part of it) cannot work as a diffusers guider; None if it can."""
    if isinstance(method, Sum):
        return next(filter(None, map(refusal, method.parts)), None)
    if isinstance(method, Modulated):
        return refusal(method.inner)
    name = getattr(method, "name", type(method).__name__)
    for cls, why in REFUSED.items():
        if isinstance(method, cls):
            return f"{name} cannot be a diffusers guider: {why}"
    if method.needs_grad:
        return f"{name} cannot be a diffusers guider: it differentiates through the network"
    own = type(method).conditions is not Guidance.conditions
    if own or type(method).prompt_sets is not Guidance.prompt_sets:
        return f"{name} cannot be a diffusers guider: it brings conditions of its own"
    return None


def _method(guidance) -> Guidance:
    """A spec string or Guidance object as a Guidance, refused if it cannot be a guider."""
    method = parse_spec("guidance", guidance) if isinstance(guidance, str) else guidance
    if not isinstance(method, Guidance):
        raise ValueError(
            f"guidance must be a diffguide spec or Guidance, got {type(guidance).__name__}"
        )
    why = refusal(method)
    if why is not None:
        raise ValueError(why)
    return method


def _spec(method: Guidance) -> str:
    """A Guidance object's spec, which the guider's config holds."""
    try:
        return to_spec(method)
    except ValueError as e:
        raise ValueError(f"a diffusers guider's config is its spec, and {e}") from None


class _Network:
    """The diffusers network as diffguide's perturbations and checks look for it (``.module``)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module


def _sample(args, kwargs):
    """The noisy sample a diffusers network is called with (UNets' sample, transformers'
    hidden_states)."""
    x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
    if not isinstance(x, torch.Tensor):
        raise ValueError("DiffguideGuidance found no sample tensor in the network's inputs")
    return x


# the schedulers from_scheduler knows by name (schedulers.py); it reads any other as a VP one with
# eps output, which would give a flow, VE or consistency scheduler wrong levels and output kinds
SCHEDULERS = _DDIM_LIKE | _DPM_LIKE | _EULER_LIKE | _FLOW
SCALED_INPUTS = {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "SCMScheduler"}

# the level a two-evaluation scheduler scales the network's input with at its second evaluation
# (its scale_model_input), where that is not its sigma at the step index
SECOND_LEVEL = {
    "KDPM2DiscreteScheduler": lambda s, i: s.sigmas_interpol[i],
    "KDPM2AncestralDiscreteScheduler": lambda s, i: s.sigmas_interpol[i - 1],
    "DPMSolverSDEScheduler": lambda s, i: s.mid_point_sigma,
}


def _same_time(a, b) -> bool:
    """Whether two timesteps are one (the loop's is an element of the scheduler's own tensor)."""
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6)


def _elsewhere(scheduler, timestep, state: str) -> ValueError:
    """The error of a guider whose scheduler is not the one the loop steps."""
    return ValueError(
        f"DiffguideGuidance's scheduler ({type(scheduler).__name__}) {state}, and the loop is at "
        f"timestep {float(timestep):g}: the guider is bound to another pipeline's scheduler; "
        "rebind with guider.bind(pipe)"
    )


def _step_index(scheduler, timestep) -> int:
    """The step index the scheduler's own step will use (set by its first step or its begin index,
    else the timestep's), refused where its timestep there is not the loop's."""
    ts, i = scheduler.timesteps, scheduler.step_index
    i = scheduler.begin_index if i is None else i
    if i is None:
        try:
            i = scheduler.index_for_timestep(timestep)
        except IndexError:  # not on its grid
            raise _elsewhere(scheduler, timestep, "has no such timestep") from None
    if i >= len(ts):
        raise _elsewhere(scheduler, timestep, f"has run all its {len(ts)} steps")
    if not _same_time(ts[i], timestep):
        raise _elsewhere(scheduler, timestep, f"is at timestep {float(ts[i]):g}")
    return i


def noise_level(scheduler, timestep, flow: bool) -> float:
    """The VE level s / a the network's input is at: the sigma the scheduler scales it with at its
    step index (the flow time on flow schedulers; a second evaluation's own level on KDPM2 and
    DPMSolverSDE), else from alphas_cumprod at the timestep (DDIM, DDPM, ...)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and hasattr(scheduler, "index_for_timestep"):
        i = _step_index(scheduler, timestep)
        second = SECOND_LEVEL.get(type(scheduler).__name__)
        first = getattr(scheduler, "state_in_first_order", True)
        sigma = float(sigmas[i] if first or second is None else second(scheduler, i))
        if not flow:
            return sigma
        return math.inf if sigma >= 1 else sigma / (1 - sigma)
    if not any(_same_time(t, timestep) for t in scheduler.timesteps.tolist()):
        raise _elsewhere(scheduler, timestep, "has no such timestep")
    ac = float(scheduler.alphas_cumprod[int(timestep)])
    return math.inf if ac == 0 else math.sqrt((1 - ac) / ac)


def _snake(name: str) -> str:
    """A class name in snake case (IdentityAttention: identity_attention)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class DiffguideGuidance(BaseGuidance):
    """A diffguide guidance method (``guidance``: a spec such as ``"apg:scale=7"``, ``+`` and ``@``
    included) as a diffusers guider. It reads the noise level from the scheduler of the pipeline it
    is bound to (``as_diffusers_guider(spec, pipeline)`` or ``bind``)."""

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(self, guidance: str = "cfg", enabled: bool = True):
        super().__init__(0.0, 1.0, enabled)
        self.method = _method(guidance)
        # the config holds the spec (JSON, also for a Guidance object), never marked as a default
        # value, nor is an argument given a value of its own: diffusers marks arguments given by
        # position so, and new() would drop them
        spec = guidance if isinstance(guidance, str) else _spec(self.method)
        params = inspect.signature(DiffguideGuidance.__init__).parameters
        used = self.config.get("_use_default_values", [])
        unset = [k for k in used if k != "guidance" and self.config[k] == params[k].default]
        self.register_to_config(guidance=spec, _use_default_values=unset)
        self._source = None  # the pipeline (or scheduler) whose scheduler sets the noise level
        self._info = (None, None)  # (scheduler, SchedulerInfo) last read
        self._checked = set()  # networks the method's check has accepted
        self._ids = {}  # branch -> its batch name, kept for the guider's life
        self._last = None  # (step, num_inference_steps) of the last set_state
        self._run_state = None
        self._point = None
        self._batches = None  # this step's distinct branches, in the order of the forwards
        self._names = {}  # this step's branch names -> their branches
        self._x = None
        self._armed = None  # (network, its wrapped forward, the forward it replaced, end hook)
        self._stale = []  # end hooks a failed call could not remove from inside itself

    def bind(self, source) -> "DiffguideGuidance":
        """Read the noise level from ``source``: a pipeline (its current ``.scheduler``) or a
        scheduler."""
        self._source = source
        self._last = None  # a new run starts at the next step
        return self

    def new(self, **kwargs) -> "DiffguideGuidance":
        """A copy with options changed (diffusers' ``new``), bound to the same pipeline."""
        return super().new(**kwargs).bind(self._source)

    def _scheduler_info(self):
        """(the scheduler, its SchedulerInfo), read again when the pipeline's scheduler changes."""
        if self._source is None:
            raise ValueError(
                "DiffguideGuidance reads the noise level from the pipeline's scheduler: build it "
                "with as_diffusers_guider(spec, pipeline)"
            )
        scheduler = getattr(self._source, "scheduler", self._source)
        cached, info = self._info
        if cached is not scheduler:
            name = type(scheduler).__name__
            if name not in SCHEDULERS | SCALED_INPUTS:
                raise ValueError(
                    f"DiffguideGuidance does not know {name}'s noise levels and output kind; it "
                    f"reads those of {', '.join(sorted(SCHEDULERS))}"
                )
            info = from_scheduler(scheduler)
            if info.precondition is not None or not isinstance(
                info.schedule, (VPSchedule, FlowSchedule)
            ):
                raise ValueError(
                    f"DiffguideGuidance does not read {info.name}'s scaled network inputs "
                    "(EDM or TrigFlow); use GuidedPipeline for this model"
                )
            self._info = (scheduler, info)
        return scheduler, info

    def _point_at(self, step: int, steps: int, timestep) -> Point:
        """Where the sampler is, as diffguide's methods read it."""
        scheduler, info = self._scheduler_info()
        ve = noise_level(scheduler, timestep, isinstance(info.schedule, FlowSchedule))
        t = info.schedule.t_of_ve(torch.tensor(ve, dtype=torch.float64))
        time = float(timestep)  # the network's time input (CogVideoX's CFG schedule reads it)
        return Point(t, info.schedule, step, steps, info.kind, lambda _: time)

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        """A step starts: the method's branches at this point, its state fresh when a run starts."""
        super().set_state(step, num_inference_steps, timestep)
        self._disarm()  # a forward wrapper a failed step left on the network
        self._batches, self._names, self._x = None, {}, None  # whatever a failed step left
        # a run starts where the steps do not count up from the last (Wan 2.2's guider_2 first
        # sees a later step than 0) or their number changes
        last, self._last = self._last, (step, num_inference_steps)
        if last is None or step <= last[0] or num_inference_steps != last[1]:
            self._run_state = self.method.init_state()
        self._point = self._point_at(step, num_inference_steps, timestep)
        names = {"c": Branch("pos")}
        if self._enabled:
            names = dict(self.method.branches(self._point, self._run_state))
        for branch in names.values():
            self._check_branch(branch)
        self._names = names
        # a step with no branch (CFG-Zero*'s zeroed start) still runs c: a guider sees the sample
        # only through a forward
        self._batches = list(dict.fromkeys(names.values())) or [Branch("pos")]

    def _check_branch(self, branch: Branch) -> None:
        """Refuse, in one line, a branch a diffusers denoise loop cannot run."""
        name = getattr(self.method, "name", type(self.method).__name__)
        why = None
        if branch.model != "main":
            why = f"it runs the model {branch.model!r} beside the pipeline's"
        elif branch.rows is not None:
            why = "it runs a branch on some of the batch's rows"
        elif branch.cond not in ("pos", "neg"):
            why = f"it needs the condition {branch.cond!r} besides the prompt and the negative"
        elif branch.grad:
            why = "it differentiates through the network"
        if why is not None:
            raise ValueError(f"{name} cannot be a diffusers guider: {why}")

    def _identifier(self, branch: Branch) -> str:
        """A branch's batch name, the same at every step (pipelines key caches by it): diffusers'
        pred_cond / pred_uncond for the plain prompt and negative, the perturbation's after them."""
        name = self._ids.get(branch)
        if name is None:
            name = "pred_cond" if branch.cond == "pos" else "pred_uncond"
            if branch.perturb is not None:
                name += "_" + _snake(type(branch.perturb).__name__)
            taken, base, k = set(self._ids.values()), name, 2
            while name in taken:  # another perturbation of its kind (a second PAG's layers)
                name, k = f"{base}_{k}", k + 1
            self._ids[branch] = name
        return name

    def prepare_inputs(self, data: dict) -> list:
        """A batch per distinct branch: the prompt's conditions (index 0) or the negative's (1)."""
        return [
            self._prepare_batch(data, int(b.cond == "neg"), self._identifier(b))
            for b in self._batches
        ]

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        """As ``prepare_inputs``, for pipelines that name the fields of their block state."""
        return [
            self._prepare_batch_from_block_state(
                input_fields, data, int(b.cond == "neg"), self._identifier(b)
            )
            for b in self._batches
        ]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        """Before a batch's forward: the denoiser's next call keeps the sample and runs inside the
        batch's perturbation (diffusers' loops call it once a batch)."""
        super().prepare_models(denoiser)
        self._disarm()
        if id(denoiser) not in self._checked:  # layers the method cannot find fail here, once
            self.method.check({"main": _Network(denoiser)})
            self._checked.add(id(denoiser))
        self._arm(denoiser, self._batches[self._count_prepared - 1].perturb)

    def _arm(self, denoiser: torch.nn.Module, perturb) -> None:
        """Wrap the denoiser's next call: it keeps the sample and runs inside the perturbation,
        left however the forward ends (try/finally: an interrupt too, which PyTorch's always_call
        hooks miss). The call's end, also an error before the forward (another's pre-hook), unwraps
        it: a failed loop never reaches cleanup_models."""
        inner, own = denoiser.forward, denoiser.__dict__.get("forward")

        @functools.wraps(inner)  # its signature, which pipelines read
        def forward(*args, **kwargs):
            if self._armed is None or self._armed[1] is not forward:  # unwrapped under another's
                return inner(*args, **kwargs)
            try:
                x = _sample(args, kwargs)
                self._x = x if self._x is None else self._x  # the same in every batch of a step
                with self._perturbed(denoiser, perturb, x):
                    return inner(*args, **kwargs)
            except BaseException:
                self._disarm()
                raise

        denoiser.forward = forward
        hook = denoiser.register_forward_hook(self._ended, always_call=True)
        self._armed = (denoiser, forward, own, hook)

    def _ended(self, module, args, output) -> None:
        """The denoiser's call is over (or failed): its own forward back."""
        self._disarm(in_hook=True)

    def _disarm(self, in_hook: bool = False) -> None:
        """The denoiser's own forward back (an accelerate or diffusers hook's, where it had one)
        and the end-of-call hook removed."""
        if not in_hook:
            for handle in self._stale:
                handle.remove()
            self._stale = []
        if self._armed is None:
            return
        denoiser, forward, own, hook = self._armed
        self._armed = None
        if denoiser.__dict__.get("forward") is forward:
            if own is None:
                del denoiser.forward
            else:
                denoiser.forward = own
        # after a failed call PyTorch runs the always_call hooks while iterating the module's
        # forward hooks, where removing any but the last one raises: a hook behind it waits
        if in_hook and next(reversed(denoiser._forward_hooks), hook.id) != hook.id:
            self._stale.append(hook)
        else:
            hook.remove()

    @staticmethod
    def _perturbed(denoiser: torch.nn.Module, perturb, x: torch.Tensor):
        """The branch's perturbation on every row of this forward (nothing for a plain branch)."""
        if perturb is None:
            return contextlib.nullcontext()
        if not getattr(perturb, "rowwise", False):
            return perturb.apply(_Network(denoiser), None)
        rows = row_mask((True,) * x.shape[0], str(x.device))
        return perturb.apply(_Network(denoiser), None, rows)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        """After a batch's forward: the denoiser's own forward back."""
        self._disarm()

    def __call__(self, data: list) -> GuiderOutput:
        """The guided output from the batches' raw outputs (``noise_pred``)."""
        return self.forward(**{getattr(d, self._identifier_key): d.noise_pred for d in data})

    def forward(self, **outputs) -> GuiderOutput:
        """The method's combine on the branches' Preds, back in the network's output kind."""
        pt, batches = self._point, self._batches
        if self._x is None or batches is None or len(outputs) != len(batches):
            raise ValueError(
                f"DiffguideGuidance expected {len(batches or ())} forwards this step, got "
                f"{len(outputs)}"
            )
        raw = {b: outputs[self._identifier(b)] for b in batches}
        first = next(iter(raw.values()))
        x = _input_part(self._x, first)
        preds = {
            n: Pred.from_output(pt.kind, raw[b], x, pt.a, pt.s) for n, b in self._names.items()
        }
        if self._enabled:
            guided, self._run_state = self.method.combine(x, pt, preds, self._run_state)
        else:
            guided = preds["c"]
        self._batches = None  # the step is over
        pred = guided.output(pt.kind, pt.a, pt.s).to(first.dtype)
        # a step with no plain prompt branch (cfg:scale=0) reports the guided output as pred_cond:
        # a pipeline rescaling to pred_cond's norm (Qwen-Image) then leaves it as the method gave it
        return GuiderOutput(
            pred=pred,
            pred_cond=raw.get(Branch("pos"), pred),
            pred_uncond=raw.get(Branch("neg")),
        )

    @property
    def is_conditional(self) -> bool:
        """Whether the batch being run has the prompt's conditions (diffusers' ControlNet asks)."""
        if not self._batches or self._count_prepared == 0:
            return True
        return self._batches[self._count_prepared - 1].cond == "pos"

    @property
    def num_conditions(self) -> int:
        """2, 1 when disabled: pipelines ask it before the loop (or a step) to decide whether to
        encode the negative prompt, and a method may need it at some step. A step's forwards are
        the batches of prepare_inputs; a step a failed run left changes nothing here."""
        return 2 if self._enabled else 1


def _input_part(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The part of the network's input its output predicts: x itself, or its leading channels where
    an image or video network (B, C, ...) is given more (an inpainting UNet's mask and image)."""
    if out.shape == x.shape:
        return x
    if x.ndim == out.ndim >= 4 and x.shape[1] > out.shape[1] and x.shape[2:] == out.shape[2:]:
        return x[:, : out.shape[1]]
    if x.ndim == out.ndim == 3 and x.shape[1] > out.shape[1] and x.shape[2] == out.shape[2]:
        # loops join the sample with a condition image's tokens, first (Qwen-Image 2.1) or last
        raise ValueError(
            f"the network's output has {out.shape[1]} of its input's {x.shape[1]} tokens (the "
            "sample joined with condition tokens, as in Qwen-Image 2.1's image-conditioned loop); "
            "DiffguideGuidance cannot tell which of them are the sample's"
        )
    raise ValueError(
        f"the network's output {tuple(out.shape)} does not match its input {tuple(x.shape)}; "
        "DiffguideGuidance needs outputs of the sample's shape"
    )


def as_diffusers_guider(guidance, pipeline=None) -> DiffguideGuidance:
    """A diffguide guidance method (spec or object) as a diffusers guider reading the noise level
    from ``pipeline``'s scheduler, e.g.
    ``pipe.update_components(guider=as_diffusers_guider("apg:scale=7", pipe))``."""
    return DiffguideGuidance(guidance).bind(pipeline)

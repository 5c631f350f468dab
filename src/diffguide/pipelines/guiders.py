"""diffguide's guidance methods as diffusers guiders, for diffusers' modular pipelines.

A diffusers guider is told the step (``set_state``), splits the conditions into one batch per
forward pass (``prepare_inputs``), may change the network around each forward (``prepare_models``,
``cleanup_models``) and combines the raw outputs (``__call__``). ``DiffguideGuidance`` does each
with the diffguide method's own parts: its branches are the batches, its perturbations are entered
around their forward, the outputs become Preds at the noise level the pipeline's scheduler is at,
the method's own ``combine`` guides them, and the result goes back in the network's output kind.
"""

from __future__ import annotations

import contextlib
import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput

from ..core.guided import Branch, Guidance, Point, row_mask
from ..core.pred import Pred
from ..core.registry import parse_spec, to_spec
from ..core.schedule import FlowSchedule, VPSchedule
from ..guidance import ICG, NAG, TPG, TSG, AdaptiveGuidance, AutoGuidance, CFGpp, Modulated, Sum
from .schedulers import from_scheduler

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


def _batch_rows(batch) -> tuple[int, torch.device]:
    """The batch size and device of one guider batch, from its first tensor (the conditions)."""
    for value in batch.as_dict().values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0], value.device
    raise ValueError("DiffguideGuidance found no condition tensor in the guider's inputs")


def noise_level(scheduler, timestep, flow: bool) -> float:
    """The VE level s / a the network's input is at: the scheduler's sigma at its step index (the
    flow time on flow schedulers), else from alphas_cumprod at the timestep (DDIM, DDPM, ...)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and hasattr(scheduler, "index_for_timestep"):
        # the index the scheduler's own step will use (set by its first step or its begin index)
        i = scheduler.step_index
        i = scheduler.begin_index if i is None else i
        i = scheduler.index_for_timestep(timestep) if i is None else i
        sigma = float(sigmas[i])
        if not flow:
            return sigma
        return math.inf if sigma >= 1 else sigma / (1 - sigma)
    ac = float(scheduler.alphas_cumprod[int(timestep)])
    return math.inf if ac == 0 else math.sqrt((1 - ac) / ac)


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
        # value: diffusers marks an argument given by position so, and new() would drop it
        spec = guidance if isinstance(guidance, str) else _spec(self.method)
        unset = [k for k in self.config.get("_use_default_values", []) if k != "guidance"]
        self.register_to_config(guidance=spec, _use_default_values=unset)
        self._source = None  # the pipeline (or scheduler) whose scheduler sets the noise level
        self._info = (None, None)  # (scheduler, SchedulerInfo) last read
        self._checked = set()  # networks the method's check has accepted
        self._run_state = None
        self._point = None
        self._batches = None  # this step's distinct branches, in the order of the forwards
        self._names = {}  # this step's branch names -> their branches
        self._rows = None  # (batch size, device) of this step's forwards
        self._x = None
        self._entered = contextlib.ExitStack()

    def bind(self, source) -> "DiffguideGuidance":
        """Read the noise level from ``source``: a pipeline (its current ``.scheduler``) or a
        scheduler."""
        self._source = source
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
        """A step starts: the method's branches at this point, its state fresh at step 0."""
        super().set_state(step, num_inference_steps, timestep)
        self._entered.close()  # anything a failed forward left entered
        if step == 0 or self._point is None:
            self._run_state = self.method.init_state()
        self._point = self._point_at(step, num_inference_steps, timestep)
        self._x = None
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
        """A batch's name: diffusers' pred_cond / pred_uncond for the plain prompt and negative."""
        if branch == Branch("pos"):
            return "pred_cond"
        if branch == Branch("neg"):
            return "pred_uncond"
        return f"pred_{self._batches.index(branch)}"

    def prepare_inputs(self, data: dict) -> list:
        """A batch per distinct branch: the prompt's conditions (index 0) or the negative's (1)."""
        out = [
            self._prepare_batch(data, int(b.cond == "neg"), self._identifier(b))
            for b in self._batches
        ]
        self._rows = _batch_rows(out[0])
        return out

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        """As ``prepare_inputs``, for pipelines that name the fields of their block state."""
        out = [
            self._prepare_batch_from_block_state(
                input_fields, data, int(b.cond == "neg"), self._identifier(b)
            )
            for b in self._batches
        ]
        self._rows = _batch_rows(out[0])
        return out

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        """Before a batch's forward: keep its sample, enter its branch's perturbation."""
        super().prepare_models(denoiser)
        self._entered.close()
        network = _Network(denoiser)
        if id(denoiser) not in self._checked:  # layers the method cannot find fail here, once
            self.method.check({"main": network})
            self._checked.add(id(denoiser))
        handle = denoiser.register_forward_pre_hook(self._keep_sample, with_kwargs=True)
        self._entered.callback(handle.remove)
        perturb = self._batches[self._count_prepared - 1].perturb
        if perturb is None:
            return
        if not getattr(perturb, "rowwise", False):
            self._entered.enter_context(perturb.apply(network, None))
            return
        size, device = self._rows
        rows = row_mask((True,) * size, str(device))  # every row of this forward is the branch's
        self._entered.enter_context(perturb.apply(network, None, rows))

    def _keep_sample(self, module, args, kwargs):
        """The forward's noisy sample (the same in every batch of a step)."""
        if self._x is None:
            self._x = _sample(args, kwargs)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        """After a batch's forward: its perturbation and the sample hook removed."""
        self._entered.close()

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
        self._batches = None  # the step is over (num_conditions says so to the next run)
        return GuiderOutput(
            pred=guided.output(pt.kind, pt.a, pt.s).to(first.dtype),
            pred_cond=raw.get(Branch("pos")),
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
        """This step's forwards; 2 between steps, when a pipeline decides whether to encode the
        negative prompt, so that a method needing it at some step finds it."""
        return 2 if self._batches is None else len(self._batches)


def _input_part(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The part of the network's input its output predicts: x itself, or its leading channels
    or tokens where the network is given more (an inpainting UNet's mask and image)."""
    if out.shape == x.shape:
        return x
    if x.ndim == out.ndim and x.shape[1] > out.shape[1] and x.shape[2:] == out.shape[2:]:
        return x[:, : out.shape[1]]
    raise ValueError(
        f"the network's output {tuple(out.shape)} does not match its input {tuple(x.shape)}; "
        "DiffguideGuidance needs outputs of the sample's shape"
    )


def as_diffusers_guider(guidance, pipeline=None) -> DiffguideGuidance:
    """A diffguide guidance method (spec or object) as a diffusers guider reading the noise level
    from ``pipeline``'s scheduler, e.g.
    ``pipe.update_components(guider=as_diffusers_guider("apg:scale=7", pipe))``."""
    return DiffguideGuidance(guidance).bind(pipeline)

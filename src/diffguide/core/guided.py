"""Guidance plumbing: methods declare branches, the GuidedDenoiser evaluates them batched.

Each step a guidance method names the network evaluations it needs (``Branch``: which condition,
which model, which perturbation). Identical branches are evaluated once, branches that share a
model,
perturbation and grad mode are concatenated into one forward pass, and the method combines the
resulting Preds into one. Per-run state (momentum and the like) lives on the GuidedDenoiser, which
``sample`` resets at the start of every run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Hashable, Mapping

import torch

from .pred import Pred
from .schedule import Schedule

# condition keys that carry the model's own inputs rather than the prompt (an embedded guidance
# value: Flux/SANA-Sprint's "guidance", an LCM student's "timestep_cond"; UNet attention kwargs): a
# method that replaces the prompt (ICG) keeps them
MODEL_INPUTS = frozenset({"guidance", "timestep_cond", "attention"})


@dataclass(frozen=True)
class Branch:
    """One network evaluation a guidance method needs at this step."""

    cond: str = "pos"  # key into the run's conditions ("pos", "neg", ...)
    model: str = "main"  # key into the run's models
    # an object with .apply(denoiser, noise, rows) -> context manager, or None; with rowwise = True
    # it perturbs only the rows rows (a [B] bool mask) of a forward, so it shares one with other
    # branches
    perturb: Hashable = None
    grad: bool = False  # evaluate under autograd
    rows: tuple | None = None  # evaluate only these samples of the batch (None: all)


@dataclass(frozen=True)
class Point:
    """Where the sampler is: t (a scalar in sampling, one per sample in training) and its schedule;
    the levels are computed when a guidance method first asks for them."""

    t: torch.Tensor
    schedule: Schedule
    step: int | None = None  # the sampler's step index and step count, where a sampler reports them
    steps: int | None = None
    kind: str | None = None  # the main network's output kind (eps, v, flow, x0), where known
    clock: Any = None  # t -> the main network's time input (the denoiser's), where known

    @cached_property
    def time(self) -> float | None:
        """The main network's time input at t (one level in sampling), read when a method asks."""
        return None if self.clock is None or self.t.ndim else self.clock(self.t)

    @cached_property
    def _scalar(self):
        return self.schedule.at(self.t) if self.t.ndim == 0 else None

    @cached_property
    def a(self):
        """alpha: a float in sampling (one level), a [B] tensor in training."""
        return self._scalar[0] if self._scalar else self.schedule.alpha(self.t)

    @cached_property
    def s(self):
        return self._scalar[1] if self._scalar else self.schedule.sigma(self.t)

    @cached_property
    def ve(self):
        """VE-equivalent noise level s/a (Karras sigma)."""
        return self._scalar[2] if self._scalar else self.schedule.ve(self.t)

    @property
    def progress(self):
        """0 at the schedule's noise end, 1 at its data end."""
        sc = self.schedule
        t = float(self.t) if self.t.ndim == 0 else self.t
        return (sc.t_max - t) / (sc.t_max - sc.t_min)


class Guidance:
    """Base for guidance methods (frozen dataclasses). Override branches and combine.

    ``branches(pt, state)`` names the evaluations this step needs (the state lets a method drop a
    branch for the rest of a run); ``combine`` turns their Preds into one and returns the new state.
    ``conditions`` may add conditions a method draws for itself at each evaluation (ICG's random
    one).
    A method that differentiates through the network sets ``needs_grad = True`` (a class attribute)
    so that pipelines run it with autograd available rather than in inference mode.
    """

    needs_grad = False
    # False where branches or combine read the data back on the host (AG's switch, ICG's labels):
    # the sampling loop then cannot be captured in a CUDA graph (core.graphs)
    capturable = True

    def init_state(self) -> Any:
        return None

    def check(self, models: Mapping[str, Any]) -> None:
        """Refuse, before sampling, models this method cannot act on (e.g. layers it cannot
        find)."""

    def conditions(self, pt: Point, conds: Mapping[str, Any], x: torch.Tensor, noise) -> dict:
        """Extra conditions for this evaluation (not cached between evaluations); ``noise`` is the
        run's noise source (per-sample generators in pipelines) or None."""
        return {}

    def prompt_sets(self) -> dict:
        """Texts a pipeline should encode once per call and pass as conditions under these names
        (ICG's stand-in prompts); {} for most methods."""
        return {}

    def branches(self, pt: Point, state: Any) -> Mapping[str, Branch]:
        raise NotImplementedError

    def combine(self, x: torch.Tensor, pt: Point, preds: Mapping[str, Pred], state: Any):
        raise NotImplementedError


class _Incompatible(Exception):
    pass


def _fit(cond, b: int, name: str):
    """Broadcast batch-1 tensors to batch b; refuse other mismatches."""
    if isinstance(cond, torch.Tensor):
        if cond.ndim == 0 or cond.shape[0] not in (1, b):
            raise ValueError(
                f"condition {name!r} has batch {tuple(cond.shape)[:1] or '()'} but the "
                f"sample has batch {b}; give one row per sample or a single row"
            )
        return cond.expand(b, *cond.shape[1:]) if cond.shape[0] != b else cond
    if isinstance(cond, Mapping):
        return {k: _fit(v, b, f"{name}.{k}") for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_fit(v, b, name) for v in cond)
    return cond


def _cat(conds: list):
    first = conds[0]
    if isinstance(first, torch.Tensor):
        if not all(
            isinstance(c, torch.Tensor)
            and c.shape[1:] == first.shape[1:]
            and c.dtype == first.dtype
            for c in conds
        ):
            raise _Incompatible
        return torch.cat(conds)
    if isinstance(first, Mapping):
        if not all(isinstance(c, Mapping) and c.keys() == first.keys() for c in conds):
            raise _Incompatible
        return {k: _cat([c[k] for c in conds]) for k in first}
    if isinstance(first, (list, tuple)):
        if not all(type(c) is type(first) and len(c) == len(first) for c in conds):
            raise _Incompatible
        return type(first)(_cat(list(p)) for p in zip(*conds))
    if not all(c is first or c == first for c in conds):
        raise _Incompatible
    return first


def _rows(cond, sl: slice):
    if isinstance(cond, torch.Tensor):
        return cond[sl]
    if isinstance(cond, Mapping):
        return {k: _rows(v, sl) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_rows(v, sl) for v in cond)
    return cond


_HOLDERS = threading.local()


@contextlib.contextmanager
def holding(keep: list):
    """Every cached device tensor ``constant`` and ``row_mask`` hand out in this thread meanwhile
    is also
    appended to ``keep``: a captured loop reads them by address at every replay, so its entry must
    own them, whatever the caches evict later."""
    saved = getattr(_HOLDERS, "keep", None)
    _HOLDERS.keep = keep
    try:
        yield keep
    finally:
        _HOLDERS.keep = saved


def _held(t: torch.Tensor) -> torch.Tensor:
    keep = getattr(_HOLDERS, "keep", None)
    if keep is not None:
        keep.append(t)
    return t


def constant(values: tuple, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A small host-made tensor (a kernel) on a device, made once, so that a step copies nothing
    from the host: a captured loop (``core.graphs``) cannot."""
    return _held(_constant(values, device, dtype))


@functools.lru_cache(maxsize=256)
def _constant(values: tuple, device: str, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # usable in runs with autograd too
        return torch.tensor(values, dtype=torch.float64).to(device=device, dtype=dtype)


def row_mask(flags: tuple, device: str) -> torch.Tensor:
    """The [B] bool mask a rowwise perturbation gets, made once per (flags, device) so that a step
    copies nothing from the host (a captured loop cannot); ``row_index`` holds its set rows' indices
    and ``all_rows`` whether every row is set, so that hooks need not read the mask back (``flags``:
    the host's copy)."""
    mask = _row_mask(flags, device)
    _held(mask.row_index)
    return _held(mask)


@functools.lru_cache(maxsize=256)
def _row_mask(flags: tuple, device: str) -> torch.Tensor:
    with torch.inference_mode(False):  # usable in runs with autograd too
        mask = torch.tensor(flags, dtype=torch.bool, device=device)
        mask.row_index = torch.tensor(
            [i for i, f in enumerate(flags) if f], dtype=torch.long, device=device
        )
    mask.all_rows = all(flags)
    mask.flags = flags  # on the host too: a step cache re-aims the mask without reading it back
    return mask


def group_rows(keys: list, sizes: list, start: int, stop: int) -> list:
    """The groups (key, rows) of rows [start, stop) of a forward whose branches ``keys`` hold
    ``sizes`` rows each, in order; a branch cut by a chunk boundary is keyed by its offset too."""
    out, offset = [], 0
    for key, n in zip(keys, sizes):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append(((key, lo - offset), hi - lo))
        offset += n
    return out


class GuidedDenoiser:
    """The ``(x, t) -> Pred`` callable samplers consume. One per run; counts NFE.

    ``nfe`` counts network evaluations per sample (a batched cond + uncond pass is 2; a branch on
    some rows only counts their share), ``forwards`` counts forward passes.
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        guidance: Guidance,
        conds: Mapping[str, Any],
        threshold=None,
        max_batch: int | None = None,
        stitch=None,
        cache=None,
        parallel=None,
    ):
        if "main" not in models:
            raise ValueError("models must include a 'main' denoiser")
        for name, m in models.items():
            if not callable(m) or not hasattr(m, "schedule"):
                raise ValueError(
                    f"model {name!r} must be a callable (x, t, cond) -> Pred with a "
                    f".schedule, got {type(m).__name__}"
                )
        if not isinstance(guidance, Guidance):
            raise ValueError(
                f"guidance must be a Guidance object or a spec string, got "
                f"{type(guidance).__name__}"
            )
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch!r}")
        self.models, self.guidance, self.conds = dict(models), guidance, dict(conds)
        self.threshold, self.max_batch = threshold, max_batch
        self.schedule: Schedule = self.models["main"].schedule
        main = self.models["main"]
        self._kind = getattr(main, "kind", None) or getattr(
            getattr(main, "inner", None), "kind", None
        )
        self.stitch = stitch
        self.cache = cache
        from .parallel_branches import as_parallel

        self.parallel = as_parallel(parallel)
        if self.parallel is not None and cache is not None:
            raise ValueError("a step cache cannot act on forwards split across processes")
        guidance.check(self.models)
        if cache is not None:
            cache.check(main)
        if stitch is not None:
            from .stitch import check_same_schedule

            if stitch.model not in self.models:
                raise ValueError(
                    f"stitch needs model {stitch.model!r}; this run has: {', '.join(self.models)}"
                )
            check_same_schedule(self.models["main"], self.models[stitch.model])
            if stitch.guidance is not None:
                stitch.guidance.check(self.models)
        self.reset()

    def reset(self, noise=None) -> None:
        """Start a run: fresh guidance state and counters; ``noise`` is the run's noise source."""
        self.state = self.guidance.init_state()
        g2 = self.stitch.guidance if self.stitch is not None else None
        self.expert_state = None if g2 is None else g2.init_state()
        self.nfe = 0
        self.forwards = 0
        self.noise = noise
        self._batched = {}  # concatenated conditions per (branch conds, batch): fixed within a run
        self._main = "main"  # the model that "main" branches run on (T-Stitch swaps it)
        self._step = (None, None)
        self._dtypes = {}  # (model, x dtype) -> output dtype, for processes with no rows
        self.cache_state = None if self.cache is None else self.cache.init_state()

    def begin_step(self, st) -> bool:
        """Called by ``sample`` before each step; True when this step switches models (T-Stitch)."""
        self._step = (st.i, st.n)
        if self.cache_state is not None:
            self.cache_state.step, self.cache_state.steps = st.i, st.n
        if self.stitch is None:
            return False
        time = None if self.stitch.below is None else self._time(st.t)  # read by a level rule
        main = self.stitch.model if self.stitch.uses_small(st.i, st.n, time) else "main"
        switched, self._main = main != self._main and st.i > 0, main
        return switched

    def _time(self, t) -> float:
        """The main network's time at t (what a level rule compares: the scheduler's timestep)."""
        main = self.models["main"]
        net = main if hasattr(main, "timestep") else getattr(main, "inner", None)  # LCM's Boundary
        fn = getattr(net, "timestep", None)  # a NetDenoiser's; else the schedule's model time
        return float(fn(t) if fn is not None else self.schedule.model_time(t))

    @property
    def _guidance(self) -> Guidance:
        """The method guiding this step: the stitched model's own where it has one."""
        g = self.stitch.guidance if self.stitch is not None else None
        return g if g is not None and self._main != "main" else self.guidance

    def __call__(self, x: torch.Tensor, t) -> Pred:
        t = torch.as_tensor(t, dtype=torch.float64)
        pt = Point(t, self.schedule, *self._step, self._kind, self._time)
        g = self._guidance
        own = g is self.guidance  # an expert's own method keeps its own state
        state = self.state if own else self.expert_state
        extra = g.conditions(pt, self.conds, x, self.noise)
        preds = self.evaluate(x, t, g.branches(pt, state), extra)
        pred, state = g.combine(x, pt, preds, state)
        if own:
            self.state = state
        else:
            self.expert_state = state
        if self.threshold is not None:
            pred = self.threshold(pred, x, pt.a, pt.s)
        return pred

    def evaluate(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        branches: Mapping[str, Branch],
        extra: Mapping[str, Any] | None = None,
    ) -> dict:
        """Evaluate the distinct branches, one forward pass per (model, perturb, grad) group.
        ``extra`` conditions hold for this evaluation only."""
        conds = {**self.conds, **extra} if extra else self.conds
        unique = list(dict.fromkeys(branches.values()))
        if self._main != "main":
            unique = list(
                dict.fromkeys(
                    dataclasses.replace(br, model=self._main) if br.model == "main" else br
                    for br in unique
                )
            )
            branches = {
                k: (dataclasses.replace(br, model=self._main) if br.model == "main" else br)
                for k, br in branches.items()
            }
        groups: dict[tuple, list[Branch]] = {}
        for br in unique:
            if br.model not in self.models:
                raise ValueError(
                    f"branch needs model {br.model!r}; this run has: {', '.join(self.models)}"
                )
            if br.cond not in conds and f"{br.cond}@{br.model}" not in conds:
                raise ValueError(
                    f"{type(self.guidance).__name__} needs condition {br.cond!r}; this "
                    f"run has: {', '.join(conds) or 'none'} (pass uncond= for 'neg')"
                )
            alone = br.perturb if not getattr(br.perturb, "rowwise", False) else None
            groups.setdefault((br.model, alone, br.grad), []).append(br)
        out: dict[Branch, Pred] = {}
        b = x.shape[0]
        for (model, perturb, grad), brs in groups.items():
            key = (model, tuple((br.cond, br.rows) for br in brs), b)
            if key not in self._batched:
                # a model with its own encoders (a stitched small model) reads "cond@model"
                rows = [
                    _fit(conds.get(f"{br.cond}@{br.model}", conds.get(br.cond)), b, br.cond)
                    for br in brs
                ]
                rows = [
                    c if br.rows is None else _rows(c, list(br.rows)) for c, br in zip(rows, brs)
                ]
                try:
                    self._batched[key] = (True, _cat(rows))
                except _Incompatible:
                    self._batched[key] = (False, rows)
            together, cond = self._batched[key]
            xs = [x if br.rows is None else x[list(br.rows)] for br in brs]
            ts = [t if t.ndim == 0 or br.rows is None else t[list(br.rows)] for br in brs]
            if together:
                preds = self._forward(model, grad, xs, ts, cond, [br.perturb for br in brs], brs)
            else:
                preds = [
                    self._forward(model, grad, [xi], [ti], c, [br.perturb], [br])[0]
                    for xi, ti, c, br in zip(xs, ts, cond, brs)
                ]
            if extra and any(br.cond in extra for br in brs):  # drawn afresh next time
                del self._batched[key]
            out.update(zip(brs, preds))
            self.nfe += sum(len(xi) for xi in xs) / b
        if isinstance(self.nfe, float) and self.nfe.is_integer():
            self.nfe = int(self.nfe)
        return {name: out[br] for name, br in branches.items()}

    def _forward(
        self, model, grad, xs: list, ts: list, cond, perturbs: list, keys: list
    ) -> list[Pred]:
        """One batched pass over the branches' inputs (in max_batch chunks); a Pred per branch.
        ``perturbs`` holds each branch's perturbation (None: none); rowwise ones act on their
        rows. A step cache acts on the main network's forwards, keyed by branch (``keys``)."""
        net = self.models[model]
        sizes = [xi.shape[0] for xi in xs]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        t = ts[0] if len(ts) == 1 or ts[0].ndim == 0 else torch.cat(ts)
        step = x.shape[0] if self.max_batch is None else self.max_batch
        n, world, lo = x.shape[0], 1, 0
        if self.parallel is not None and not (grad or torch.is_grad_enabled()):
            rank, world = self.parallel.world()  # an autograd forward runs whole on each process
        if world > 1:  # this process's share of the rows; counted as one process would
            self.forwards += -(-n // step)
            lo, hi = self.parallel.bounds(n, rank, world)
            x, t, cond = x[lo:hi], t if t.ndim == 0 else t[lo:hi], _rows(cond, slice(lo, hi))
            step = self.max_batch or max(x.shape[0], 1)
        masks, whole = {}, contextlib.ExitStack()
        for p in dict.fromkeys(perturbs):
            if p is None:
                continue
            if not getattr(p, "rowwise", False):  # then it is this group's only branch
                whole.enter_context(p.apply(net, self.noise))
                continue
            flags = [q == p for k, q in zip(sizes, perturbs) for _ in range(k)]  # a flag per row
            masks[p] = flags[lo : lo + x.shape[0]]
        chunks = []
        with whole, torch.set_grad_enabled(grad or torch.is_grad_enabled()):
            for i in range(0, x.shape[0], step):
                sl = slice(i, i + step)
                with contextlib.ExitStack() as stack:
                    for p, flags in masks.items():
                        if any(flags[sl]):
                            rows = row_mask(tuple(flags[sl]), str(x.device))
                            stack.enter_context(p.apply(net, self.noise, rows))
                    if self.cache is not None and model == "main":  # after the perturbations
                        groups = group_rows(keys, sizes, i, min(i + step, x.shape[0]))
                        stack.enter_context(self.cache.apply(net, self.cache_state, groups))
                    pred = net(x[sl], t if t.ndim == 0 else t[sl], _rows(cond, sl))
                if not isinstance(pred, Pred):
                    raise ValueError(f"model {model!r} returned {type(pred).__name__}, not a Pred")
                chunks.append(pred)
                self.forwards += world == 1
        pred = (Pred.cat(chunks) if len(chunks) > 1 else chunks[0]) if chunks else None
        if world > 1:
            known = (model, x.dtype)
            pred = self.parallel.gather(pred, n, x, rank, world, self._dtypes.get(known))
            self._dtypes[known] = pred.x0.dtype
        return pred.split(sizes)


def guide(
    denoiser,
    guidance=None,
    cond=None,
    uncond=None,
    *,
    conds: Mapping[str, Any] | None = None,
    models: Mapping[str, Any] | None = None,
    threshold=None,
    max_batch: int | None = None,
    stitch=None,
    cache=None,
    parallel=None,
) -> GuidedDenoiser:
    """The ``(x, t) -> Pred`` callable a sampler consumes: ``denoiser`` guided by ``guidance``.

    guidance: a Guidance object, a spec such as ``"cfg:scale=7.5"``, or None (conditional only).
    cond / uncond become the conditions "pos" / "neg"; ``conds`` adds others, ``models`` adds
    models beside "main". ``threshold`` (e.g. DynamicThreshold()) post-processes the guided x0;
    ``max_batch`` caps the rows of one forward pass. ``stitch`` (a ``Stitch``) runs the model it
    names (in ``models``) for the first steps (T-Stitch). ``cache`` (a step cache or a spec such
    as ``"first_block:threshold=0.1"``) reuses the main network's blocks across steps, per
    branch. ``parallel`` (``"branches"`` or a ``BranchParallel``) splits the rows of every forward
    across the processes of an initialised ``torch.distributed`` group (core.parallel_branches).
    """
    from .registry import parse_spec  # deferred: methods register on import

    if guidance is None:
        guidance = parse_spec("guidance", "none")
    elif isinstance(guidance, str):
        guidance = parse_spec("guidance", guidance)
    all_models = {"main": denoiser, **(models or {})}
    all_conds = {"pos": cond}
    if uncond is not None:
        all_conds["neg"] = uncond
    all_conds.update(conds or {})
    if isinstance(cache, str):
        cache = parse_spec("cache", cache)
    return GuidedDenoiser(
        all_models,
        guidance,
        all_conds,
        threshold=threshold,
        max_batch=max_batch,
        stitch=stitch,
        cache=cache,
        parallel=parallel,
    )

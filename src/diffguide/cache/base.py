"""Step caches: a network's blocks reused across sampling steps, decided per branch of the batched
forward pass.

Every anchor (diffusers' hooks, ComfyUI, cache-dit) keeps one cache per forward call, so a
pipeline that batches its branches shares one decision between them. Here the GuidedDenoiser
tells the cache which rows of a forward belong to which branch (``groups``); the cache decides per
group whether the blocks after the first run for those rows, and the rows that run go through
them as a smaller batch, so a group that reuses its work saves its share of the forward. Rowwise
perturbations (PAG, SEG, SLG) follow the rows that run (``guidance.perturb.narrowed``).

Mechanism: for the duration of one forward (``Cache.apply``), each block of the network's block
lists gets a wrapper ``forward`` (a skipped block passes its inputs on; a block after the first
sees only the running rows), and the first and last blocks a forward hook (the decision; the
full batch put back together). Both act only for the thread that entered, as the perturbations'
hooks do.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch

from ..core.guided import row_mask
from ..guidance.perturb import (
    CACHE_LOCAL,
    _cached,
    _pack,
    _split_inputs,
    _streams,
    acting,
    installed,
    narrowed,
)
from ..guidance.perturb import _module as module_of

# the top-level block lists of diffusers' transformers, in call order (diffusers' first-block cache
# walks the same names: _ALL_TRANSFORMER_BLOCK_IDENTIFIERS)
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")
# inputs that are per token, not per sample: never cut to the running rows
_NOT_PER_SAMPLE = ("rotary", "rope", "freqs", "pos_embed")

PER = ("branch", "batch")
_LOCAL = CACHE_LOCAL  # in the perturbations' module, so that a perturbation can see it


@dataclass
class CacheState:
    """A run's cache: ``entries`` per group key (what each method keeps); ``work`` counts block
    evaluations per row, [computed, asked for]; ``decisions`` (step, key, computed) where the
    denoiser reports steps."""

    entries: dict = field(default_factory=dict)
    work: list = field(default_factory=lambda: [0, 0])
    decisions: list = field(default_factory=list)
    step: int | None = None
    steps: int | None = None  # the run's step count, where the sampler reports it
    two_streams: bool = False  # the blocks return (text, image) pairs
    shared: dict = field(default_factory=dict)  # what a cache keeps for the whole run

    @property
    def computed(self) -> float:
        """The share of block evaluations that ran (1.0: nothing reused)."""
        return self.work[0] / self.work[1] if self.work[1] else 1.0


class Cache:
    """Base of the step caches (frozen dataclasses registered under kind "cache").

    ``decide(state, key, rows)`` says whether a group's rows run (``rows``: a ``Rows``);
    ``ran(state, key, entry)`` is told when they did, after the last block."""

    # a cache whose decisions read data back on the host cannot run in a captured CUDA graph
    capturable = False
    decides = "first"  # from the first block's residual; "input": from the stack's input
    per: str = "branch"

    def __post_init__(self):
        if self.per not in PER:
            raise ValueError(f"per must be one of {', '.join(PER)}, got {self.per!r}")

    def init_state(self) -> CacheState:
        return CacheState()

    def check(self, denoiser) -> None:
        """Refuse, before sampling, a network this cache cannot act on."""
        blocks(_module(denoiser, self.name), self.name)

    def apply(self, denoiser, state: CacheState, groups: list):
        """A context for one forward pass over rows ``groups`` ((key, rows) in row order)."""
        net = _module(denoiser, self.name)
        found = _cached(net, ("cache blocks",), lambda: blocks(net, self.name))
        return _forward_context(self, state, self.folded(groups), found)

    def folded(self, groups: list) -> list:
        """The groups a forward decides for: per "batch", one for the whole forward, as the
        anchors make it."""
        return [(("batch",), sum(n for _, n in groups))] if self.per == "batch" else groups

    def decide_groups(self, state: CacheState, groups: list, view) -> tuple[list, set]:
        """Each group's decision, recorded: (the rows that run, the keys of the groups that run).
        ``view(start, n)``: what ``decide`` reads for the group's rows."""
        run, ran, start = [], set(), 0
        for key, n in groups:
            go = self.decide(state, key, view(start, n))
            go = go or not self.ready(state.entries.get(key, {}))  # nothing kept yet
            if go:
                run += range(start, start + n)
                ran.add(key)
            state.decisions.append((state.step, key, go))
            start += n
        return run, ran

    def decide(self, state: CacheState, key, rows) -> bool:
        """True: run the blocks for this group's rows."""
        raise NotImplementedError

    def ready(self, entry: dict) -> bool:
        """Whether a group's entry holds what a skipped forward reuses."""
        return "rest" in entry

    def ran(self, state: CacheState, key, entry: dict) -> None:
        """The group's rows ran every block; ``entry["rest"]`` holds their new residual."""


def _module(denoiser, name: str) -> torch.nn.Module:
    return module_of(denoiser, f"cache {name!r}")


def rows_index(run: list, batch: int, device) -> torch.Tensor:
    """The indices ``run`` on the device, made once per (rows, device) and held by a capture, so
    that a step copies nothing from the host (a captured loop cannot)."""
    run = set(run)
    return row_mask(tuple(i in run for i in range(batch)), str(device)).row_index


def blocks(net: torch.nn.Module, name: str) -> list:
    """The network's transformer blocks in call order (its top-level block lists)."""
    found = [
        b
        for n, child in net.named_children()
        if n in BLOCK_LISTS and isinstance(child, torch.nn.ModuleList)
        for b in child
    ]
    if len(found) < 2:
        raise ValueError(
            f"cache {name!r} needs a transformer with at least two blocks in "
            f"{' / '.join(BLOCK_LISTS[:2])}; {type(net).__name__} has {len(found)}"
        )
    return found


_PARAMETERS: dict = {}


def _parameters(block) -> list:
    """The names of a block's own forward arguments (under the cache's wrapper), in order (read
    once per class)."""
    forward = getattr(block.__dict__.get("forward"), "inner", block.forward)
    key = getattr(forward, "__func__", forward)
    if key not in _PARAMETERS:
        _PARAMETERS[key] = list(inspect.signature(forward).parameters)
    return _PARAMETERS[key]


class _Forward:
    """One forward pass under a cache: the groups' decisions and the rows that run.

    A cache decides before the first block (``decides = "input"``: from the inputs, the whole
    stack reusable) or after it (``"first"``: from its residual, the first block always runs).
    What is reused is the residual of the blocks after that point (``base``: the first block's
    input or output), kept per group at its last full pass; the last block's hook puts the
    batch back together."""

    def __init__(self, cache, state, groups, blocks_):
        self.cache, self.state, self.groups = cache, state, groups
        self.first, self.last, self.n = blocks_[0], blocks_[-1], len(blocks_)
        self.batch = sum(n for _, n in groups)
        self.mode = "all"  # "all" rows run; "some" (self.index) run; "none" run
        self.narrow = None
        self.cuts = {}  # id(input) -> (input, its running rows): a forward's inputs cut once

    def call(self, block, inner, args, kwargs):
        """A block's forward: as is, on the running rows only, or passed through."""
        if self.mode == "all" or (block is self.first and self.cache.decides == "first"):
            return inner(*args, **kwargs)
        if self.mode == "none":
            h, e = _split_inputs(args, kwargs)
            return _pack(block, h, e, self.like)
        if block is not self.first:  # the first block's inputs were cut by its pre-hook
            args, kwargs = self._cut_all(block, args, kwargs)
        return inner(*args, **kwargs)

    def _cut_all(self, block, args, kwargs):
        names = _parameters(block)
        return (
            [self._cut(n, a) for n, a in zip(names, args)],
            {k: self._cut(k, v) for k, v in kwargs.items()},
        )

    def _cut(self, name, value):
        if not (
            isinstance(value, torch.Tensor)
            and value.ndim
            and value.shape[0] == self.batch
            and not any(w in name for w in _NOT_PER_SAMPLE)
        ):
            return value
        # every block gets the same temb (masks, ...): cut it once; the input is held with its
        # cut, so that its id is not a later tensor's
        if id(value) not in self.cuts:
            self.cuts[id(value)] = (value, value.index_select(0, self.index))
        return self.cuts[id(value)][1]

    def before(self, block, args, kwargs):
        """Before the first block, for a cache that decides from the inputs."""
        if self.cache.decides != "input":
            return None
        h, e = _split_inputs(args, kwargs)
        self._decide(h, e, h, block, args, kwargs)
        if self.mode != "some":
            return None
        return tuple(self._cut_all(block, args, kwargs))

    def after(self, block, args, kwargs, out):
        """After the first block, for a cache that decides from its residual."""
        if self.cache.decides != "first":
            return None
        h, _ = _split_inputs(args, kwargs)
        image, text = _streams(block, out)
        self._decide(image, text, image - h, block, args, kwargs)
        if self.mode != "some":
            return None
        return _pack(block, self._take(image), self._take(text), out)

    def _take(self, t):
        return None if t is None else t.index_select(0, self.index)

    def _decide(self, image, text, probe, block, args, kwargs):
        """Each group's decision; the rest of the forward arranged."""
        run, self.ran = self.cache.decide_groups(
            self.state, self.groups, lambda start, n: Rows(block, probe, args, kwargs, start, n)
        )
        first = self.cache.decides == "first"
        self.state.work[0] += (self.batch if first else 0) + len(run) * (self.n - first)
        self.state.work[1] += self.batch * self.n
        self.base = (image, text)
        # a passed-through block returns what the blocks return (seen at the first full pass)
        self.like = (None, None) if self.state.two_streams else None
        if len(run) == self.batch:
            return
        if not run:
            self.mode = "none"
            return
        self.mode = "some"
        self.index = rows_index(run, self.batch, image.device)
        self.narrow = acting(narrowed(run, str(image.device)))
        self.narrow.__enter__()

    def _reused(self):
        """The base streams plus each group's kept residual (rows that ran: replaced later)."""
        image, text = self.base
        image, text = image.clone(), None if text is None else text.clone()
        start = 0
        for key, n in self.groups:
            kept = self.state.entries.get(key, {}).get("rest")
            if kept is not None and key not in self.ran:
                image[start : start + n] += kept[0]
                if text is not None and kept[1] is not None:
                    text[start : start + n] += kept[1]
            start += n
        return image, text

    def tail(self, block, args, kwargs, out):
        """After the last block: the full batch put back together; the groups that ran keep the
        residual of the blocks after the base."""
        if self.mode == "all":
            image, text = _streams(block, out)
            self.state.two_streams = isinstance(out, tuple)
        else:
            self.close()
            image, text = self._reused()
            if self.mode == "some":
                ran_image, ran_text = _streams(block, out)
                image = image.index_copy(0, self.index, ran_image)
                text = (
                    None
                    if ran_text is None or text is None
                    else text.index_copy(0, self.index, ran_text)
                )
            elif _streams(block, out)[1] is None:
                text = None  # a last block that returns no text stream (SD3's)
        base_image, base_text = self.base
        start = 0
        for key, n in self.groups:
            sl = slice(start, start + n)
            if key in self.ran:
                rest_text = None if text is None else (text[sl] - base_text[sl]).detach()
                entry = self.state.entries.setdefault(key, {})
                entry["rest"] = ((image[sl] - base_image[sl]).detach(), rest_text)
                self.cache.ran(self.state, key, entry)
            start += n
        return None if self.mode == "all" else _pack(block, image, text, out)

    def close(self):
        self.cuts.clear()
        if self.narrow is not None:
            self.narrow.__exit__(None, None, None)
            self.narrow = None


class Rows:
    """What a cache decides from, for one group's rows: ``probe`` (the first block's residual, or
    its input for a cache that decides before it), and the block and its arguments where it needs
    more (TeaCache's modulated input)."""

    def __init__(self, block, probe, args, kwargs, start, n):
        self.block, self._probe, self.args, self.kwargs = block, probe, args, kwargs
        self.rows = slice(start, start + n)

    @property
    def probe(self) -> torch.Tensor:
        return self._probe[self.rows]

    def argument(self, name: str):
        """The block's argument ``name`` for these rows (a per-sample tensor cut), or None."""
        value = self.kwargs.get(name)
        if value is None:
            names = _parameters(self.block)
            if name in names and names.index(name) < len(self.args):
                value = self.args[names.index(name)]
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == len(self._probe):
            return value[self.rows]
        return value


class _Wrapper:
    """A block's forward that defers to this thread's cached forward pass, if any."""

    def __init__(self, block, inner):
        self.block, self.inner = block, inner

    def __call__(self, *args, **kwargs):
        fwd = getattr(_LOCAL, "forward", None)
        if fwd is None or id(self.block) not in fwd[1]:
            return self.inner(*args, **kwargs)
        return fwd[0].call(self.block, self.inner, args, kwargs)


def _hook(role):
    def hook(block, args, kwargs, *out):
        fwd = getattr(_LOCAL, "forward", None)
        if fwd is None or id(block) not in fwd[1]:
            return None
        return getattr(fwd[0], role)(block, args, kwargs, *out)

    return hook


def _install(block, first: bool, last: bool):
    """The block's wrapper forward (and hooks); returns what undoes it."""
    own = block.__dict__.get("forward")  # a forward set on the instance (diffusers' hooks)
    block.forward = _Wrapper(block, block.forward)
    handles = []
    if first:
        handles.append(block.register_forward_pre_hook(_hook("before"), with_kwargs=True))
        handles.append(block.register_forward_hook(_hook("after"), with_kwargs=True))
    if last:
        handles.append(block.register_forward_hook(_hook("tail"), with_kwargs=True))

    def restore():
        for h in handles:
            h.remove()
        if own is None:
            del block.forward
        else:
            block.forward = own

    return restore


@contextlib.contextmanager
def _forward_context(cache, state, groups, blocks_):
    fwd = _Forward(cache, state, groups, blocks_)
    first, last = blocks_[0], blocks_[-1]
    with active(fwd, blocks_, lambda b: _install(b, b is first, b is last)):
        yield fwd


@contextlib.contextmanager
def active(fwd, modules: list, install):
    """``fwd`` handles ``modules``' forwards in this thread meanwhile; ``install(module)`` (which
    returns what undoes it) runs once per module across threads, as the perturbations' hooks."""
    with installed(modules, "cache", install):
        saved = getattr(_LOCAL, "forward", None)
        _LOCAL.forward = (fwd, {id(m) for m in modules})
        try:
            yield fwd
        finally:
            fwd.close()
            _LOCAL.forward = saved


def wrap(module):
    """Install only the wrapper forward (for caches that work module by module); returns what
    undoes it."""
    return _install(module, first=False, last=False)

"""Caches that work module by module (DeepCache's layers, TaylorSeer's attention layers): each
group of rows runs the cached modules or takes their output from the cache, decided per step."""

from __future__ import annotations

import torch

from ..guidance.perturb import acting, narrowed
from .base import rows_index


class ModuleForward:
    """One forward under a module cache: which groups run the cached modules this step; for the
    others, each module's output comes from ``cache.reuse`` (``cache.keep`` is given the rows
    that ran). ``units``: (always run, cached) work units per row, for the share of work run."""

    def __init__(self, cache, state, groups, units):
        self.cache, self.state, self.groups, self.inside = cache, state, groups, 0
        self.batch = sum(n for _, n in groups)
        self.run, self.ran = cache.decide_groups(state, groups, lambda start, n: None)
        self.mode = "all" if len(self.run) == self.batch else ("some" if self.run else "none")
        self.index = self.acts = None  # "some": made at the first call, on the inputs' device
        always, cached = units
        state.work[0] += self.batch * always + len(self.run) * cached
        state.work[1] += self.batch * (always + cached)

    def call(self, module, inner, args, kwargs):
        if self.inside:  # a cached module's own cached parts: run with it
            return inner(*args, **kwargs)
        if self.mode == "none":
            return self._assemble(module, None)
        if self.mode == "all":
            out = self._run(inner, args, kwargs)
        else:
            if self.index is None:  # once per forward: the rows' indices, PAG's rows narrowed
                self.index = rows_index(self.run, self.batch, _device(args, kwargs))
                self.acts = narrowed(self.run, str(self.index.device))
            args = [self._cut(a, self.index) for a in args]
            kwargs = {k: self._cut(v, self.index) for k, v in kwargs.items()}
            with acting(self.acts):  # PAG's rows follow the rows that run
                out = self._run(inner, args, kwargs)
        return self._assemble(module, out)

    def _run(self, inner, args, kwargs):
        self.inside += 1
        try:
            return inner(*args, **kwargs)
        finally:
            self.inside -= 1

    def _cut(self, value, index):
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == self.batch:
            return value.index_select(0, index)
        if isinstance(value, tuple):
            return tuple(self._cut(v, index) for v in value)
        return value

    def _assemble(self, module, out):
        """The full batch's output: the rows that ran from ``out`` (kept), the others from the
        cache."""
        pieces, at = [], 0
        for key, n in self.groups:
            entry = self.state.entries[key]
            if key in self.ran:
                rows = tree(out, lambda t, a=at, n=n: t[a : a + n])
                self.cache.keep(self.state, entry, id(module), rows)
                pieces.append(rows)
                at += n
            else:
                pieces.append(self.cache.reuse(self.state, entry, id(module)))
        return pieces[0] if len(pieces) == 1 else tree_cat(pieces)

    def close(self):
        pass


def _device(args, kwargs):
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device
    return "cpu"


def tree(value, fn):
    """fn applied to every tensor of a (nested) tuple output."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(tree(v, fn) for v in value)
    return value


def tree_cat(pieces: list):
    """Outputs of the same structure concatenated on the batch."""
    first = pieces[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(pieces)
    if isinstance(first, tuple):
        return tuple(tree_cat([p[i] for p in pieces]) for i in range(len(first)))
    return first

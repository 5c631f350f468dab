"""The noise optimisers' base class, the context a pipeline gives them, and their shared option
check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class NoiseContext:
    """What a noise optimiser may call during one pipeline run.

    prompts: one per image. scale: x = scale * z with z standard normal. seeds: per image, or None.
    tokenize(text) -> token ids as the text encoder sees them (special tokens included, no padding);
    special: the ids of special tokens. attention(x, i) -> (cross [h*w, T], self [h*w, h*w], (h,
    w)): attention maps of image i's conditional branch at the optimiser's attention time (its
    ``attention_steps``: the first time of that many steps of the model's own grid; else the run's
    first time), averaged over heads and layers, differentiable in x (None where the model has no
    cross-attention). render(x, rows) -> images [k, 3, H, W] in [0, 1]: the run's guidance and
    sampler from x,
    differentiable, with each image's own noise stream restarted, so a render from the unchanged x
    equals the plain run. draw(i, k) -> a fresh standard normal z for image i's k-th restart.
    counts: network forward and backward passes spent, updated by the callables.
    """

    prompts: list
    scale: float
    seeds: Sequence[int] | None = None
    tokenize: Callable[[str], list] | None = None
    special: frozenset = frozenset()
    attention: Callable | None = None
    render: Callable | None = None
    draw: Callable[[int, int], torch.Tensor] | None = None
    counts: dict = field(default_factory=lambda: {"forward": 0, "backward": 0})


class NoiseOptimizer:
    """Base of the registered noise optimisers (frozen dataclasses whose fields are the options)."""

    name = "base"
    needs: tuple = ()  # the NoiseContext callables it uses, so a pipeline can refuse early

    def optimise(self, ctx: NoiseContext, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(new x, a small report) for the batch x."""
        raise NotImplementedError

    def check(self, ctx: NoiseContext) -> None:
        for name in self.needs:
            if getattr(ctx, name) is None:
                raise ValueError(
                    f"noise optimiser {self.name!r} needs {name} from the model, which "
                    f"this pipeline cannot give"
                )


def positive(name: str, value, integer: bool = False, zero: bool = False) -> None:
    """Option check shared by the optimisers: a finite number > 0 (>= 0 with zero)."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value == value
        and abs(value) != float("inf")
        and (value >= 0 if zero else value > 0)
    )
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        what = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {what} {'>= 0' if zero else '> 0'}, got {value!r}")

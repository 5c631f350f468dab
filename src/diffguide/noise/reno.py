"""ReNO (Eyring et al., NeurIPS 2024, arXiv 2406.04312): reward-based noise optimisation.

Gradient ascent on the initial noise z of a one-step (or few-step) generator through
differentiable rewards: minimise sum_i w_i (-r_i(G(z), c)) + lam R(z) (paper eq. 4), with the
norm regulariser R(z) = |z|^2 / 2 - (d - 1) log|z| (the negative log-density of |z| under the
chi distribution with d degrees of freedom, eq. 5) computed in float32. As the authors' code:
SGD with Nesterov momentum 0.9, lr 5, 50 iterations, gradient norm clipped to 0.1 (per image
here, so an image does not depend on its batch), no update after the last iteration, and each
image keeps its noise of lowest reward loss. As the authors' loop keeps its best earlier latents, an
image whose reward, gradient or noise turns non-finite stops there with its best noise so far (said
in the report's ``stopped``); only a reward that is not finite on the starting noise is an error. A
reward is a callable (images [B, 3, H, W] in [0, 1],
prompts) -> scores [B], higher is better.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.registry import register
from .base import NoiseContext, NoiseOptimizer, positive

_REWARDS: dict[str, Callable[[], Callable]] = {}


def reward_loader(name: str):
    """Register a named reward: a zero-argument function that builds the callable (loaded
    lazily)."""

    def deco(fn):
        _REWARDS[name] = fn
        return fn

    return deco


@reward_loader("toy")
@functools.lru_cache(maxsize=1)
def _toy():
    from ..toy import reward

    return reward.load()


def parse_rewards(spec: str) -> list[tuple[str, float]]:
    """'toy' or 'toy:1+name:0.5' -> [(name, weight)], checked without loading anything."""
    out = []
    for term in spec.split("+"):
        name, _, weight = term.strip().partition(":")
        if name not in _REWARDS:
            raise ValueError(
                f"unknown reward {name!r}; choose one of: {', '.join(sorted(_REWARDS))} "
                f"(or pass callables from Python)"
            )
        try:
            out.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"reward weight {weight!r} of {name!r} is not a number") from None
    return out


def resolve(reward) -> list[tuple[Callable, float]]:
    """A reward spec, a callable, or a list of (callable, weight) -> [(callable, weight)]."""
    if callable(reward):
        return [(reward, 1.0)]
    if isinstance(reward, (list, tuple)):
        return [(r, float(w)) for r, w in reward]
    return [(_REWARDS[name](), w) for name, w in parse_rewards(str(reward))]


def norm_penalty(z: torch.Tensor) -> torch.Tensor:
    """R(z) per sample, in float32: |z|^2 / 2 - (d - 1) log |z|."""
    z = z.float().flatten(1)
    n = z.norm(dim=1)
    return 0.5 * n**2 - (z.shape[1] - 1) * torch.log(n)


@register("noise", "reno")
@dataclass(frozen=True)
class ReNO(NoiseOptimizer):
    """ReNO (Eyring et al. 2024): gradient ascent on the initial noise through rewards."""

    iterations: int = 50
    lr: float = 5.0
    momentum: float = 0.9
    clip: float = 0.1
    regularization: float = 0.01
    reward: object = "toy"  # "toy", "toy:1+name:0.5", a callable, or [(callable, weight), ...]
    needs = ("render",)

    def __post_init__(self):
        positive("iterations", self.iterations, integer=True, zero=True)
        positive("lr", self.lr)
        positive("clip", self.clip)
        positive("regularization", self.regularization, zero=True)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if isinstance(self.reward, str):
            parse_rewards(self.reward)

    def optimise(self, ctx: NoiseContext, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        self.check(ctx)
        if self.iterations == 0:
            return x, {}
        rewards = resolve(self.reward)
        rows = list(range(x.shape[0]))
        z = (x.detach().float() / ctx.scale).requires_grad_(True)
        opt = torch.optim.SGD([z], lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0)
        best = torch.full((len(rows),), math.inf)
        best_z = z.detach().clone()
        active = torch.ones(len(rows), dtype=torch.bool)
        stopped: list = [None] * len(rows)

        def stop(mask, it, why):
            for j in mask.nonzero().flatten().tolist():
                stopped[j] = {"iteration": it, "reason": why}
            active[mask] = False

        first = None
        with torch.enable_grad():
            for it in range(self.iterations):
                if not active.any():  # every image stopped
                    break
                loss = self._loss(rewards, ctx.render(z * ctx.scale, rows), ctx.prompts, it)
                per = loss.detach().cpu()
                first = per.clone() if first is None else first
                stop(active & ~torch.isfinite(per), it, "non-finite reward")
                better = active & (per < best)
                best = torch.where(better, per, best)
                best_z[better] = z.detach()[better]
                if it == self.iterations - 1 or not active.any():
                    break
                opt.zero_grad()
                keep = active.to(loss.device)
                (
                    torch.where(keep, loss, 0).sum()
                    + self.regularization * torch.where(keep, norm_penalty(z), 0).sum()
                ).backward()
                ctx.counts["backward"] += int(active.sum())
                with torch.no_grad():
                    g = z.grad.flatten(1)
                    stop(active & ~torch.isfinite(g).all(1).cpu(), it, "non-finite gradient")
                    g[~active.to(g.device)] = 0
                    n = g.norm(dim=1).clamp_min(1e-12)  # clip each image's gradient on its own
                    z.grad.mul_((self.clip / n).clamp(max=1.0).view(-1, *[1] * (z.ndim - 1)))
                opt.step()
                with (
                    torch.no_grad()
                ):  # a stopped image stays at its best noise (momentum cannot move it)
                    stop(
                        active & ~torch.isfinite(z.detach().flatten(1)).all(1).cpu(),
                        it,
                        "non-finite noise",
                    )
                    z[~active.to(z.device)] = best_z[~active].to(z.device)
        report = {"reward_loss_start": first.tolist(), "reward_loss_best": best.tolist()}
        if any(stopped):
            report["stopped"] = stopped
        return best_z.to(x.dtype) * ctx.scale, report

    @staticmethod
    def _loss(rewards, images, prompts, it: int) -> torch.Tensor:
        """-sum_i w_i r_i per image; a reward that is not finite at the start is an error (later,
        the image stops where it was best)."""
        loss = 0
        for fn, w in rewards:
            r = fn(images, prompts)
            name = getattr(fn, "__name__", type(fn).__name__)
            if not isinstance(r, torch.Tensor) or r.shape != (images.shape[0],):
                raise ValueError(
                    f"reward {name} must return one score per image ({images.shape[0]}), got "
                    f"{tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__}"
                )
            bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
            if bad and it == 0:
                raise ValueError(
                    f"reward {name} returned {float(r[bad[0]].detach())} for image {bad[0]} "
                    f"(prompt {prompts[bad[0]]!r}) on the starting noise; rewards must be finite"
                )
            loss = loss - w * r.float()
        return loss

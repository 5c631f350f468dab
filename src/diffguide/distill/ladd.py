"""Latent adversarial distillation, LADD (Sauer et al. 2024, arXiv 2403.12015), as SANA-Sprint
(arXiv 2503.09641, Sec. 3.3) adds it to sCM.

The discriminator is the frozen teacher itself: the student's one-step x0 and real data are
re-noised to a TrigFlow time t_D drawn from its own log-normal proposal (SANA-Sprint's
P_mean -0.6, P_std 1.0), the teacher runs on them, and small trainable heads read the outputs of
several of its blocks. Hinge losses (SANA-Sprint's setting): the heads minimise
relu(1 - D(real)) + relu(1 + D(fake)), the student -D(fake), weighted beside the sCM loss.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .dmd2 import Bottleneck
from .scm import TrigFlowView, noised


def _family(net, family):
    """``family``, or for a bare network (no pipeline at hand) the recipe whose hooks fit it."""
    if family is not None:
        return family
    from ..pipelines.families import Family, TransformerFamily

    return (TransformerFamily if hasattr(net, "transformer_blocks") else Family)(None)


def feature_modules(net, family=None) -> list:
    """The teacher blocks the heads read (``Family.feature_blocks``): a UNet's mid block and up
    blocks; four blocks spread along a transformer's depth (SANA-Sprint reads 2, 8, 14, 19 of
    20)."""
    return _family(net, family).feature_blocks(net)


def feature_widths(net, family=None) -> list[int]:
    """The channels of ``feature_modules(net)``'s outputs (``Family.feature_widths``)."""
    return _family(net, family).feature_widths(net)


@dataclass
class LADD:
    """The adversarial term. ``teacher``: the frozen denoiser whose ``modules`` feed ``heads``
    (a ModuleList of GANHead, one per module)."""

    teacher: Any
    modules: Any
    heads: Any
    sigma_d: float = 0.5
    p_mean: float = -0.6
    p_std: float = 1.0
    t_max: float | None = None  # default: the teacher schedule's largest level

    def __post_init__(self):
        if self.t_max is None:
            self.t_max = math.atan(float(self.teacher.schedule.sigma_max) / self.sigma_d)

    def logits(self, x0: torch.Tensor, cond, g: torch.Generator) -> torch.Tensor:
        """D(x0): the heads' mean logit on the teacher's features at a fresh noisy x_{t_D}."""
        t, _, _, x_t = noised(x0, g, self.p_mean, self.p_std, self.sigma_d, self.t_max)
        with contextlib.ExitStack() as stack:
            taps = [stack.enter_context(Bottleneck(m)) for m in self.modules]
            TrigFlowView(self.teacher, self.sigma_d).pred(x_t, t, cond)
        return torch.stack([h(tap.out) for h, tap in zip(self.heads, taps)]).mean(0)

    def generator_loss(self, x0: torch.Tensor, cond, g: torch.Generator) -> torch.Tensor:
        return -self.logits(x0, cond, g).mean()

    def discriminator_loss(
        self, fake: torch.Tensor, real: torch.Tensor, cond, g: torch.Generator
    ) -> torch.Tensor:
        return (
            F.relu(1 - self.logits(real, cond, g)).mean()
            + F.relu(1 + self.logits(fake.detach(), cond, g)).mean()
        )

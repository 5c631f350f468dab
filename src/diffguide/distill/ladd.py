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


def feature_modules(net) -> list:
    """The teacher blocks the heads read: a UNet's mid block and up blocks; four blocks spread along
    a transformer's depth (SANA-Sprint uses blocks 2, 8, 14, 19 of 20)."""
    if hasattr(net, "mid_block"):
        return [net.mid_block, *net.up_blocks]
    blocks = list(net.transformer_blocks)
    n = len(blocks)
    picks = sorted({min(n - 1, round((2 * k + 1) * n / 8)) for k in range(4)}) if n > 4 else range(n)
    return [blocks[i] for i in picks]


def feature_widths(net) -> list[int]:
    """The channels of ``feature_modules(net)``'s outputs."""
    c = net.config
    if hasattr(net, "mid_block"):
        return [c.block_out_channels[-1], *reversed(c.block_out_channels)]
    return [c.num_attention_heads * c.attention_head_dim] * len(feature_modules(net))


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
    t_max: float | None = None      # default: the teacher schedule's largest level

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

    def discriminator_loss(self, fake: torch.Tensor, real: torch.Tensor, cond, g: torch.Generator) -> torch.Tensor:
        return F.relu(1 - self.logits(real, cond, g)).mean() + F.relu(1 + self.logits(fake.detach(), cond, g)).mean()

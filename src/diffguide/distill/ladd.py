"""Latent adversarial distillation, LADD (Sauer et al. 2024, arXiv 2403.12015), as SANA-Sprint
(arXiv 2503.09641, Sec. 3.3; NVlabs/Sana train_scripts/train_scm_ladd.py) adds it to sCM.

The discriminator is the frozen teacher itself: the student's one-step x0 and real data are
re-noised to a TrigFlow time t_D drawn from its own log-normal proposal (SANA-Sprint's
P_mean -0.6, P_std 1.0), the teacher runs on them, and small trainable heads read the outputs of
several of its blocks. The heads are StyleGAN-T's (as SANA-Sprint's): spectral-normalised 1-D
convolutions over the block's token sequence, one logit per token. Hinge losses per token
(SANA-Sprint's setting): the heads minimise ½ (relu(1 - D(real)) + relu(1 + D(fake))), with real
images under another example's caption counted among the fakes (its misaligned pairs), the
student -D(fake), weighted beside the sCM loss.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from .dmd2 import Bottleneck, image_stream
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


class TokenConv(torch.nn.Module):
    """A spectral-normalised Conv1d over the token sequence [B, C, N], padded circularly (any N,
    however short against the kernel)."""

    def __init__(self, c_in: int, c_out: int, kernel: int):
        super().__init__()
        self.pad = kernel // 2
        self.conv = spectral_norm(torch.nn.Conv1d(c_in, c_out, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            n = x.shape[-1]
            x = x.index_select(-1, torch.arange(-self.pad, n + self.pad, device=x.device) % n)
        return self.conv(x)


class LocalBatchNorm(torch.nn.Module):
    """Batch normalisation over groups of at most ``group`` samples and all their tokens, with no
    running statistics (StyleGAN-T's local batch norm): the same in training and evaluation."""

    def __init__(self, channels: int, group: int = 8, eps: float = 1e-5):
        super().__init__()
        self.group, self.eps = group, eps
        self.weight = torch.nn.Parameter(torch.ones(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for part in x.chunk(math.ceil(x.shape[0] / self.group)):
            mean = part.mean((0, 2), keepdim=True)
            var = part.var((0, 2), keepdim=True, unbiased=False)
            parts.append((part - mean) * torch.rsqrt(var + self.eps))
        return torch.cat(parts) * self.weight[:, None] + self.bias[:, None]


class _Residual(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.inner(x)) / math.sqrt(2)


def _token_block(channels: int, kernel: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        TokenConv(channels, channels, kernel),
        LocalBatchNorm(channels),
        torch.nn.LeakyReLU(0.2),
    )


class TokenHead(torch.nn.Module):
    """LADD's head on one teacher block (StyleGAN-T's discriminator head, unconditional, as
    SANA-Sprint's): a kernel-1 block, a residual kernel-9 block and a kernel-1 classifier, every
    convolution spectral-normalised, over the block's tokens; one logit per token, [B, N]. A UNet
    block's [B, C, H, W] is H*W tokens of width C, a transformer's [B, N, C] N tokens; of a
    dual-stream block's (text, image), the image stream."""

    def __init__(self, channels: int):
        super().__init__()
        self.main = torch.nn.Sequential(
            _token_block(channels, 1), _Residual(_token_block(channels, 9))
        )
        self.cls = TokenConv(channels, 1, 1)

    def forward(self, h) -> torch.Tensor:
        h = image_stream(h)
        h = h.flatten(2) if h.ndim == 4 else h.transpose(1, 2)  # [B, C, N]
        return self.cls(self.main(h.float()))[:, 0]


def _hinge(logits: list, sign: float) -> torch.Tensor:
    """relu(1 - sign D) per token, averaged over each head's tokens, then over the heads (for a
    transformer, whose blocks have one token count, the mean over all the logits)."""
    return torch.stack([F.relu(1 - sign * x).mean() for x in logits]).mean()


@contextlib.contextmanager
def _training(module, mode: bool):
    """``module`` in training (spectral norm's power iteration runs) or evaluation mode for a
    while."""
    was = module.training
    module.train(mode)
    try:
        yield
    finally:
        module.train(was)


@dataclass
class LADD:
    """The adversarial term. ``teacher``: the frozen denoiser whose ``modules`` feed ``heads``
    (a ModuleList of TokenHead, one per module). ``misaligned``: the heads also see real images
    under another example's caption as fakes (SANA-Sprint's misaligned_pairs_D)."""

    teacher: Any
    modules: Any
    heads: Any
    sigma_d: float = 0.5
    p_mean: float = -0.6
    p_std: float = 1.0
    t_max: float | None = None  # default: the teacher schedule's largest level
    misaligned: bool = True

    def __post_init__(self):
        if self.t_max is None:
            self.t_max = math.atan(float(self.teacher.schedule.sigma_max) / self.sigma_d)

    def logits(self, x0: torch.Tensor, cond, g: torch.Generator) -> list[torch.Tensor]:
        """D(x0): each head's logits per token, [B, N_k], on the teacher's features at a fresh
        noisy x_{t_D}."""
        t, _, _, x_t = noised(x0, g, self.p_mean, self.p_std, self.sigma_d, self.t_max)
        with contextlib.ExitStack() as stack:
            taps = [stack.enter_context(Bottleneck(m)) for m in self.modules]
            TrigFlowView(self.teacher, self.sigma_d).pred(x_t, t, cond)
        return [h(tap.out) for h, tap in zip(self.heads, taps)]

    def generator_loss(self, x0: torch.Tensor, cond, g: torch.Generator) -> torch.Tensor:
        """-D(x0), averaged over tokens and heads (the heads in evaluation mode, as SANA-Sprint's
        discriminator in the generator's phase: no power iteration)."""
        with _training(self.heads, False):
            return -torch.stack([x.mean() for x in self.logits(x0, cond, g)]).mean()

    def discriminator_loss(
        self, fake: torch.Tensor, real: torch.Tensor, cond, g: torch.Generator
    ) -> torch.Tensor:
        """½ (hinge(real) + hinge(fake)), the fake side over the student's estimates and, with
        ``misaligned`` and more than one example, over the real images rolled by one against
        their captions (each image under its neighbour's caption), half each, as SANA-Sprint's
        mean over their concatenation."""
        with _training(self.heads, True):
            d_real = _hinge(self.logits(real, cond, g), 1.0)
            fakes = [_hinge(self.logits(fake.detach(), cond, g), -1.0)]
            if self.misaligned and real.shape[0] > 1:
                fakes.append(_hinge(self.logits(real.roll(1, 0), cond, g), -1.0))
        return 0.5 * (d_real + torch.stack(fakes).mean())

"""DMD2: distribution-matching distillation of a guided teacher (Yin et al. 2024, arXiv 2405.14867).

The generator G maps noise (at conditioning time tau_0, or a backward-simulated x at tau_k) to x0.
Its update follows the difference of two scores at a random level t: the frozen teacher under any
diffguide guidance ("real") and a trainable copy fitted to G's own samples ("fake"). Optional GAN
term: a small head on the fake network's bottleneck features tells real from generated images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core.guided import guide
from ..core.pred import Pred
from ..core.registry import parse_spec
from ..core.sample import RandomNoise


def conditioning_times(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DMD2's generator times: T-1, T-1-T/n, ... (n = 4: 999, 749, 499, 249), as LCM's grid with n
    original steps reproduces them."""
    if steps < 1:
        raise ValueError(f"student steps must be >= 1, got {steps!r}")
    c = num_train_timesteps // steps
    return [num_train_timesteps - 1 - k * c for k in range(steps)]


def image_stream(h) -> torch.Tensor:
    """A block's output as image features: a tensor as it is ([B, C, H, W] from a UNet, tokens
    [B, N, C] from a transformer); of a dual-stream block's (text, image) tuple, the image
    stream."""
    if isinstance(h, tuple):
        h = [o for o in h if torch.is_tensor(o)][-1]
    return h


class GANHead(torch.nn.Module):
    """DMD2's classifier on the fake network's bottleneck (mid-block) features: conv stack to a
    logit."""

    def __init__(self, channels: int):
        super().__init__()
        groups = math.gcd(32, channels)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, padding=1),
            torch.nn.GroupNorm(groups, channels),
            torch.nn.SiLU(),
            torch.nn.Conv2d(channels, channels, 3, padding=1),
            torch.nn.GroupNorm(groups, channels),
            torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(channels, 1),
        )

    def forward(self, h) -> torch.Tensor:
        h = image_stream(h)
        if h.ndim == 3:  # transformer tokens [B, N, C]: a 1-pixel-wide image of N rows
            h = h.transpose(1, 2).unsqueeze(-1)
        return self.net(h.float()).squeeze(1)


class Bottleneck:
    """Captures a module's output during a forward pass (``with Bottleneck(unet.mid_block) as
    b``)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.out, self._hook = module, None, None

    def __enter__(self):
        self._hook = self.module.register_forward_hook(lambda m, i, o: setattr(self, "out", o))
        return self

    def __exit__(self, *exc):
        self._hook.remove()


@dataclass
class DMD2Loss:
    """The generator and fake-score losses of DMD2. teacher / fake / generator: (x, t, cond) -> Pred
    denoisers on one schedule (generator with its boundary applied). ``taus``: the generator's
    conditioning times, the first at pure noise. ``bottleneck``: the fake network's module whose
    output feeds ``head`` (both None: no GAN term)."""

    teacher: Any
    fake: Any
    generator: Any
    guidance: Any = "cfg"
    taus: tuple = (999,)
    t_range: tuple = (0.02, 0.98)  # the DM gradient's levels, as fractions of T
    head: Any = None
    bottleneck: Any = None
    gan_generator: float = 1e-3
    gan_fake: float = 1e-2
    times: tuple | None = (
        None  # the generator's times on the schedule itself (rCM: sCM's), not taus
    )

    def __post_init__(self):
        if isinstance(self.guidance, str):
            self.guidance = parse_spec("guidance", self.guidance)
        n = self.teacher.schedule.num_train_timesteps
        if not self.taus or any(not 0 < t < n for t in self.taus):
            raise ValueError(f"conditioning times must lie in (0, {n}), got {list(self.taus)}")
        if (self.head is None) != (self.bottleneck is None):
            raise ValueError(
                "the GAN head needs the fake network's bottleneck module, and vice versa"
            )

    def _time(self, i) -> torch.Tensor:
        return self.teacher.schedule.index_time(torch.tensor(float(i), dtype=torch.float64))

    def _noised(self, x0, t, g):
        sched = self.teacher.schedule
        eps = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        return float(sched.alpha(t)) * x0 + float(sched.sigma(t)) * eps, eps

    def sample(
        self, noise: torch.Tensor, cond: dict, g: torch.Generator
    ) -> tuple[torch.Tensor, int]:
        """G's x0 at a random stage k (with grad), from an input made by backward simulation: G run
        without grad through stages 0..k-1 from ``noise``, each x0 re-noised to the next tau."""
        taus = self.times or [self._time(i) for i in self.taus]
        k = int(torch.randint(len(taus), (1,), generator=g))
        x = noise * math.sqrt(
            float(self.teacher.schedule.alpha(taus[0])) ** 2
            + float(self.teacher.schedule.sigma(taus[0])) ** 2
        )
        with torch.no_grad():
            for j in range(k):
                x0 = self.generator(x, taus[j], cond).x0
                x, _ = self._noised(x0, taus[j + 1], g)
        return self.generator(x, taus[k], cond).x0, k

    def _level(self, g, lo: float, hi: float) -> torch.Tensor:
        n = self.teacher.schedule.num_train_timesteps
        a, b = int(lo * n), min(int(hi * n), n - 1)
        return self._time(int(torch.randint(a, b + 1, (1,), generator=g)))

    def _logits(self, x0, cond, g) -> torch.Tensor:
        t = self._level(g, 0.0, 1.0)
        x, _ = self._noised(x0, t, g)
        with Bottleneck(self.bottleneck) as b:
            self.fake(x, t, cond)
        return self.head(b.out)

    def generator_loss(self, x0: torch.Tensor, pos: dict, neg: dict, g: torch.Generator) -> tuple:
        """½‖x0 − sg(x0 − grad)‖² with grad = (x̂_fake − x̂_real) / mean|x0 − x̂_real| (DMD eq. 7 and
        the reference code's normaliser), plus the non-saturating GAN term."""
        t = self._level(g, *self.t_range)
        with torch.no_grad():
            x, _ = self._noised(x0.detach(), t, g)
            gd = guide(self.teacher, self.guidance, pos, neg)
            gd.reset(RandomNoise(g))
            real = gd(x, t).x0.double()
            fake = self.fake(x, t, pos).x0.double()
            xd = x0.detach().double()
            norm = (xd - real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            grad = torch.nan_to_num((fake - real) / norm).to(x0.dtype)
        loss = 0.5 * F.mse_loss(x0.float(), (x0 - grad).detach().float())
        logs = {"dm": loss.item()}
        if self.head is not None:
            gan = F.softplus(-self._logits(x0, pos, g)).mean()
            logs["gan_g"] = gan.item()
            loss = loss + self.gan_generator * gan
        return loss, logs

    def fake_loss(
        self, x0: torch.Tensor, pos: dict, g: torch.Generator, real: torch.Tensor | None = None
    ):
        """The fake score's denoising loss on detached generator samples (MSE in the network's own
        output kind, t ~ U[0, T)), plus the head's real-vs-generated loss when ``real`` is given."""
        x0 = x0.detach()
        t = self._level(g, 0.0, 1.0)
        x, eps = self._noised(x0, t, g)
        p = self.fake(x, t, pos)
        a, s = float(self.teacher.schedule.alpha(t)), float(self.teacher.schedule.sigma(t))
        kind = getattr(self.fake, "kind", "eps")
        loss = F.mse_loss(p.output(kind, a, s).float(), Pred(x0, eps).output(kind, a, s).float())
        logs = {"fake": loss.item()}
        if self.head is not None and real is not None:
            d = (
                F.softplus(self._logits(x0, pos, g)).mean()
                + F.softplus(-self._logits(real, pos, g)).mean()
            )
            logs["gan_d"] = d.item()
            loss = loss + self.gan_fake * d
        return loss, logs

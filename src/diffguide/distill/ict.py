"""Improved consistency training (Song & Dhariwal 2023, arXiv 2310.14189): a consistency model
trained from data alone, no teacher.

The student f(x, t) = c_skip(t) x + c_out(t) x0_net(x, t) (LCM's boundary, so the folder samples
with the consistency sampler) is pulled at a noise level sigma_{i+1} towards its own stop-gradient
output at sigma_i on the same noise z: x_sigma = a x0 + s z with s / a = sigma. The paper's recipe:
the discretisation curriculum N(k) (Sec. 3.4), Karras levels, lognormal level sampling (Sec. 3.5),
weights 1 / (sigma_{i+1} - sigma_i) (Sec. 3.2), pseudo-Huber with c = 0.00054 sqrt(d) (Sec. 3.3),
and no EMA target (Sec. 3.2: the teacher is the online network under a stop-gradient).

``schedule="ect"``: ECT's continuous pairs instead (Geng et al. 2024, "Consistency models made
easy", arXiv 2406.14548; locuslab/ect): t log-normal, r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t)))
at least 0, so the first stage is mostly a diffusion loss against the data itself (a start from the
teacher's weights) and each stage halves the gap t - r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..core.denoiser import with_boundary


def curriculum(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)) (eq.
    5); K' is taken as at least 1 on runs shorter than log2(s1 / s0) + 1 steps."""
    kp = math.floor(total / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** math.floor(k / max(kp, 1)), s1) + 1


def karras_levels(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma_1 < ... < sigma_n: (sigma_min^(1/rho) + (i - 1)/(n - 1) (sigma_max^(1/rho) -
    sigma_min^(1/rho)))^rho."""
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i / (n - 1) * (hi - lo)) ** rho


def lognormal_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """p(sigma_i) proportional to erf((log sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((log
    sigma_i - P_mean)
    / (sqrt 2 P_std)) for i = 1 .. n - 1 (Sec. 3.5)."""
    e = torch.erf((torch.log(sigmas) - p_mean) / (math.sqrt(2) * p_std))
    p = e[1:] - e[:-1]
    return p / p.sum()


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0):
    """ECT's mapping from a level t to its partner r <= t at ``stage`` (the sigmoid form, with the
    authors' q = 2, k = 8, b = 1), clamped at 0 (r = 0: the data itself)."""
    ratio = 1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t))
    return (t * ratio).clamp(min=0)


def pseudo_huber_each(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c per sample (the paper's metric on whole samples, Sec. 3.3)."""
    d = (a.float() - b.float()).flatten(1).pow(2).sum(1)
    return torch.sqrt(d + c * c) - c


@dataclass
class ICTLoss:
    """One iCT loss on a batch of data x0 with conditions ``cond`` at training step ``step`` of
    ``total`` (the curriculum's K). ``student``: (x, t, cond) -> Pred without the boundary."""

    student: Any
    total: int
    s0: int = 10
    s1: int = 1280
    rho: float = 7.0
    p_mean: float = -1.1
    p_std: float = 2.0
    sigma_min: float | None = None  # None: the schedule's own range (VE sigma)
    sigma_max: float | None = None
    huber_c: float | None = None  # None: 0.00054 sqrt(d)
    timestep_scaling: float | None = 10.0  # LCM's boundary; None: none (a flow student needs none)
    schedule: str = "ict"  # "ict": the discrete curriculum; "ect": ECT's continuous pairs
    ect_stage: int = 0  # ECT: steps per stage (0: total / 8)

    def __post_init__(self):
        sc = self.student.schedule
        self.sigma_min = float(sc.sigma_min if self.sigma_min is None else self.sigma_min)
        self.sigma_max = float(sc.sigma_max if self.sigma_max is None else self.sigma_max)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min!r}, {self.sigma_max!r}"
            )
        if not 1 <= self.s0 <= self.s1:
            raise ValueError(f"need 1 <= s0 <= s1, got {self.s0!r}, {self.s1!r}")

    def levels(self, step: int) -> torch.Tensor:
        return karras_levels(
            curriculum(step, self.total, self.s0, self.s1), self.sigma_min, self.sigma_max, self.rho
        )

    def __call__(
        self, x0: torch.Tensor, cond, step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        sc, b = self.student.schedule, x0.shape[0]
        at_data = None
        if self.schedule == "ect":
            lo, hi, stage = self.ect_pair(b, step, generator)
            logs = {"stage": float(stage)}
            # r = 0: the data itself; else taken at least at the table's lowest level
            at_data, lo_level = lo == 0, lo.clamp(min=self.sigma_min)
        else:
            sig = self.levels(step)
            probs = lognormal_probs(sig, self.p_mean, self.p_std)
            i = torch.multinomial(probs, b, replacement=True, generator=generator)
            lo, hi = sig[i], sig[i + 1]
            lo_level, logs = lo, {"levels": float(len(sig))}
        z = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        t_lo, t_hi = sc.t_of_ve(lo_level), sc.t_of_ve(hi)

        def noised(t):
            a, s = (
                f(t).to(x0.device, x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
                for f in (sc.alpha, sc.sigma)
            )
            return a * x0 + s * z

        f = with_boundary(self.student, self.timestep_scaling)
        online = f(noised(t_hi), t_hi, cond).x0
        with torch.no_grad():
            target = f(noised(t_lo), t_lo, cond).x0
            if at_data is not None:
                mask = at_data.to(x0.device).view(-1, *([1] * (x0.ndim - 1)))
                target = torch.where(mask, x0.to(target.dtype), target)
        c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(x0[0].numel())
        w = (1.0 / (hi - lo)).to(x0.device, torch.float32)
        loss = (w * pseudo_huber_each(online, target, c)).mean()
        return loss, {"loss": float(loss.detach()), **logs}

    def ect_pair(self, b: int, step: int, generator: torch.Generator):
        """(r, t, stage): t per sample log-normal (P_mean, P_std) within the schedule's range, r by
        ``ect_r`` at this step's stage."""
        tau = self.p_mean + self.p_std * torch.randn(b, generator=generator, dtype=torch.float64)
        t = tau.exp().clamp(self.sigma_min, self.sigma_max)
        stage = step // (self.ect_stage or max(1, self.total // 8))
        # r stays below t: from about stage 50 the ratio rounds to 1 and the weight 1/(t - r) to inf
        return torch.minimum(ect_r(t, stage), t * (1 - 1e-9)), t, stage

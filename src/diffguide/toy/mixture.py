"""A Gaussian mixture with an exact denoiser: E[x0 | x_t] in closed form, conditional on a class.

Data x0 ~ sum_k w_k N(mu_k, c_k^2 I); component k belongs to class labels[k]. Given x_t = a x0 + s
eps, x_t | k ~ N(a mu_k, (a^2 c_k^2 + s^2) I), so the posterior over components and E[x0 | x_t, k] =
mu_k + a c_k^2 (x_t - a mu_k) / (a^2 c_k^2 + s^2) are exact. Conditioning on a class restricts the
sum to that class's components; a label < 0 (or cond None) means unconditional. Because the solver
error is then the only error, sampler orders and guidance identities can be measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.pred import Pred
from ..core.schedule import Schedule

F64 = torch.float64


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Exact denoiser ``(x, t, cond) -> Pred`` for a class-conditional isotropic Gaussian
    mixture."""

    means: torch.Tensor  # [K, d]
    stds: torch.Tensor  # [K]
    weights: torch.Tensor  # [K]
    labels: torch.Tensor  # [K] class of each component
    schedule: Schedule

    def __post_init__(self):
        means = torch.as_tensor(self.means, dtype=F64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(self.stds, dtype=F64).expand(k).clone()
        weights = torch.as_tensor(self.weights, dtype=F64).expand(k).clone()
        labels = torch.as_tensor(self.labels, dtype=torch.long).expand(k).clone()
        if torch.any(stds <= 0) or torch.any(weights <= 0):
            raise ValueError("mixture stds and weights must be positive")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        object.__setattr__(self, "weights", weights / weights.sum())
        object.__setattr__(self, "labels", labels)

    @classmethod
    def ring(
        cls,
        schedule: Schedule,
        classes: int = 4,
        per_class: int = 2,
        dim: int = 2,
        radius: float = 1.0,
        std: float = 0.15,
    ) -> "GaussianMixture":
        """classes * per_class components on a circle (first two dims), neighbours in one class."""
        k = classes * per_class
        ang = torch.arange(k, dtype=F64) * (2 * torch.pi / k)
        means = torch.zeros(k, dim, dtype=F64)
        means[:, 0], means[:, 1] = radius * torch.cos(ang), radius * torch.sin(ang)
        return cls(
            means, torch.full((k,), std), torch.ones(k), torch.arange(k) // per_class, schedule
        )

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _mask(self, cond, b: int) -> torch.Tensor:
        """[B, K] True where component k is allowed for sample b."""
        if cond is None:
            return torch.ones(b, self.means.shape[0], dtype=torch.bool)
        y = torch.as_tensor(cond).reshape(-1).long().cpu()
        if y.numel() == 1:
            y = y.expand(b)
        if y.numel() != b:
            raise ValueError(f"cond has {y.numel()} labels for a batch of {b}")
        known = set(self.labels.tolist())
        bad = [v for v in y.tolist() if v >= 0 and v not in known]
        if bad:
            raise ValueError(
                f"unknown class label {bad[0]}; this mixture has {sorted(known)} "
                f"(or a negative label for unconditional)"
            )
        return (y[:, None] < 0) | (y[:, None] == self.labels[None, :])

    def posterior_mean(self, x: torch.Tensor, a, s, cond=None) -> torch.Tensor:
        """E[x0 | x_t = x] in float64, for scalar or per-sample (a, s)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}], got {tuple(x.shape)}")
        xd = x.to(F64).cpu()
        a = torch.as_tensor(a, dtype=F64).reshape(-1, 1)
        s = torch.as_tensor(s, dtype=F64).reshape(-1, 1)
        c2 = self.stds[None, :] ** 2
        var = a * a * c2 + s * s  # [B, K]
        diff = xd[:, None, :] - a[:, :, None] * self.means[None]  # [B, K, d]
        logp = (
            -0.5 * (diff**2).sum(-1) / var
            - 0.5 * self.dim * torch.log(var)
            + torch.log(self.weights)[None]
        )
        logp = logp.masked_fill(~self._mask(cond, x.shape[0]), -torch.inf)
        r = torch.softmax(logp, dim=1)  # [B, K]
        comp = self.means[None] + (a * c2 / var)[:, :, None] * diff  # [B, K, d]
        return (r[:, :, None] * comp).sum(1).to(x.device)

    def __call__(self, x: torch.Tensor, t, cond=None) -> Pred:
        t = torch.as_tensor(t, dtype=F64)
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        x0 = self.posterior_mean(x, a, s, cond).to(x.dtype if x.dtype == F64 else torch.float32)
        return Pred.from_x0(x, x0, a, s)

    def score(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """grad log p_t(x | cond) = (a E[x0|x] - x) / s^2 (Tweedie), exact."""
        t = torch.as_tensor(t, dtype=F64)
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        return (a * self.posterior_mean(x, a, s, cond) - x.to(F64)) / (s * s)

    def sample_data(
        self, n: int, cond=None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Exact draws of x0 (given class labels, or unconditional)."""
        mask = self._mask(cond, n).to(F64)
        probs = mask * self.weights[None]
        k = torch.multinomial(probs / probs.sum(1, keepdim=True), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, dtype=F64, generator=generator)
        return self.means[k] + self.stds[k, None] * z

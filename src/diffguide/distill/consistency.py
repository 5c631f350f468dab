"""Consistency distillation of a guided teacher (LCM: Luo et al. 2023, arXiv 2310.04378, Alg. 1).

The student f(x, t, w) = c_skip(t) x + c_out(t) x0_student(x, t, w) is trained so that f at
x_{t_{n+k}}
matches the EMA target at x_{t_n}, where x_{t_n} is one step of a diffguide sampler (DDIM by
default)
driven by the teacher under any guidance method. For CFG the scale is drawn per example and given to
the student as LCM's guidance-scale embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.denoiser import with_boundary
from ..core.guided import Branch, Guidance, guide
from ..core.registry import parse_spec
from ..core.sample import RandomNoise, Sampler, Step
from ..guidance.cfg import CFG


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber distance sqrt((a - b)^2 + c^2) - c, averaged (Song & Dhariwal 2023, Sec.
    3.3)."""
    d = (a.float() - b.float()) ** 2
    return (torch.sqrt(d + c * c) - c).mean()


def draw_scales(scale_range: tuple, b: int, generator: torch.Generator) -> torch.Tensor:
    """LCM's CFG scales, one per example, w ~ U[lo, hi] (diffusers' convention; Luo et al. 2023,
    Alg. 1)."""
    lo, hi = scale_range
    return lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class PerSampleCFG(Guidance):
    """CFG with one scale per sample ([B] tensor, diffusers' convention): the teacher of LCM."""

    scales: torch.Tensor = field(default_factory=lambda: torch.ones(1))

    def branches(self, pt, state=None):
        return {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        u = preds["u"]
        return u + self.scales.to(x.device, torch.float64) * (preds["c"] - u), state


def student_unet(teacher, embed_dim: int = 256):
    """A copy of the teacher UNet with LCM's guidance-scale input (``time_cond_proj_dim``); the new
    projection starts at zero, so the student starts as the teacher."""
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=embed_dim)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in k for k in missing):
        raise ValueError(
            f"student does not match the teacher: missing {missing}, unexpected {unexpected}"
        )
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher.device, teacher.dtype)


@dataclass
class ConsistencyLoss:
    """One LCM distillation loss. teacher / student / target: (x, t, cond) -> Pred denoisers on one
    schedule (student and target without the boundary; it is applied here). ``skip`` is k; the
    teacher grid is t = k - 1, 2k - 1, ..., T - 1, and one ``solver`` step goes from t to t - k."""

    teacher: Any
    student: Any
    target: Any
    guidance: Any = "cfg"
    solver: Any = "ddim"
    skip: int = 20
    huber_c: float = 0.001
    scale_range: tuple = (3.0, 13.0)  # CFG scales (diffusers' convention) drawn per example
    embed: Any = None  # w -> the student's timestep_cond (None: no embedding)
    timestep_scaling: float | None = (
        10.0  # LCM's boundary; None: none (a flow student's x - s v is x at s = 0)
    )

    def __post_init__(self):
        if isinstance(self.guidance, str):
            self.guidance = parse_spec("guidance", self.guidance)
        if isinstance(self.solver, str):
            self.solver = parse_spec("sampler", self.solver)
        if not isinstance(self.solver, Sampler):
            raise ValueError(
                f"solver must be a sampler spec or Sampler, got {type(self.solver).__name__}"
            )
        n = self.teacher.schedule.num_train_timesteps
        if not 1 <= self.skip < n:
            raise ValueError(f"skip must be in [1, {n - 1}], got {self.skip!r}")

    def grid(self) -> torch.Tensor:
        """The teacher's training indices k - 1, 2k - 1, ..., T - 1 (their times:
        ``index_time``)."""
        n = self.teacher.schedule.num_train_timesteps
        return torch.arange(self.skip - 1, n, self.skip, dtype=torch.float64)

    def __call__(
        self, x0: torch.Tensor, pos: dict, neg: dict, generator: torch.Generator
    ) -> torch.Tensor:
        sched, b = self.teacher.schedule, x0.shape[0]
        grid = self.grid()
        i = grid[int(torch.randint(len(grid), (1,), generator=generator))]  # one level per batch
        t, t_prev = sched.index_time(i), sched.index_time(torch.clamp(i - self.skip, min=-1.0))
        eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        a, s = float(sched.alpha(t)), float(sched.sigma(t))
        x = a * x0 + s * eps
        guidance, w = self.guidance, None
        if (
            isinstance(guidance, CFG) and self.embed is not None
        ):  # LCM's scale per example, embedded
            w = draw_scales(self.scale_range, b, generator)
            guidance = PerSampleCFG(w)
        cond = dict(pos)
        if self.embed is not None and w is not None:
            cond["timestep_cond"] = self.embed(w - 1.0).to(x0.device)
        with torch.no_grad():
            gd = guide(self.teacher, guidance, pos, neg)
            gd.reset(RandomNoise(generator))
            st = Step.make(0, 1, t, t_prev, sched)
            x_prev, _ = self.solver.step(
                gd, x, st, self.solver.init_state(), RandomNoise(generator)
            )
            target = with_boundary(self.target, self.timestep_scaling)(x_prev, t_prev, cond).x0
        online = with_boundary(self.student, self.timestep_scaling)(x, t, cond).x0
        return pseudo_huber(online, target, self.huber_c)

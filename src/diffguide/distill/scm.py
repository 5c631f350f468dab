"""Continuous-time consistency distillation, sCM (Lu & Song 2024, arXiv 2410.11081; SANA-Sprint,
arXiv 2503.09641).

TrigFlow: x_t = cos(t) x0 + sin(t) z with z ~ N(0, sigma_d^2 I), t in [0, pi/2]; a model is a
network F(x_t / sigma_d, t) whose consistency function is f(x_t, t) = cos(t) x_t - sin(t) sigma_d F.
Any diffguide denoiser on its own schedule (eps, v, flow, VP or flow tables) is seen as a TrigFlow
model without retraining (``TrigFlowView``): TrigFlow's t has the VE level sigma_d tan(t), the
denoiser runs at the time of its own schedule with that level on x scaled to its coordinates, and
its Pred(x0, eps) gives F = cos(t) eps - sin(t) x0 / sigma_d (then f = x0 exactly). So the teacher's
velocity dx_t/dt = sigma_d F_teacher and the student's F are one conversion, and a student trained
in TrigFlow is still a denoiser of the teacher's kind, sampled by diffguide's consistency sampler.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..core.guided import guide
from ..core.pred import Pred
from ..core.sample import RandomNoise


SIGMA_D = 0.5  # TrigFlow's data scale (the sCM paper's and SANA-Sprint's)


@dataclass(frozen=True, eq=False)
class TrigFlowView:
    """A denoiser (x, t, cond) -> Pred on its own schedule, as the TrigFlow network F(x / sigma_d,
    t)."""

    denoiser: Any
    sigma_d: float = 0.5

    @property
    def schedule(self):
        return self.denoiser.schedule

    def native(self, x_t: torch.Tensor, t: torch.Tensor):
        """(x in the denoiser's coordinates, its time) for TrigFlow's (x_t, t); t of shape [B]."""
        sc = self.schedule
        ve = self.sigma_d * torch.tan(t)
        tn = sc.t_of_ve(ve)
        a = sc.alpha(tn).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return a * x_t / torch.cos(t).to(x_t.dtype).view_as(a), tn

    def pred(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> Pred:
        """The denoiser's Pred at TrigFlow's (x_t, t) (its x0 is the consistency function f)."""
        x, tn = self.native(x_t, t)
        return self.denoiser(x, tn, cond)

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """F(x_in = x_t / sigma_d, t) = cos(t) eps - sin(t) x0 / sigma_d."""
        p = self.pred(self.sigma_d * x_in, t, cond)
        return trig_output(p, t, self.sigma_d)


def cos_sin(t: torch.Tensor, like: torch.Tensor):
    """(cos t, sin t) per sample, shaped to broadcast over ``like``'s batch."""
    return (f(t).to(like.dtype).view(-1, *([1] * (like.ndim - 1))) for f in (torch.cos, torch.sin))


def trig_output(p: Pred, t: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """TrigFlow's network output for a Pred at TrigFlow time t: cos(t) eps - sin(t) x0 / sigma_d."""
    c, s = cos_sin(t, p.x0)
    return c * p.eps - s * p.x0 / sigma_d


def trig_pred(F: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, sigma_d: float) -> Pred:
    """The other way: x0 = cos(t) x_t - sin(t) sigma_d F, eps = (x_t - cos(t) x0) / (sin(t) sigma_d)
    (in TrigFlow's coordinates, x_t = cos(t) x0 + sin(t) sigma_d eps)."""
    c, s = cos_sin(t, F)
    x0 = c * x_t - s * sigma_d * F
    return Pred(x0, (x_t - c * x0) / (s * sigma_d))


def sample_times(
    b: int,
    generator: torch.Generator,
    p_mean: float,
    p_std: float,
    sigma_d: float,
    t_max: float,
    start_share: float = 0.0,
) -> torch.Tensor:
    """t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2) (Sec. 4.2's proposal), capped at
    t_max; a ``start_share`` of the draws at t_max itself, where a one- or two-step sampler starts
    (the proposal alone puts a fraction of a percent of its draws near there)."""
    tau = p_mean + p_std * torch.randn(b, generator=generator, dtype=torch.float64)
    t = torch.atan(torch.exp(tau) / sigma_d).clamp(max=t_max)
    if not start_share:  # no draw: the generator's stream stays as without a share
        return t
    at_start = torch.rand(b, generator=generator, dtype=torch.float64) < start_share
    return torch.where(at_start, torch.full_like(t, t_max), t)


def noised(
    x0: torch.Tensor,
    generator: torch.Generator,
    p_mean: float,
    p_std: float,
    sigma_d: float,
    t_max: float,
    start_share: float = 0.0,
):
    """(t, cos t, sin t, x_t): a TrigFlow time per sample from the proposal, and x_t = cos(t) x0 +
    sin(t) z, z ~ N(0, sigma_d^2 I)."""
    t = sample_times(x0.shape[0], generator, p_mean, p_std, sigma_d, t_max, start_share)
    t = t.to(x0.device)
    z = sigma_d * torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    c, s = cos_sin(t, x0)
    return t, c, s, c * x0 + s * z


class AdaptiveWeight(torch.nn.Module):
    """w_phi(t): a linear layer on Fourier features of log tan(t) (Sec. 4.3's learned weighting);
    zero at the start, so the loss starts unweighted."""

    def __init__(self, features: int = 16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(64), features // 2)) / 8)
        self.linear = torch.nn.Linear(features, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # (its optimum where the error is err: w = log(D / err), about log D = 8 on a 3x32x32
        # image, so it trains with its own, larger learning rate: --scm-weight-lr)
        u = torch.log(torch.tan(t.clamp(1e-4, math.pi / 2 - 1e-4))).float()[:, None] * self.freqs
        return self.linear(torch.cat([torch.cos(u), torch.sin(u)], 1))[:, 0]


def weighted(err: torch.Tensor, w: torch.Tensor, d: int) -> torch.Tensor:
    """Sec. 4.3's adaptive weighting, mean of e^w / D err - w: for a fixed error its minimum is at
    w = log(D / err)."""
    return (torch.exp(w) / d * err - w).mean()


_warned: list = []  # the fallback is announced once per process


def time_derivative(F, x_in, t, dx_in, cond, method: str = "jvp", h: float = 1e-4, span=None):
    """(F(x_in, t), d/dt F along x_in' = dx_in, t' = 1): forward-mode AD (``torch.func.jvp``, with
    attention computed by the math kernel: torch has no forward-mode rule for its fused CPU and
    flash kernels), a central finite difference with step h where forward mode is unavailable, or
    (``"secant"``) the slope between the per-sample times ``span`` = (lo, hi).
    On tiny UNet and DiT views in float64 the two agree within 1e-3 of the tangent's scale at
    h = 1e-4 (tests/test_scm.py); larger h adds truncation error, and much smaller h is dominated
    by the float32 time embeddings."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # contiguous: group norm's forward-mode rule views its input, which fails on a channels-last
    # batch (data permuted from HWC images is laid out so)
    x_in, dx_in = x_in.contiguous(), dx_in.contiguous()
    if method == "jvp":
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(
                    lambda x, s: F(x, s, cond), (x_in, t), (dx_in, torch.ones_like(t))
                )
        except (NotImplementedError, RuntimeError) as e:
            if not _warned:
                warnings.warn(
                    f"forward-mode AD failed in this network ({str(e).splitlines()[0][:160]}); sCM "
                    f"uses a central difference instead (h = {h}; within 1e-3 of the tangent's "
                    f"scale on the tiny test networks)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _warned.append(True)
            method = "finite_difference"
    if method == "finite_difference":
        span = (t - h, t + h)
    elif method != "secant":
        raise ValueError(f"method must be jvp, finite_difference or secant, got {method!r}")
    return F(x_in, t, cond), secant(F, x_in, t, dx_in, cond, *span)


def secant(F, x_in, t, dx_in, cond, lo, hi):
    """(F(x_in + (hi - t) dx_in, hi) - F(x_in - (t - lo) dx_in, lo)) / (hi - lo): the derivative
    along (dx_in, 1) as the slope between two times per sample (a central difference where they are
    t -+ h)."""
    shape = (-1, *([1] * (x_in.ndim - 1)))
    up, down = (hi - t).to(x_in.dtype).view(shape), (t - lo).to(x_in.dtype).view(shape)
    plus, minus = F(x_in + up * dx_in, hi, cond), F(x_in - down * dx_in, lo, cond)
    return (plus - minus) / (up + down)


def index_neighbours(schedule, t: torch.Tensor, sigma_d: float, steps: int = 1):
    """TrigFlow times ``steps`` training timesteps below and above t on ``schedule`` (kept inside
    [0, the schedule's largest level]): the span of the sCM tangent's secant for a teacher trained
    at integer timesteps. Such a teacher's F, differenced over a fraction of one timestep, has 4x
    the slope it has over 12 timesteps near index 800 (bench/scm_levels.py on the built-in UNet:
    2,900 against 716; 165 against 100-155 at index 375): its time embedding turns by about a
    radian per timestep, and the network saw only the integers."""
    tn = schedule.t_of_ve(sigma_d * torch.tan(t.double()))
    one = steps * (schedule.index_time(1) - schedule.index_time(0))

    def trig(u):  # the data end (ve 0) is TrigFlow's 0, the noise end its largest time
        ve = schedule.ve(u.clamp(schedule.t_min, schedule.t_max))
        return torch.atan(ve / sigma_d).to(t.dtype)

    return trig(tn - one), trig(tn + one)


@dataclass
class SCMLoss:
    """sCM distillation (Lu & Song 2024, Alg. 1, the sCD branch). ``teacher`` and ``student`` are
    denoisers on the teacher's schedule (the student without any boundary: TrigFlow has its own),
    ``weight`` an AdaptiveWeight. The teacher runs under any diffguide guidance method."""

    teacher: Any
    student: Any
    weight: Any
    guidance: Any = "cfg"
    sigma_d: float = SIGMA_D
    p_mean: float = 0.2
    p_std: float = 1.6
    start_share: float = 0.0  # the share of times at t_max, where sampling starts
    fit_steps: int = 0  # first steps: the student fitted to the guided teacher's F, no tangent
    tangent_c: float = 0.1  # tangent normalisation g / (||g|| + c)
    warmup: int = 10000  # tangent warm-up: r = min(1, step / warmup)
    method: str = "jvp"  # or finite_difference, or secant (over teacher timesteps either side)
    secant_steps: int = 8  # the secant's span: teacher timesteps either side
    prior_weight: bool = False  # SANA-Sprint's code: the loss also weighted by 1 / (sigma_d tan t)
    ladd: Any = None  # a LADD term (ladd.py) beside the consistency loss
    ladd_weight: float = 0.5  # SANA-Sprint's adv_lambda
    # LADD's student estimate from a fresh x_t, this share of its times at t_max (SANA-Sprint's
    # train_largest_timestep, largest_timestep_prob); 0: the estimate of the sCM pass
    ladd_start_share: float = 0.5

    def __post_init__(self):
        self.t_max = math.atan(float(self.teacher.schedule.sigma_max) / self.sigma_d)

    def ladd_estimate(self, x0: torch.Tensor, cond, generator: torch.Generator):
        """(t, the student's x0 at t) for LADD's generator term, as SANA-Sprint's
        train_largest_timestep: x0 noised afresh at a time from the proposal, a
        ``ladd_start_share`` of them at t_max where one-step sampling starts (one more student
        pass, with gradient)."""
        sd = self.sigma_d
        t, c, s, x_t = noised(
            x0, generator, self.p_mean, self.p_std, sd, self.t_max, self.ladd_start_share
        )
        return t, c * x_t - s * sd * TrigFlowView(self.student, sd)(x_t / sd, t, cond)

    def __call__(
        self,
        x0: torch.Tensor,
        pos,
        neg,
        step: int,
        generator: torch.Generator,
        guidance=None,
        student_cond=None,
        keep: list | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """(loss, logs); with LADD the student's x0 estimates are appended to ``keep`` for the
        heads' own update."""
        sd = self.sigma_d
        t, c, s, x_t = noised(
            x0, generator, self.p_mean, self.p_std, sd, self.t_max, self.start_share
        )
        with torch.no_grad():  # the teacher's velocity, guided: dx_t/dt = sigma_d F_teacher
            gd = guide(self.teacher, guidance if guidance is not None else self.guidance, pos, neg)
            gd.reset(RandomNoise(generator))
            view = TrigFlowView(self.teacher, sd)
            x_nat, tn = view.native(x_t, t)
            dxdt = sd * trig_output(gd(x_nat, tn), t, sd)
        F = TrigFlowView(self.student, sd)
        cond = pos if student_cond is None else student_cond
        if step < self.fit_steps:  # the student learns its time input on the teacher's outputs
            err = (F(x_t / sd, t, cond) - dxdt / sd).flatten(1).pow(2).mean(1)
            loss = err.mean()
            return loss, {"loss": float(loss.detach()), "fit": float(loss.detach())}
        with torch.no_grad():
            span = None
            if self.method == "secant":
                span = index_neighbours(self.teacher.schedule, t, sd, self.secant_steps)
            F_minus, dFdt = time_derivative(F, x_t / sd, t, dxdt / sd, cond, self.method, span=span)
        step = step - self.fit_steps  # the tangent warm-up starts after the fit
        r = min(1.0, step / self.warmup) if self.warmup else 1.0
        g = -c * c * (sd * F_minus - dxdt) - r * c * s * (x_t + sd * dFdt)
        gnorm = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.ndim - 1)))
        g = g / (gnorm + self.tangent_c)
        w = self.weight(t)
        d = x0[0].numel()
        F_theta = F(x_t / sd, t, cond)
        err = (F_theta - F_minus - g).flatten(1).pow(2).sum(1)
        if self.prior_weight:
            err = err / (sd * torch.tan(t)).to(err.dtype)
        loss = weighted(err, w, d)
        logs = {"loss": float(loss.detach()), "tangent_norm": float(gnorm.mean())}
        if self.ladd is not None:  # the student's x0, judged by the teacher's features
            if self.ladd_start_share:
                _, x0_hat = self.ladd_estimate(x0, cond, generator)
            else:  # at the sCM time t, from the pass above
                x0_hat = c * x_t - s * sd * F_theta
            adv = self.ladd.generator_loss(x0_hat, pos, generator)
            loss = loss + self.ladd_weight * adv
            logs["adv_g"] = float(adv.detach())
            if keep is not None:
                keep.append(x0_hat.detach())
        return loss, logs

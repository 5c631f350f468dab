"""The sampling loop, the Step record, the Sampler base and noise sources.

A sampler's ``step(denoise, x, st, state, noise)`` advances x from ``st.t`` to ``st.t_next`` and
returns the new x and its history. Every update is written as a data anchor plus a renoise term,
``x' = a' D + s' E``, with D built from x0 predictions and E from eps (plus fresh noise), never
re-deriving one from x. Histories come from ``init_state()`` at the start of each run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .pred import Pred
from .schedule import F64, Schedule, ode_scale
from .spacing import check_timesteps

Denoise = Callable[[torch.Tensor, torch.Tensor], Pred]
Noise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _levels(schedule: Schedule, ts: torch.Tensor) -> tuple[list, list, list]:
    """alpha, sigma and VE sigma at every t of ts, as float64 Python floats, in one pass."""
    return schedule.alpha(ts).tolist(), schedule.sigma(ts).tolist(), schedule.ve(ts).tolist()


def _lam(ve: float) -> float:
    return math.inf if ve == 0 else -math.log(ve)


@dataclass(frozen=True)
class IndexStride:
    """diffusers' DDIM and PNDM step rule: an update from training index t lands at t - r with r =
    T // n,
    whatever the grid's next point is (they differ on linspace and trailing grids), and below index
    0 at
    ``final`` (-1: clean data; 0: alpha_bar[0], as with set_alpha_to_one False). The next step still
    starts from the grid's next point: the sample is relabelled there, as those schedulers do."""

    r: int
    final: float = -1.0

    def land(self, t: float) -> float:
        return t - self.r if t - self.r >= 0 else self.final


@dataclass(frozen=True)
class Step:
    """One interval t -> t_next with its levels (float64 floats); lam = -log ve, h = lam' - lam.
    ``stride``: where the scheduler being reproduced lands an update instead (``landing``)."""

    i: int
    n: int
    t: torch.Tensor
    t_next: torch.Tensor
    schedule: Schedule
    a: float
    s: float
    ve: float
    a_next: float
    s_next: float
    ve_next: float
    stride: IndexStride | None = None

    @classmethod
    def make(
        cls, i: int, n: int, t, t_next, schedule: Schedule, stride: IndexStride | None = None
    ) -> "Step":
        t, t_next = torch.as_tensor(t, dtype=F64), torch.as_tensor(t_next, dtype=F64)
        (a, a1), (s, s1), (ve, ve1) = _levels(schedule, torch.stack([t, t_next]))
        return cls(i, n, t, t_next, schedule, a, s, ve, a1, s1, ve1, stride)

    @property
    def lam(self) -> float:
        return _lam(self.ve)

    @property
    def lam_next(self) -> float:
        return _lam(self.ve_next)

    @property
    def h(self) -> float:
        return self.lam_next - self.lam

    @property
    def last(self) -> bool:
        """True when this step lands on clean data (sigma = 0): only x0 matters there."""
        return self.s_next == 0.0

    def to_lam(self, lam_next: float) -> "Step":
        """This step ending at the half log-SNR ``lam_next`` instead (a substep's level)."""
        return self.to(t_next=self.schedule.t_of_lam(torch.tensor(lam_next, dtype=F64)))

    def to(self, t=None, t_next=None) -> "Step":
        """The same step position with other endpoints (churn, ancestral and singlestep
        substeps)."""
        return Step.make(
            self.i,
            self.n,
            self.t if t is None else t,
            self.t_next if t_next is None else t_next,
            self.schedule,
            self.stride,
        )

    def landing(self) -> "Step":
        """This step as the reproduced scheduler lands its update (``stride``), else itself."""
        return self if self.stride is None else self.to(t_next=self.stride.land(float(self.t)))

    def rising(self) -> "Step":
        """PNDM's pseudo improved-Euler correction, which steps to t_next from the level t_next + r
        (not from t) when a ``stride`` is set; else itself."""
        return self if self.stride is None else self.to(t=float(self.t_next) + self.stride.r)


class Sampler:
    """Base for samplers (frozen dataclasses whose fields are their options). ``capturable`` False:
    the step reads data back on the host or makes its noise there (no CUDA graph of its loop)."""

    capturable = True

    def init_state(self) -> Any:
        return ()

    def step(self, denoise: Denoise, x: torch.Tensor, st: Step, state: Any, noise: Noise):
        raise NotImplementedError


# -- shared pieces of the update rules ------------------------------------------------------------


def ancestral(st: Step, eta: float) -> tuple[float, float]:
    """(ve_down, ve_up) splitting ve_next into a deterministic and a fresh-noise part.

    ve_up = min(ve', eta ve' sqrt(1 - e^{-2h})): eta = 1 is DDPM's posterior (Ho et al. 2020), equal
    to DDIM's sigma_t(eta) (Song et al. 2021, eq. 16) and k-diffusion's get_ancestral_step.
    """
    if eta == 0 or st.last:
        return st.ve_next, 0.0
    up = min(st.ve_next, eta * st.ve_next * math.sqrt(-math.expm1(-2 * st.h)))
    return math.sqrt(max(st.ve_next**2 - up**2, 0.0)), up


def sde_factors(h: float, eta: float) -> tuple[float, float]:
    """(e^{-eta h}, sqrt(1 - e^{-2 eta h})): the part of the current eps a data-prediction SDE step
    of length h in lambda keeps, and the std of the fresh noise it adds, both in units of s'
    (Lu et al. 2022, SDE-DPM-Solver++; eta = 0 is the ODE: 1 and 0)."""
    if not eta:
        return 1.0, 0.0
    return math.exp(-eta * h), math.sqrt(-math.expm1(-2 * eta * h))


def data_sde_step(st: Step, x0, eps, eta: float, s_noise: float, z=None):
    """a' x0 + s' e^{-eta h} eps (+ s' sqrt(1 - e^{-2 eta h}) s_noise z): the first-order step of
    ``sde_factors``. The caller draws z or passes None, so whether a step uses the random stream
    stays its own rule."""
    keep, fresh = sde_factors(st.h, eta)
    out = st.a_next * x0 + (st.s_next * keep) * eps
    return out if z is None else out + (st.s_next * fresh * s_noise) * z


def straight(st: Step, nxt: bool = False) -> tuple[float, float, bool]:
    """(c, u, flow) at the step's start (or end) for the straight coordinates y = x / c with level
    u = s / c, where the probability-flow ODE is dy/du = d: c = a and u the VE level on VP schedules
    (EDM), c = a + s = 1 and u the flow time on flow schedules (``ode_space``)."""
    a, s = (st.a_next, st.s_next) if nxt else (st.a, st.s)
    c = ode_scale(st.schedule, a, s)
    flow = getattr(st.schedule, "ode_space", "ve") == "flow"
    return c, (s / c if c > 0 else math.inf), flow  # a = 0: zero terminal SNR, infinitely far


def straight_point(p: Pred, u: float, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, dy/du) at level u rebuilt from a prediction: y = (a/c) x0 + u eps with a/c = 1 - u on
    flows (1 on VP schedules), and the slope eps - x0 on flows (eps on VP schedules)."""
    if flow:
        return p.x0 * (1 - u) + u * p.eps, p.eps - p.x0
    return p.x0 + u * p.eps, p.eps


@dataclass(frozen=True)
class Ancestral(Sampler):
    """Options of samplers that inject fresh noise by ``ancestral``: eta (0 = deterministic)."""

    eta: float = 0.0
    s_noise: float = 1.0

    def __post_init__(self):
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")


@dataclass(frozen=True)
class Churn(Sampler):
    """EDM's stochastic churn options (Karras et al. 2022, Alg. 2), shared by Euler and Heun."""

    churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def churned(self, x: torch.Tensor, st: Step, noise: Noise) -> tuple[torch.Tensor, Step]:
        """Alg. 2 lines 4-6: raise the level to ve (1 + gamma) with fresh noise."""
        if self.churn <= 0 or not (self.s_tmin <= st.ve <= self.s_tmax) or st.s == 0:
            return x, st
        gamma = min(self.churn / st.n, math.sqrt(2) - 1)
        hat = st.to(t=st.schedule.t_of_ve(torch.tensor(st.ve * (1 + gamma), dtype=F64)))
        if hat.ve <= st.ve:  # already at the top of the schedule
            return x, st
        z = noise(x, st.t, hat.t)
        return (hat.a / st.a) * x + (
            hat.a * math.sqrt(hat.ve**2 - st.ve**2) * self.s_noise
        ) * z, hat


# -- noise sources --------------------------------------------------------------------------------


class RandomNoise:
    """Standard normal draws from one generator (or torch's global RNG): batch-dependent."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def randn(self, shape: Sequence[int], dtype=torch.float32, device=None) -> torch.Tensor:
        """The whole batch in one draw (diffusers' randn_tensor with a single generator)."""
        where = self.generator.device if self.generator is not None else (device or "cpu")
        return torch.randn(tuple(shape), generator=self.generator, dtype=dtype, device=where).to(
            device or where
        )

    def __call__(self, like: torch.Tensor, t=None, t_next=None) -> torch.Tensor:
        return self.randn(like.shape, like.dtype, like.device)


class SeededNoise:
    """One generator per sample (EDM's StackedRandomGenerator), so a sample's noise depends on its
    seed alone, not on the rest of its batch. Row i is drawn as torch.randn((1, ...)) from its own
    generator, the same stream diffusers' randn_tensor draws from a list of generators.
    """

    def __init__(
        self,
        seeds: Sequence[int] = (),
        device: str | torch.device = "cpu",
        generators: Sequence[torch.Generator] | None = None,
    ):
        """One generator per seed, or the caller's own per-sample ``generators``."""
        if generators is None:
            generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        if not generators:
            raise ValueError("SeededNoise needs at least one seed")
        self.generators = list(generators)

    def randn(self, shape: Sequence[int], dtype=torch.float32, device=None) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(
                f"noise for batch {shape[0]} requested from {len(self.generators)} seeds"
            )
        rows = [
            torch.randn((1, *shape[1:]), generator=g, dtype=dtype, device=g.device)
            for g in self.generators
        ]
        return torch.cat(rows).to(device or rows[0].device)

    def __call__(self, like: torch.Tensor, t=None, t_next=None) -> torch.Tensor:
        return self.randn(like.shape, like.dtype, like.device)


class BrownianTree:
    """A Brownian motion W on [lo, hi], one independent path per row, each a fixed function of its
    row's
    seed: W(q) comes from a bisection to depth ``depth`` whose midpoint values are Brownian-bridge
    draws
    seeded by (seed, depth, node), so W at a level does not depend on which other levels were asked
    for
    (any step count, any order: the property of torchsde's Brownian tree that k-diffusion's DPM++
    SDE relies on), then linear between the last two nodes. ``increment(a, b)`` is (W(b) - W(a)) /
    sqrt|b - a|,
    a standard normal for one interval and correlated across overlapping ones."""

    def __init__(
        self, seeds: Sequence[int], lo: float, hi: float, shape: Sequence[int], depth: int = 24
    ):
        if not 0 <= lo < hi < math.inf:
            raise ValueError(f"a Brownian tree needs 0 <= lo < hi < inf, got {lo}, {hi}")
        self.seeds, self.lo, self.hi, self.shape, self.depth = (
            [int(v) for v in seeds],
            lo,
            hi,
            tuple(shape),
            depth,
        )

    def _normal(self, seed: int, level: int, node: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((seed * 1_000_003 + level * 65_537 + node) % 2**63)
        return torch.randn(self.shape, generator=g, dtype=torch.float64)

    def _row(self, seed: int, q: float) -> torch.Tensor:
        a, b = self.lo, self.hi
        wa, wb = (
            torch.zeros(self.shape, dtype=torch.float64),
            math.sqrt(b - a) * self._normal(seed, 0, 0),
        )
        node = 0
        for level in range(1, self.depth + 1):
            m = 0.5 * (a + b)
            wm = 0.5 * (wa + wb) + math.sqrt((b - a) / 4) * self._normal(seed, level, node)
            if q < m:
                b, wb, node = m, wm, 2 * node
            else:
                a, wa, node = m, wm, 2 * node + 1
        return wa + (q - a) / (b - a) * (wb - wa)

    def __call__(self, q: float) -> torch.Tensor:
        q = min(max(float(q), self.lo), self.hi)
        return torch.stack([self._row(s, q) for s in self.seeds])

    def increment(self, a: float, b: float, wa: torch.Tensor | None = None) -> torch.Tensor:
        """(W(b) - W(a)) / sqrt|b - a|; ``wa``: W(a) when the caller has it already."""
        return (self(b) - (self(a) if wa is None else wa)) / math.sqrt(abs(b - a))


class RowsNoise:
    """Rows of a batch-wide noise source: each draw is the whole batch's, sliced, so a sub-batch
    sees exactly the noise its rows would get in the full run (one shared generator)."""

    def __init__(self, source, rows: Sequence[int], batch: int):
        self.source, self.rows, self.batch = source, list(rows), batch

    def randn(self, shape: Sequence[int], dtype=torch.float32, device=None) -> torch.Tensor:
        return self.source.randn((self.batch, *shape[1:]), dtype, device)[self.rows]

    def __call__(self, like: torch.Tensor, t=None, t_next=None) -> torch.Tensor:
        return self.randn(like.shape, like.dtype, like.device)


class NoiseFork:
    """A run's noise source as it stood before its first draw, to be replayed: ``source(rows)`` is a
    fresh copy for those rows, positioned after the run's initial draw of ``initial`` (its full
    batch shape; None when the run drew none), so a re-render of some images sees the noise the run
    will give them; ``seed(i)`` is an integer fixed by image i's own stream (seeds, a generator per
    image, or one shared generator), for further draws that must repeat with the run."""

    def __init__(self, noise, batch: int, seeds: Sequence[int] | None = None):
        self.batch, self.seeds, self.initial = batch, seeds, None
        gens = (
            noise.generators
            if isinstance(noise, SeededNoise)
            else [getattr(noise, "generator", None)]
        )
        if any(g is None for g in gens):
            raise ValueError("a replayable run needs seeds or generators")
        self.shared = not isinstance(noise, SeededNoise)
        self.states = [(g.device, g.get_state()) for g in gens]

    def _gen(self, k: int) -> torch.Generator:
        device, state = self.states[k]
        g = torch.Generator(device)
        g.set_state(state)
        return g

    def source(self, rows: Sequence[int]):
        rows = list(rows)
        src = (
            RowsNoise(RandomNoise(self._gen(0)), rows, self.batch)
            if self.shared
            else SeededNoise(generators=[self._gen(r) for r in rows])
        )
        if self.initial is not None:
            src.randn((len(rows), *self.initial[1:]))
        return src

    def seed(self, i: int) -> int:
        if self.seeds is not None:
            return int(self.seeds[i])
        if self.shared:
            return int(torch.randint(2**62, (self.batch,), generator=self._gen(0))[i])
        return int(torch.randint(2**62, (1,), generator=self._gen(i)))


def draw(noise, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` from a run's noise source (per-sample generators
    when its rows are one per seed), else from torch's global generator."""
    if noise is not None and hasattr(noise, "randn"):
        try:
            return noise.randn(like.shape, dtype=torch.float32, device=like.device).to(like.dtype)
        except ValueError:  # rows that are not one per seed (several branches batched together)
            pass
    return torch.randn(like.shape, device=like.device, dtype=like.dtype)


# -- the loop -------------------------------------------------------------------------------------


class NonFiniteError(ValueError):
    """A run produced NaN or infinite values: ``where`` ("sampling", "decoding"), the first bad
    ``step`` (0-based) of ``steps`` for sampling."""

    def __init__(
        self,
        message: str,
        where: str = "sampling",
        step: int | None = None,
        steps: int | None = None,
    ):
        super().__init__(message)
        self.where, self.step, self.steps = where, step, steps


FINITE_EVERY = (
    8  # steps between host reads of the non-finite flag (the flag itself is kept every step)
)


def sample(
    denoise: Denoise,
    sampler,
    ts,
    x: torch.Tensor,
    noise: Noise | None = None,
    callback: Callable[[Step, torch.Tensor], None] | None = None,
    grad: bool = False,
    check_finite: bool = True,
    stride: IndexStride | None = None,
) -> torch.Tensor:
    """Integrate from x at ts[0] down the grid ts; returns the sample at ts[-1].

    ``denoise`` is an ``(x, t) -> Pred`` callable with a ``.schedule`` (what ``guide`` returns).
    ``sampler`` is a Sampler or a registry spec such as ``"dpmpp_2m"``. Gradients are off unless
    ``grad=True``; guidance branches that need them turn them on for themselves.
    ``callback(st, x)`` runs after every step; a tensor it returns replaces x.
    ``check_finite``: raise ``NonFiniteError`` naming the first step whose x has a NaN or inf. The
    first bad step is tracked on x's device and read back every ``FINITE_EVERY`` steps and at the
    end, so a GPU run is not synchronised at every step.
    ``stride``: land each update where diffusers' DDIM or PNDM would (``IndexStride``); samplers
    that reproduce those schedulers (ddim, plms) read it.
    """
    ts, x, sampler = _checked(denoise, sampler, ts, x)
    return run_loop(
        denoise, sampler, ts, x, noise, callback, grad, "read" if check_finite else None, stride
    )[0]


def _checked(denoise, sampler, ts, x):
    from .registry import parse_spec  # deferred: samplers register on import

    schedule = getattr(denoise, "schedule", None)
    if not callable(denoise) or schedule is None:
        raise ValueError(
            "denoise must be an (x, t) -> Pred callable with a .schedule; wrap a "
            "denoiser with diffguide.guide(denoiser, guidance, cond)"
        )
    if isinstance(sampler, str):
        sampler = parse_spec("sampler", sampler)
    if not isinstance(sampler, Sampler):
        raise ValueError(
            f"sampler must be a Sampler or a spec string, got {type(sampler).__name__}"
        )
    ts = check_timesteps(schedule, ts)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError("x must be a floating-point tensor with a leading batch dimension")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # the sampler state stays in float32 whatever the network runs in
    return ts, x, sampler


def run_loop(
    denoise: Denoise,
    sampler: Sampler,
    ts: torch.Tensor,
    x: torch.Tensor,
    noise=None,
    callback=None,
    grad: bool = False,
    finite: str | None = "read",
    stride: IndexStride | None = None,
):
    """The loop of ``sample`` on checked arguments; returns (x, first_bad), first_bad a 0-dim
    tensor on
    x's device: the first step whose x is not finite (n when none). ``finite``: "read" reads it back
    every ``FINITE_EVERY`` steps and raises; "keep" only keeps it, so that the loop has no host read
    of device data (capturable in a CUDA graph: ``core.graphs``) and the caller reads it once at the
    end; None tracks nothing (first_bad None)."""
    noise = noise if noise is not None else RandomNoise()
    if hasattr(denoise, "reset"):
        denoise.reset(noise)
    state = sampler.init_state()
    begin = getattr(denoise, "begin_step", None)
    schedule = denoise.schedule
    n = ts.numel() - 1
    a, s, ve = _levels(schedule, ts)  # once per run, not twice per grid point
    first_bad = torch.full((), n, device=x.device) if finite else None
    with torch.set_grad_enabled(grad):
        for i in range(n):
            st = Step(
                i,
                n,
                ts[i],
                ts[i + 1],
                schedule,
                a[i],
                s[i],
                ve[i],
                a[i + 1],
                s[i + 1],
                ve[i + 1],
                stride,
            )
            if begin is not None and begin(st) and denoise.stitch.reset:
                state = sampler.init_state()  # T-Stitch with reset: no history across the switch
            x, state = sampler.step(denoise, x, st, state, noise)
            if first_bad is not None:
                first_bad = torch.where(
                    torch.isfinite(x.detach()).all() | (first_bad < n), first_bad, i
                )
                if finite == "read" and ((i + 1) % FINITE_EVERY == 0 or i == n - 1):
                    _raise_if_bad(int(first_bad), n, ts)
            if callback is not None:
                out = callback(st, x)
                if out is not None:  # a callback may replace x (diffusers' callback_on_step_end)
                    x = out
    return x, first_bad


def _raise_if_bad(first: int, n: int, ts) -> None:
    if first < n:
        raise NonFiniteError(
            f"sampling produced NaN or inf at step {first + 1} of {n} (t {float(ts[first]):.4g} "
            f"-> {float(ts[first + 1]):.4g})",
            "sampling",
            first,
            n,
        )

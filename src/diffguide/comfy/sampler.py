"""Any diffguide sampler as a ComfyUI KSAMPLER.

ComfyUI calls a sampler function as ``fn(model, x, sigmas, extra_args, callback, disable)`` with
``model(x, sigma * s_in, **extra_args)`` returning the denoised sample, in ComfyUI's coordinates
(``levels``). The function below maps the sigmas onto the model's diffguide schedule, runs
``core.sample`` there on a denoiser that calls ComfyUI's model and returns Pred(x0, eps), and maps
the result back. The noise is ComfyUI's own per-seed stream (its default_noise_sampler), so an
ancestral sampler draws what ComfyUI's of the same name draws. On a flow model whose noise has std
noise_scale (``levels.noise_scale``), diffguide samples x / noise_scale, whose noise has std 1:
each step is linear in x and the denoised sample, so a deterministic step is the same and every
fresh draw (ancestral, SDE, Brownian tree) is scaled by noise_scale as ComfyUI scales its own.
"""

from __future__ import annotations

import functools

import torch

from ..core.pred import Pred
from ..core.registry import parse_spec
from ..core.sample import Sampler, sample
from ..core.spacing import comfy_times
from . import levels


class ComfyDenoiser:
    """ComfyUI's model as diffguide's ``(x, t) -> Pred``, x in the schedule's coordinates divided
    by ``unit`` (the noise's std); at the grid's own times it passes the grid's sigmas unchanged.
    Keeps the last evaluation's denoised sample for ComfyUI's callback."""

    def __init__(self, model, schedule, extra_args: dict, ts, sigmas, unit: float = 1.0):
        self.model, self.schedule, self.extra_args, self.unit = model, schedule, extra_args, unit
        self.grid = dict(zip(ts.tolist(), sigmas.tolist()))
        self.denoised = None

    def __call__(self, x: torch.Tensor, t) -> Pred:
        a, s = self.schedule.at(t)[:2]
        sigma = self.grid.get(float(t))
        if sigma is None:  # a substep's level (Heun's, DPM++ 2S's, ...)
            sigma = levels.sigma_at(self.schedule, t)
        # as ComfyUI's samplers pass it: sigma * x.new_ones(batch), in x's dtype
        sigmas = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        to_comfy = self.unit / levels.scale_at(self.schedule, t)
        denoised = self.model(x * to_comfy, sigmas, **self.extra_args)
        self.denoised = denoised
        return Pred.from_x0(x, denoised.to(x.dtype) / self.unit, a, s)


class ComfyNoise:
    """ComfyUI's default noise sampler (one generator seeded from the run's seed, or torch's
    global one) as a diffguide noise source."""

    def __init__(self, x: torch.Tensor, seed):
        from comfy.k_diffusion.sampling import default_noise_sampler

        self.draw = default_noise_sampler(x, seed=seed)

    def __call__(self, like: torch.Tensor, t=None, t_next=None) -> torch.Tensor:
        return self.draw(None, None).to(like)


def _progress(callback, denoiser: ComfyDenoiser, sigmas):
    """diffguide's per-step callback as ComfyUI's: a dict of the step, its sigma, x after the step
    and the last denoised sample, both in ComfyUI's coordinates."""
    if callback is None:
        return None

    def report(st, x):
        if denoiser.denoised is None:  # no evaluation yet (dpm_fast solves its range at the end)
            return
        to_comfy = denoiser.unit / levels.scale_at(st.schedule, st.t_next)
        sigma = sigmas[st.i]
        info = {"x": x * to_comfy, "i": st.i, "sigma": sigma, "sigma_hat": sigma}
        callback({**info, "denoised": denoiser.denoised})

    return report


def run(sampler: Sampler, model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Sample with a diffguide sampler the way ComfyUI calls its own sampler functions."""
    extra_args = {} if extra_args is None else extra_args
    if len(sigmas) <= 1:
        return x
    model_sampling = model.inner_model.model_patcher.get_model_object("model_sampling")
    schedule = levels.model_schedule(model_sampling, top=levels.finite_top(sigmas))
    ts = comfy_times(schedule, sigmas)
    rising = (ts[1:] >= ts[:-1]).nonzero()
    if len(rising):
        i = int(rising[0])
        raise ValueError(
            f"diffguide samplers need strictly descending sigmas; sigma {i + 1} is "
            f"{float(sigmas[i]):.6g} and sigma {i + 2} is {float(sigmas[i + 1]):.6g}"
        )
    unit = levels.noise_scale(model_sampling)
    denoiser = ComfyDenoiser(model, schedule, extra_args, ts, sigmas, unit)
    noise = ComfyNoise(x, extra_args.get("seed"))
    start = x * (levels.scale_at(schedule, ts[0]) / unit)
    report = _progress(callback, denoiser, sigmas)
    out = sample(denoiser, sampler, ts, start, noise, callback=report)
    return out * (unit / levels.scale_at(schedule, ts[-1]))


def sampler_function(spec: str):
    """The sampler function ComfyUI's KSAMPLER wraps, for a diffguide sampler spec."""
    sampler = parse_spec("sampler", spec)
    fn = functools.partial(run, sampler)
    fn.__name__ = f"diffguide_{sampler.name}"  # ComfyUI logs a sampler function's name
    return fn


def ksampler(spec: str):
    """A ComfyUI SAMPLER (KSAMPLER) running the diffguide sampler ``spec``."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sampler_function(spec))

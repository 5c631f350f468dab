"""The sampling stage: a request's initial latents (noise, given latents, or an encoded image), its
noise optimised where asked, and the loop itself (eager, or replayed from a captured CUDA graph)."""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..core.guided import _rows, guide
from ..core.registry import to_spec
from ..core.sample import NoiseFork, NonFiniteError, sample
from ..core.stitch import Stitch


def initial(pipe, req, noise, fork=None) -> torch.Tensor:
    """x at the grid's first time: SDEdit's noised image (the posterior's draw first, as diffusers'
    img2img pipelines draw), diffusers' given latents scaled, or fresh noise."""
    fam, info, device = pipe.family, req.info, pipe.device
    shape = latent_shape(pipe, req)
    if req.init is not None:
        x0, std = fam.posterior(req.init.to(device))
        rows = list(req.image_rows)
        x0 = x0[rows] if std is None else x0[rows] + std[rows] * noise.randn(shape, device=device)
        a, s = (float(f(req.ts[0])) for f in (info.schedule.alpha, info.schedule.sigma))
        return a * x0 + s * noise.randn(shape, device=device)
    if req.latents is not None:  # diffusers' prepare_latents: the given noise, scaled; no draw yet
        return req.latents.to(device, torch.float32) * info.start_scale(req.ts)
    if fork is not None:
        fork.initial = shape
    return fam.draw(noise, shape, device) * info.start_scale(req.ts)


def latent_shape(pipe, req) -> tuple:
    fam = pipe.family
    cells = (req.height // fam.factor, req.width // fam.factor)
    if fam.video:
        return (req.batch, fam.channels, fam.latent_frames(req.frames), *cells)
    return (req.batch, fam.channels, *cells)


def guided_maker(pipe, req, conds):
    """make(rows=None): the run's guided denoiser on all rows or some (a noise optimiser's
    re-renders)."""
    main = pipe.denoiser_for(req.spacing, req.round_timesteps, req.info)
    models, stitch = dict(conds.models), None
    if req.stitch:
        stitch = Stitch(req.stitch.fraction, reset=req.stitch.reset)
    expert = pipe.family.expert()
    if expert is not None:  # Wan 2.2: the second expert below the boundary, with its guidance
        net, below = expert
        models["expert"] = dataclasses.replace(
            main, forward=functools.partial(pipe.family.forward, net=net), module=net
        )
        stitch = Stitch(0.0, "expert", below=below, guidance=req.expert_guidance)

    def guided(c):
        return guide(
            main,
            req.guidance,
            c["pos"],
            c["neg"],
            threshold=req.threshold,
            max_batch=req.max_batch,
            conds=c["extra"],
            models=models,
            stitch=stitch,
            cache=req.cache,
            parallel=req.parallel,
        )

    def make(rows=None):
        return guided(conds.tree if rows is None else _rows(conds.tree, rows))

    return guided, make


def fork_for(req, noise, seeds):
    """The run's noise as it stands before its first draw, for a noise optimiser to replay."""
    return NoiseFork(noise, req.batch, seeds) if req.noise_optimizer is not None else None


def optimise(pipe, req, x, fork, conds, make):
    """(x, report): the initial noise prepared by the request's noise optimiser, if any."""
    if req.noise_optimizer is None:
        return x, None
    texts = [p for p in req.prompts for _ in range(req.per_prompt)]
    return pipe._optimise_noise(
        req.noise_optimizer,
        x,
        fork,
        texts,
        conds.tree["pos"],
        make,
        req.sampler,
        req.ts,
        req.info,
        smalls=[req.stitch.small] if req.stitch is not None else [],
    )


def _each(pipe, req, bar):
    """The per-step callback: the progress bar, the caller's callback, diffusers'
    callback_on_step_end (which may replace the latents)."""

    def each(st, xt):
        bar.update(1)
        if req.callback is not None:
            req.callback(st, xt)
        if req.callback_on_step_end is not None:
            tm = torch.as_tensor(req.info.schedule.model_time(st.t)).to(torch.float32)
            got = req.callback_on_step_end(pipe, st.i, tm, {"latents": xt})
            if isinstance(got, dict) and got.get("latents") is not None:
                return got["latents"].to(xt.device, xt.dtype)
        return None

    return each


def graph_key(pipe, req, models) -> tuple:
    """What a captured loop bakes in besides its shapes: settings, and the networks' weights
    (id(net): the module this call runs; a compiled wrapper set on the pipe is another)."""
    from .pipeline import _weights_key

    st = req.stitch
    return (
        to_spec(req.guidance),
        None if req.cache is None else to_spec(req.cache),
        None if req.expert_guidance is None else to_spec(req.expert_guidance),
        repr(req.threshold),
        req.max_batch,
        (st.fraction, st.reset) if st else None,
        req.spacing,
        req.round_timesteps,
        req.height,
        req.width,
        tuple((k, _weights_key(m)) for k, m in models.items()),
        _weights_key(pipe.net_denoiser),
        id(pipe.family.net),
    )


def loop(pipe, req, conds, guided, make, x, noise) -> tuple[torch.Tensor, int, int, float | None]:
    """(x at the grid's end, NFE per image, forward passes, the share of the network's block
    evaluations that ran under a step cache or None): eagerly, or replayed from a capture."""
    from .pipeline import _bar

    bar = _bar(
        req.ts.numel() - 1,
        (pipe.progress if req.progress is None else req.progress) and not req.cuda_graph,
    )
    try:
        if req.cuda_graph:
            return *pipe.graphs.sample(
                graph_key(pipe, req, conds.models),
                guided,
                conds.tree,
                req.sampler,
                req.ts,
                x,
                noise,
                req.check_finite,
                req.stride,
            ), None
        denoise = make()
        x = sample(
            denoise,
            req.sampler,
            req.ts,
            x,
            noise,
            callback=_each(pipe, req, bar),
            check_finite=req.check_finite,
            stride=req.stride,
        )
        state = denoise.cache_state
        return x, denoise.nfe, denoise.forwards, None if state is None else state.computed
    except NonFiniteError as e:
        half = pipe.family.net.dtype == torch.float16
        raise NonFiniteError(
            f"{e} with guidance {to_spec(req.guidance)} and sampler {to_spec(req.sampler)}: the "
            f"guidance scale may be too large for this model (lower it)"
            + (
                ", or the network overflowed in float16 (run it in float32 or bfloat16: --dtype)"
                if half
                else ""
            ),
            e.where,
            e.step,
            e.steps,
        ) from None
    finally:
        bar.close()

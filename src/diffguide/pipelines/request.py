"""A call planned once: every argument checked and resolved into a frozen ``Request`` before any
work.

``GuidedPipeline.plan`` builds it (``plan``, below); ``GuidedPipeline.run`` reads it through the
stages
(conditions, sampling, output). The seed rule and the prompt normalisation live here once, for one
process and for a call shared between processes alike.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core.guided import Guidance, Point
from ..core.registry import parse_spec, to_spec
from ..core.sample import IndexStride, RandomNoise, Sampler, SeededNoise
from . import parallel_layout
from .schedulers import SchedulerInfo

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass(frozen=True, eq=False)
class Request:
    """Everything a run reads, resolved: prompts and negatives (one per prompt), the guidance and
    sampler
    objects, the size, the schedule at that size and its grid (cut for image-to-image), the noise
    rule's
    inputs, and the run's options. Made by ``plan``; ``for_seeds`` re-aims it at another batch."""

    prompts: tuple
    negatives: tuple
    per_prompt: int
    guidance: Guidance
    sampler: Sampler
    steps: int
    spacing: str | None
    height: int
    width: int
    info: SchedulerInfo
    ts: torch.Tensor
    stride: IndexStride | None
    needed: frozenset
    seeds: tuple | None = None  # one per image, or None with generators / a random seed
    generator: Any = None  # diffusers' generator(s)
    embedded: float | None = None  # the model's own guidance input
    text_extra: dict = field(default_factory=dict)  # prompt_embeds, clip_skip, lora_scale...
    attention: dict | None = None  # cross_attention_kwargs
    init: torch.Tensor | None = None  # image-to-image input in [-1, 1]
    image_rows: tuple | None = None  # which init image each output starts from
    strength: float | None = None
    latents: torch.Tensor | None = None
    threshold: Any = None
    stitch: Any = None
    guide_model: Any = None
    noise_optimizer: Any = None
    output_type: str = "pil"
    callback: Callable | None = None
    callback_on_step_end: Callable | None = None
    progress: bool | None = None
    max_batch: int | None = None
    check_finite: bool = True
    round_timesteps: bool | None = None
    cuda_graph: bool = False
    return_dict: bool = True
    sampler_given: bool = True  # False: the model's own (its scheduler's fallback notice applies)
    cache: Any = None  # a step cache (cache registry), or None
    frames: int = 1  # a video model's frames per clip
    expert_guidance: Any = None  # a two-expert model's guidance on its second expert's steps
    frame: Any = None  # image to video: (the first frame in [-1, 1] [1, 3, H, W], as given)
    # each forward's rows shared by a torch.distributed group (a BranchParallel), or None; a
    # sequence layout (pipelines.parallel_layout) has made the transformer context-parallel
    parallel: Any = None

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.per_prompt

    @property
    def has_embeds(self) -> bool:
        return "prompt_embeds" in self.text_extra

    def for_seeds(self, seeds) -> "Request":
        """The same request for one prompt's batch of ``seeds`` (the command line's batches)."""
        if len(self.prompts) != 1 or self.generator is not None:
            raise ValueError("for_seeds re-aims a one-prompt request made with seeds")
        seeds = tuple(int(s) for s in seeds)
        rows = None if self.init is None else tuple(image_rows(self.init.shape[0], 1, len(seeds)))
        return dataclasses.replace(self, per_prompt=len(seeds), seeds=seeds, image_rows=rows)


def normalise_prompts(prompt, negative_prompt) -> tuple[list, list]:
    """(prompts, negatives), one negative per prompt: the one rule for every call."""
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
    if not prompts:
        raise ValueError("prompt list is empty")
    negs = (
        list(negative_prompt)
        if isinstance(negative_prompt, (list, tuple))
        else [negative_prompt] * len(prompts)
    )
    if len(negs) != len(prompts):
        raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
    return prompts, negs


def image_seeds(b: int, seed) -> list[int]:
    """The seed of each of a call's b images: a list as given, else image i gets seed + i."""
    if isinstance(seed, (list, tuple, range)):
        seeds = [int(v) for v in seed]
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for a batch of {b} images")
        return seeds
    return [int(seed) + i for i in range(b)]


def check_generators(b: int, seed, generator) -> None:
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if isinstance(generator, (list, tuple)) and len(generator) != b:
        raise ValueError(f"{len(generator)} generators for a batch of {b}")


def noise_source(req: Request):
    """(the run's noise source, its per-image seeds or None): one generator per image from the seeds
    (or the caller's per-image generators), or the caller's single generator."""
    if req.generator is not None:
        if isinstance(req.generator, (list, tuple)):
            return SeededNoise(generators=req.generator), None
        return RandomNoise(req.generator), None
    seeds = (
        list(req.seeds)
        if req.seeds is not None
        else image_seeds(req.batch, random.randrange(2**31))
    )
    return SeededNoise(seeds, device="cpu"), seeds


def image_rows(k: int, prompts: int, n: int) -> list[int]:
    """Which of k init images each of prompts x n outputs starts from."""
    if k == 1:
        return [0] * (prompts * n)
    if k == prompts:
        return [i for i in range(k) for _ in range(n)]
    if k == prompts * n:
        return list(range(k))
    raise ValueError(
        f"{k} images for {prompts} prompt(s) x {n} image(s) each; give 1, {prompts} or "
        f"{prompts * n}"
    )


def needed_conditions(g: Guidance, ts, info) -> frozenset:
    """The conditions the method's branches ask for anywhere on the grid (from a fresh state): a
    negative nobody reads need not be encoded, and an unconditional model can run no method that
    compares with one."""
    state, out, n = g.init_state(), set(), ts.numel() - 1
    for i, t in enumerate(ts[:-1]):
        out |= {br.cond for br in g.branches(Point(t, info.schedule, i, n), state).values()}
    return frozenset(out)


def _text_extra(
    pipe, prompt_embeds, negative_prompt_embeds, pooled, negative_pooled, clip_skip, attention
) -> dict:
    """diffusers' encode_prompt arguments a call passes through."""
    extra = {
        k: v
        for k, v in dict(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled,
            clip_skip=clip_skip,
        ).items()
        if v is not None
    }
    if attention is not None:
        if not isinstance(pipe.family.net, torch.nn.Module) or pipe.family.name not in (
            "sd",
            "sdxl",
        ):
            raise ValueError(
                "cross_attention_kwargs applies to UNet models, not "
                f"{type(pipe.family.net).__name__}"
            )
        from diffusers.utils import USE_PEFT_BACKEND

        if attention.get("scale") is not None and USE_PEFT_BACKEND:  # LoRA needs peft
            extra["lora_scale"] = attention["scale"]
    return extra


def _check_options(output_type, num_images_per_prompt, tensor_inputs) -> None:
    if set(tensor_inputs) - {"latents"}:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs may name only 'latents', got {list(tensor_inputs)}"
        )
    if output_type not in OUTPUT_TYPES:
        raise ValueError(
            f"unknown output_type {output_type!r}; choose one of: {', '.join(OUTPUT_TYPES)}"
        )
    if (
        isinstance(num_images_per_prompt, bool)
        or not isinstance(num_images_per_prompt, int)
        or num_images_per_prompt < 1
    ):
        raise ValueError(
            f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}"
        )


def _resolve(pipe, guidance, guidance_scale, sampler, negative, info, steps, spacing):
    """The guidance and sampler objects; a CFG++ scale error quotes the run's own grid."""
    try:
        return pipe.resolve(guidance, guidance_scale, sampler, negative=negative)
    except ValueError as e:
        if "CFG++ scale is lambda" not in str(e):
            raise
        from ..guidance.cfgpp import equivalence

        ve = info.schedule.ve(info.timesteps(steps, spacing)).tolist()
        raise ValueError(
            f"{str(e).split(';')[0]}; on this run's grid ({steps} steps) {equivalence(ve)}"
        ) from None


def _companions(pipe, stitch, guide_model, embeds: bool):
    """T-Stitch's small model and AutoGuidance's guide, checked against this model."""
    from .pipeline import GuidedPipeline, Stitching, check_companion

    if stitch is not None:
        if not isinstance(stitch, Stitching):
            raise ValueError(f"stitch must be a Stitching, got {type(stitch).__name__}")
        if embeds:
            raise ValueError(
                "stitch encodes the prompt with the small model's own encoder: give prompt, not "
                "prompt_embeds"
            )
        stitch.check(pipe)
    if guide_model is not None:
        if isinstance(guide_model, str):
            guide_model = GuidedPipeline.from_pretrained(
                guide_model, torch_dtype=pipe.family.net.dtype, device=pipe.device, progress=False
            )
        if not isinstance(guide_model, GuidedPipeline):
            raise ValueError(
                "guide_model must be a GuidedPipeline, folder or hub id, got "
                f"{type(guide_model).__name__}"
            )
        if embeds:
            raise ValueError(
                "guide_model encodes the prompt with its own encoder: give prompt, not "
                "prompt_embeds"
            )
        check_companion(pipe, guide_model, "guide with this model")
    return stitch, guide_model


def _noise_optimizer(spec, embeds: bool):
    if spec is None:
        return None
    if embeds:
        raise ValueError("noise optimisers read the prompt's words: give prompt, not prompt_embeds")
    opt = parse_spec("noise", spec) if isinstance(spec, str) else spec
    if not hasattr(opt, "optimise"):
        raise ValueError(
            "noise_optimizer must be a spec string or a diffguide.noise optimiser, got "
            f"{type(opt).__name__}"
        )
    return opt


def _image(pipe, image, strength, latents, noise_optimizer, height, width):
    """(the init image or None, height, width): image-to-image's input, checked against the rest."""
    if image is None:
        if strength is not None:
            raise ValueError("strength applies to image-to-image: give image= too")
        return None, height, width
    if latents is not None or noise_optimizer is not None:
        raise ValueError(
            "image-to-image starts from the image: give image or "
            + ("latents" if latents is not None else "noise_optimizer")
            + ", not both"
        )
    return pipe.prepare_image(image, height, width)


def plan(
    pipe,
    prompt="",
    negative_prompt=None,
    guidance=None,
    guidance_scale=None,
    sampler=None,
    steps=None,
    spacing=None,
    height=None,
    width=None,
    num_images_per_prompt=1,
    seed=None,
    generator=None,
    output_type="pil",
    callback=None,
    progress=None,
    max_batch=None,
    threshold="scheduler",
    stitch=None,
    noise_optimizer=None,
    check_finite=True,
    round_timesteps=None,
    *,
    num_inference_steps=None,
    latents=None,
    prompt_embeds=None,
    negative_prompt_embeds=None,
    pooled_prompt_embeds=None,
    negative_pooled_prompt_embeds=None,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=("latents",),
    eta=None,
    guidance_rescale=0.0,
    cross_attention_kwargs=None,
    clip_skip=None,
    return_dict=True,
    embedded_guidance=None,
    image=None,
    strength=None,
    guide_model=None,
    cuda_graph=False,
    cache=None,
    num_frames=None,
    guidance_2=None,
    guidance_scale_2=None,
    parallel=None,
) -> Request:
    """Check and resolve a call's arguments (those of ``GuidedPipeline.__call__``) into a
    Request."""
    if num_inference_steps is not None:
        if steps is not None and steps != num_inference_steps:
            raise ValueError(
                f"steps={steps} and num_inference_steps={num_inference_steps} disagree; give one"
            )
        steps = num_inference_steps
    extra = _text_extra(
        pipe,
        prompt_embeds,
        negative_prompt_embeds,
        pooled_prompt_embeds,
        negative_pooled_prompt_embeds,
        clip_skip,
        cross_attention_kwargs,
    )
    if prompt_embeds is not None:
        if prompt not in (None, "") and not (isinstance(prompt, (list, tuple)) and not prompt):
            raise ValueError("give prompt or prompt_embeds, not both")
        prompt = [None] * int(prompt_embeds.shape[0])
    _check_options(output_type, num_images_per_prompt, callback_on_step_end_tensor_inputs)
    steps = pipe.default_steps if steps is None else steps
    spacing = (
        pipe.defaults.get("spacing") if spacing is None else spacing
    )  # an sCM student's own grid
    if embedded_guidance is not None and pipe.embedded_guidance is None:
        raise ValueError(
            f"embedded_guidance given but {type(pipe.family.net).__name__} has no embedded "
            f"guidance input; guide it with guidance= and guidance_scale="
        )
    embedded = pipe.embedded_guidance if embedded_guidance is None else float(embedded_guidance)
    opt = _noise_optimizer(noise_optimizer, prompt_embeds is not None)
    frame = None
    if image is not None and pipe.family.video and not pipe.family.first_frame:
        raise ValueError(
            f"{type(pipe.pipe).__name__} makes clips from text alone; image= (--init-image) is "
            "for image-to-video models (WanImageToVideoPipeline)"
        )
    if pipe.family.first_frame:  # image to video: the image is the clip's first frame
        frame, height, width = _first_frame(pipe, image, strength, height, width)
        image = None
    init, height, width = _image(pipe, image, strength, latents, opt, height, width)
    h, w = pipe.size(height, width)
    info = pipe.info.at_size(pipe.family.seq_len(h, w))
    negative = negative_prompt is not None and any(
        q is not None
        for q in (
            negative_prompt if isinstance(negative_prompt, (list, tuple)) else [negative_prompt]
        )
    )
    g, s = _resolve(
        pipe,
        guidance,
        guidance_scale,
        sampler,
        negative or negative_prompt_embeds is not None,
        info,
        steps,
        spacing,
    )
    g, s = pipe._diffusers_options(g, s, eta, guidance_rescale)
    g2 = _expert_guidance(pipe, guidance, guidance_scale, guidance_2, guidance_scale_2, stitch)
    cache = _cache(pipe, cache)
    frames = _frames(pipe, num_frames)
    if cuda_graph:
        pipe._check_graph(g, callback, callback_on_step_end)
        if cache is not None and not cache.capturable:
            raise ValueError(
                f"cache {to_spec(cache)!r} decides on the fly (it reads the network's work back "
                "on the host); it cannot run in a captured loop (cuda_graph=False)"
            )
    ts = info.timesteps(steps, spacing)
    stride = info.stride(
        steps, s, spacing
    )  # DDIM's and PNDM's landing rule, with their own sampler
    if init is not None:
        ts = ts[pipe.steps_skipped(ts.numel() - 1, strength) :]
    needed = needed_conditions(g, ts, info)
    if not pipe.family.conditional and needed - {"pos"}:
        raise ValueError(
            f"guidance {to_spec(g)!r} compares a prompt with a negative, but "
            f"{type(pipe.family.net).__name__} is unconditional; use guidance 'none' (--guidance "
            "none)"
        )
    prompts, negs = normalise_prompts(prompt, negative_prompt)
    b = len(prompts) * num_images_per_prompt
    fam = pipe.family
    shape = (b, fam.channels, h // fam.factor, w // fam.factor)
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
    rows = None if init is None else image_rows(init.shape[0], len(prompts), num_images_per_prompt)
    stitch, guide_model = _companions(pipe, stitch, guide_model, prompt_embeds is not None)
    check_generators(b, seed, generator)
    seeds = None if seed is None or generator is not None else tuple(image_seeds(b, seed))
    if isinstance(threshold, str):
        if threshold != "scheduler":
            raise ValueError(
                f"threshold must be 'scheduler', None or a threshold object, got {threshold!r}"
            )
        threshold = info.threshold
    # last, once the call is known good: a sequence layout readies the transformer (once)
    parallel = parallel_layout.resolve(pipe, parallel, (g, g2), ts, info, cache, cuda_graph, opt)
    return Request(
        tuple(prompts),
        tuple(negs),
        num_images_per_prompt,
        g,
        s,
        steps,
        spacing,
        h,
        w,
        info,
        ts,
        stride,
        needed,
        seeds,
        generator,
        embedded,
        extra,
        cross_attention_kwargs,
        init,
        None if rows is None else tuple(rows),
        strength,
        latents,
        threshold,
        stitch,
        guide_model,
        opt,
        output_type,
        callback,
        callback_on_step_end,
        progress,
        max_batch,
        check_finite,
        round_timesteps,
        cuda_graph,
        return_dict,
        sampler is not None,
        cache,
        frames,
        g2,
        frame,
        parallel,
    )


def _cache(pipe, cache):
    """A step cache from a spec or object, checked against the network; None stays None."""
    from ..cache import Cache

    if cache is None:
        return None
    if isinstance(cache, str):
        cache = parse_spec("cache", cache)
    if not isinstance(cache, Cache):
        raise ValueError(
            f"cache must be a spec such as 'first_block:threshold=0.1' or a diffguide cache, "
            f"got {type(cache).__name__}"
        )
    cache.check(pipe.net_denoiser)
    return cache


def _frames(pipe, frames) -> int:
    """A video model's frame count (its pipeline's default when None); image models take none."""
    fam = pipe.family
    if not fam.video:
        if frames not in (None, 1):
            raise ValueError(
                f"num_frames is for video models; {type(fam.net).__name__} makes images"
            )
        return 1
    frames = fam.default_frames if frames is None else frames
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {frames!r}")
    return fam.frames(frames)


def _expert_guidance(pipe, guidance, scale, guidance_2, scale_2, stitch):
    """A two-expert model's guidance on its second expert's steps (Wan 2.2): ``guidance_2`` (else
    the run's method) at ``guidance_scale_2`` (else the run's scale), as WanPipeline defaults
    guidance_scale_2 to guidance_scale; None for a one-network model, which refuses both."""
    if pipe.family.expert() is None:
        if guidance_2 is not None or scale_2 is not None:
            raise ValueError(
                f"guidance_2 and guidance_scale_2 are for two-expert models (Wan 2.2); "
                f"{type(pipe.family.net).__name__} has one network"
            )
        return None
    if stitch is not None:
        raise ValueError("stitch cannot run on a two-expert model: its experts already switch")
    g2, _ = pipe.resolve(
        guidance if guidance_2 is None else guidance_2,
        scale if scale_2 is None else scale_2,
        None,
        negative=True,
    )
    return g2


def _first_frame(pipe, image, strength, height, width):
    """((the first frame prepared, as given), height, width) for an image-to-video model."""
    if image is None:
        raise ValueError(
            f"{type(pipe.pipe).__name__} makes a clip from its first frame: give image= "
            "(--init-image on the command line)"
        )
    if strength is not None:
        raise ValueError("strength is image-to-image's; an image-to-video model takes none")
    if isinstance(image, (list, tuple)) and len(image) != 1:
        raise ValueError(f"give one first frame for the clips, got {len(image)}")
    raw = image[0] if isinstance(image, (list, tuple)) else image
    h, w = pipe.family.default_hw
    prepared, height, width = pipe.prepare_image(raw, height or h, width or w)
    return (prepared, raw), height, width

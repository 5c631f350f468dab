"""The output stage: latents decoded (never a silent NaN image), the safety checker where the model
has one, the images in the asked type, and what the call cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.sample import NonFiniteError


@dataclass
class GuidedOutput:
    """Images and what they cost: NFE per image, forward passes, seconds per phase."""

    images: Any
    nfe: int
    forwards: int
    timings: dict = field(default_factory=dict)
    seeds: list | None = None
    nsfw: list | None = None
    noise: dict | None = None  # a noise optimiser's report: extra NFE and backward passes per image
    indices: list | None = None  # with process_state: which of the call's images this process made
    notices: list = field(default_factory=list)  # e.g. a prompt longer than the text encoder reads
    # under a step cache: the share of the main network's block evaluations that ran (1.0: none
    # reused; the unit is one block for one row); None without a cache
    computed: float | None = None


def decode(pipe, req, x) -> tuple[Any, list | None]:
    """(images in req.output_type, the safety checker's flags or None)."""
    if req.output_type == "latent":
        return x, None
    decoded = pipe.family.decode(x)
    if req.check_finite and not bool(torch.isfinite(decoded).all()):
        vae = getattr(pipe.pipe, "vae", None)
        raise NonFiniteError(
            "decoding produced NaN pixels from finite latents"
            + (
                f": the VAE overflowed in {str(vae.dtype).replace('torch.', '')}; decode in "
                f"float32 (--vae-dtype float32, vae_dtype=torch.float32)"
                if vae is not None
                else ""
            ),
            "decoding",
        )
    if pipe.family.video:
        return video_output(decoded, req.output_type), None
    images, nsfw = safety(pipe, decoded, pipe.device)
    if req.output_type != "pt":
        images = images.cpu().permute(0, 2, 3, 1).numpy()
        if req.output_type == "pil":
            images = to_pil(images)
    return images, nsfw


def video_output(video: torch.Tensor, output_type: str):
    """Decoded clips [B, 3, F, H, W] in [0, 1] as diffusers' VideoProcessor gives them: "pt"
    [B, F, 3, H, W], "np" [B, F, H, W, 3], "pil" a list of frame lists."""
    frames = video.permute(0, 2, 1, 3, 4)
    if output_type == "pt":
        return frames
    arr = frames.permute(0, 1, 3, 4, 2).cpu().numpy()
    return arr if output_type == "np" else [to_pil(clip) for clip in arr]


def safety(pipe, images, device):
    """The pipeline's safety checker where it has one: flagged images come back black, as in
    diffusers. Its run_safety_checker takes decoder output in [-1, 1]."""
    checker = getattr(pipe.pipe, "safety_checker", None)
    if checker is None or not hasattr(pipe.pipe, "run_safety_checker"):
        return images, None
    _, flags = pipe.pipe.run_safety_checker(images * 2 - 1, device, pipe.family.net.dtype)
    flags = [bool(f) for f in flags]
    if any(flags):
        images = images.clone()
        images[torch.tensor(flags, device=images.device)] = 0.0
    return images, flags


def to_pil(images: np.ndarray) -> list:
    """[B, H, W, C] floats in [0, 1] to PIL images, rounded as diffusers' numpy_to_pil does."""
    from PIL import Image

    arr = (images * 255).round().astype("uint8")
    return [
        Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a)
        for a in arr
    ]


def notices(pipe, req, truncated: str | None, graph_notices: list) -> list[str]:
    """Everything the call has to say: a prompt cut short, a loop run eagerly, the scheduler's step
    rule without a diffguide sampler (when the sampler is the model's own), config keys not
    reproduced."""
    fallback = (
        pipe.info.notice
        if pipe.info.notice and not req.sampler_given and "sampler" not in pipe.defaults
        else None
    )
    return [text for text in (truncated, *graph_notices, fallback, pipe.info.config_notice) if text]


def result(req, images, nsfw, nfe, forwards, timings, seeds, report, said) -> Any:
    if isinstance(images, torch.Tensor):
        images = images.clone()  # a normal tensor, usable with autograd and in-place ops
    if not req.return_dict:
        return images, nsfw
    return GuidedOutput(images, nfe, forwards, timings, seeds, nsfw, report, notices=said)

"""Model families: how to condition, call and decode each kind of diffusers network.

A family turns prompts into condition dicts (text encoders run through the diffusers pipeline's own
``encode_prompt``, so tokenisation and padding are diffusers'), calls the network as
``forward(x, model_time, cond)`` for ``NetDenoiser``, and decodes latents to images in [0, 1].
One module per model line; ``family_of`` picks the recipe from the pipeline's networks.
"""

from __future__ import annotations

from .cogvideox import CogVideoX
from .base import ENCODE_LOCK, UPCAST_LOCK, Family, TransformerFamily, guidance_embedding
from .dit import DiT, PixArt
from .flux import Flux, pack2, unpack2
from .qwenimage import QwenImage
from .sana import Sana, SanaSprint
from .sd import StableDiffusion, StableDiffusionXL, clip_window_states, clip_windows
from .sd3 import StableDiffusion3
from .unconditional import Unconditional
from .wan import Wan, WanImageToVideo

__all__ = [
    "CogVideoX",
    "ENCODE_LOCK",
    "UPCAST_LOCK",
    "DiT",
    "Family",
    "Flux",
    "PixArt",
    "QwenImage",
    "Sana",
    "SanaSprint",
    "StableDiffusion",
    "StableDiffusion3",
    "StableDiffusionXL",
    "TransformerFamily",
    "Unconditional",
    "Wan",
    "WanImageToVideo",
    "clip_window_states",
    "clip_windows",
    "family_of",
    "guidance_embedding",
    "pack2",
    "unpack2",
]


def family_of(pipe) -> Family:
    """Pick the recipe from the pipeline's networks."""
    tr = getattr(pipe, "transformer", None)
    if tr is not None:
        cls = type(tr).__name__
        table = {
            "DiTTransformer2DModel": DiT,
            "PixArtTransformer2DModel": PixArt,
            "SD3Transformer2DModel": StableDiffusion3,
            "FluxTransformer2DModel": Flux,
            "QwenImageTransformer2DModel": QwenImage,
            "SanaTransformer2DModel": Sana,
            "WanTransformer3DModel": Wan,
            "CogVideoXTransformer3DModel": CogVideoX,
        }
        if cls == "WanTransformer3DModel" and type(pipe).__name__ == "WanImageToVideoPipeline":
            return WanImageToVideo(pipe)
        if cls == "SanaTransformer2DModel" and type(pipe.scheduler).__name__ == "SCMScheduler":
            return SanaSprint(pipe)
        if cls in table:
            return table[cls](pipe)
        raise ValueError(f"unsupported transformer {cls}; supported: {', '.join(table)}")
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    cls = type(unet).__name__
    if cls == "UNet2DModel":
        return Unconditional(pipe)
    if cls != "UNet2DConditionModel":
        raise ValueError(f"unsupported unet {cls}; supported: UNet2DConditionModel, UNet2DModel")
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return StableDiffusionXL(pipe)
    return StableDiffusion(pipe)

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


# the transformers diffguide runs and the families on each: the pipeline's class picks among them
# (Sana's two by the scheduler)
TRANSFORMERS = {
    "DiTTransformer2DModel": (DiT,),
    "PixArtTransformer2DModel": (PixArt,),
    "SD3Transformer2DModel": (StableDiffusion3,),
    "FluxTransformer2DModel": (Flux,),
    "QwenImageTransformer2DModel": (QwenImage,),
    "SanaTransformer2DModel": (Sana, SanaSprint),
    "WanTransformer3DModel": (Wan, WanImageToVideo),
    "CogVideoXTransformer3DModel": (CogVideoX,),
}


def _served(pipe, net: str, families: tuple) -> list:
    """The families that serve the pipeline's class or one it derives from (a family listing no
    pipelines serves any); none: refused in one line."""
    names = {c.__name__ for c in type(pipe).__mro__}
    found = [f for f in families if not f.pipelines or names & set(f.pipelines)]
    if not found:
        served = [p for f in families for p in f.pipelines]
        raise ValueError(
            f"{type(pipe).__name__} is not supported on {net}; supported: {', '.join(served)}"
        )
    return found


def family_of(pipe) -> Family:
    """Pick the recipe from the pipeline's networks and class."""
    tr = getattr(pipe, "transformer", None)
    if tr is not None:
        cls = type(tr).__name__
        if cls not in TRANSFORMERS:
            raise ValueError(f"unsupported transformer {cls}; supported: {', '.join(TRANSFORMERS)}")
        found = _served(pipe, cls, TRANSFORMERS[cls])
        if cls == "SanaTransformer2DModel":  # an sCM student keeps its SanaPipeline
            sprint = type(pipe.scheduler).__name__ == "SCMScheduler"
            return (SanaSprint if sprint else Sana)(pipe)
        return found[0](pipe)
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    cls = type(unet).__name__
    if cls == "UNet2DModel":
        family = Unconditional
    elif cls != "UNet2DConditionModel":
        raise ValueError(f"unsupported unet {cls}; supported: UNet2DConditionModel, UNet2DModel")
    elif getattr(unet.config, "addition_embed_type", None) == "text_time":
        family = StableDiffusionXL
    else:
        family = StableDiffusion
    return _served(pipe, cls, (family,))[0](pipe)

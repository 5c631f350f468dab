"""The node classes ComfyUI loads (its classic node interface: INPUT_TYPES, RETURN_TYPES,
FUNCTION), for SamplerCustomAdvanced's GUIDER, SAMPLER and SIGMAS inputs. Importing this module
needs no ComfyUI; running a node does."""

from __future__ import annotations

from ..core.registry import parse_spec
from ..core.spacing import SPACINGS
from .guider import checked_guidance, make_guider
from .sampler import ksampler
from .sigmas import grid_sigmas

CATEGORY = "sampling/custom_sampling/diffguide"


def _valid(check, spec: str | None):
    """True when ``check(spec)`` passes, else its message (ComfyUI shows it on the node). None is
    a widget turned into a linked input, whose value ComfyUI validates only at run time: the node
    checks it then."""
    if spec is None:
        return True
    try:
        check(spec)
    except ValueError as e:
        return str(e)
    return True


class DiffguideGuider:
    """Guides with a diffguide guidance spec (e.g. cfg:scale=5, apg:scale=7, cfg_zero_star:scale=4,
    composed with +)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        spec = {"default": "cfg:scale=5", "tooltip": "diffguide guidance spec (diffguide list)"}
        return {
            "required": {
                "model": ("MODEL",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "guidance": ("STRING", spec),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, guidance):
        return _valid(checked_guidance, guidance)

    def get_guider(self, model, positive, negative, guidance):
        return (make_guider(model, positive, negative, guidance),)


class DiffguideSampler:
    """Samples with a diffguide sampler spec (e.g. dpmpp_2m, euler_ancestral:eta=1,
    res_multistep)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        spec = {"default": "dpmpp_2m", "tooltip": "diffguide sampler spec (diffguide list)"}
        return {"required": {"sampler": ("STRING", spec)}}

    @classmethod
    def VALIDATE_INPUTS(cls, sampler):
        return _valid(lambda s: parse_spec("sampler", s), sampler)

    def get_sampler(self, sampler):
        return (ksampler(sampler),)


class DiffguideSigmas:
    """diffguide's time grid (karras, exponential, simple, ays, gits, ...) for a model."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        options = {"default": "", "tooltip": "spacing options, e.g. rho=7 (diffguide list)"}
        return {
            "required": {
                "model": ("MODEL",),
                "spacing": (list(SPACINGS), {"default": "karras"}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "options": ("STRING", options),
            }
        }

    def get_sigmas(self, model, spacing, steps, denoise, options):
        ms = model.get_model_object("model_sampling")
        return (grid_sigmas(ms, spacing, steps, denoise, options),)


NODE_CLASS_MAPPINGS = {
    "DiffguideGuider": DiffguideGuider,
    "DiffguideSampler": DiffguideSampler,
    "DiffguideSigmas": DiffguideSigmas,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffguideGuider": "Guider (diffguide)",
    "DiffguideSampler": "Sampler (diffguide)",
    "DiffguideSigmas": "Sigmas (diffguide)",
}

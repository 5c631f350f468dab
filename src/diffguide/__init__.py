"""diffguide: guidance methods and samplers for diffusion models, any guidance on any sampler."""

from . import _threads  # noqa: F401  (first: the command's OMP_WAIT_POLICY, before torch loads)
from . import (  # noqa: F401  (register the built-ins)
    cache as _cache,
    guidance as _guidance,
    noise as _noise,
    samplers as _samplers,
)
from .core import (
    Branch,
    BranchParallel,
    Clip,
    Denoiser,
    DynamicThreshold,
    FlowSchedule,
    Guidance,
    GuidedDenoiser,
    NetDenoiser,
    NonFiniteError,
    Point,
    Pred,
    RandomNoise,
    Sampler,
    Schedule,
    SeededNoise,
    Step,
    Stitch,
    VPSchedule,
    guide,
    parse_spec,
    register,
    sample,
    timesteps,
    to_spec,
)
from .core import registry as _registry
from .guidance import CFG
from .toy import GaussianMixture

__version__ = "0.1.0"


def get_sampler(name: str, **options) -> Sampler:
    """A sampler by registry name, e.g. get_sampler("dpmpp_2m", solver_type="heun")."""
    return _registry.create("sampler", name, **options)


def get_guidance(name: str, **options) -> Guidance:
    """A guidance method by registry name, e.g. get_guidance("cfg", scale=7.5)."""
    return _registry.create("guidance", name, **options)


def list_samplers() -> list[str]:
    return _registry.names("sampler")


def list_guidance() -> list[str]:
    return _registry.names("guidance")


def __getattr__(name: str):
    """``diffguide.GuidedPipeline`` (and ``GuidedOutput``, ``Stitching``) without importing
    diffusers until they are used: the core stays torch-only."""
    if name in ("GuidedPipeline", "GuidedOutput", "Stitching", "as_diffusers_guider"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'diffguide' has no attribute {name!r}")


__all__ = [
    "Branch",
    "BranchParallel",
    "CFG",
    "Clip",
    "Denoiser",
    "DynamicThreshold",
    "FlowSchedule",
    "GaussianMixture",
    "Guidance",
    "GuidedDenoiser",
    "GuidedOutput",
    "GuidedPipeline",
    "NetDenoiser",
    "NonFiniteError",
    "Stitching",
    "Point",
    "Pred",
    "RandomNoise",
    "Sampler",
    "Schedule",
    "SeededNoise",
    "Step",
    "Stitch",
    "VPSchedule",
    "get_guidance",
    "get_sampler",
    "guide",
    "list_guidance",
    "list_samplers",
    "parse_spec",
    "register",
    "sample",
    "timesteps",
    "to_spec",
]

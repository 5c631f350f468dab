"""diffusers models as diffguide denoisers, and the GuidedPipeline. The only place diffusers is
imported."""

from .pipeline import GuidedOutput, GuidedPipeline, Stitching
from .schedulers import SchedulerInfo, from_scheduler

__all__ = ["GuidedPipeline", "GuidedOutput", "SchedulerInfo", "Stitching", "from_scheduler"]


def __getattr__(name: str):
    """``as_diffusers_guider`` and ``DiffguideGuidance`` (diffguide's methods as diffusers guiders)
    import diffusers' guiders, and through them peft, only when first used: seconds of import."""
    if name in ("as_diffusers_guider", "DiffguideGuidance"):
        from . import guiders

        return getattr(guiders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

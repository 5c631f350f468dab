"""diffusers models as diffguide denoisers, and the GuidedPipeline. The only place diffusers is
imported."""

from .pipeline import GuidedOutput, GuidedPipeline, Stitching
from .schedulers import SchedulerInfo, from_scheduler

__all__ = ["GuidedPipeline", "GuidedOutput", "SchedulerInfo", "Stitching", "from_scheduler"]

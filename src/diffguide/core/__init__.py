"""Torch-only core: schedules, Pred, denoisers, branch batching, the sampling loop, the registry."""

from .denoiser import Denoiser, NetDenoiser
from .guided import Branch, Guidance, GuidedDenoiser, Point, guide
from .parallel_branches import BranchParallel
from .pred import Pred
from .registry import parse_spec, register, to_spec
from .sample import (
    Ancestral,
    Churn,
    NonFiniteError,
    RandomNoise,
    Sampler,
    SeededNoise,
    Step,
    sample,
)
from .schedule import EDMSchedule, FlowSchedule, Schedule, TrigFlowSchedule, VPSchedule
from .spacing import SPACINGS, timesteps
from .stitch import Stitch
from .threshold import Clip, DynamicThreshold

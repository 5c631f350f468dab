"""Initial-noise optimisation: steps that prepare the starting noise of a run (InitNO, ReNO).

A noise optimiser is a frozen config registered under kind "noise" (``parse_spec("noise",
"reno:iterations=20")``). The pipeline calls ``optimise(ctx, x)`` with the run's initial x (already
scaled by the sampler's start scale) and a ``NoiseContext`` of what the method may use; any guidance
and sampler then run from the x it returns. Torch only: the pipeline supplies the model-specific
pieces (attention capture, rendering) as callables.
"""

from __future__ import annotations

from . import initno, reno  # noqa: F401  (register)
from .base import NoiseContext, NoiseOptimizer, positive
from .initno import InitNO
from .reno import ReNO

__all__ = ["InitNO", "NoiseContext", "NoiseOptimizer", "ReNO", "positive"]

"""Samplers; importing this package registers them."""

from .dpmpp import (
    DPMppSDE,
    DPMpp2SSinglestep,
    DPMpp2M,
    DPMpp2MSDE,
    DPMpp2S,
    DPMpp2SAncestral,
    DPMpp3M,
    DPMpp3MPublished,
    DPMpp3MSDE,
)
from .euler import DDIM, TCD, Euler, EulerAncestral
from .heun import Heun, Restart
from .lms import DPM2, LMS, DPM2Ancestral
from .consistency import Consistency
from .unipc import UniPC
from .pndm import IPNDM, PLMS
from .deis import DEIS
from .comfy import (
    ERSDE,
    ExpHeun2X0,
    ExpHeun2X0SDE,
    GradientEstimation,
    HeunPP2,
    ResMultistep,
    ResMultistepAncestral,
    Seeds2,
    Seeds3,
)
from .sa_solver import SASolver, SASolverPECE
from .dpm_solver import DPMAdaptive, DPMFast

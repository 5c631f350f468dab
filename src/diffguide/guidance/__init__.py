"""Guidance methods, one file each; importing this package registers them."""

from .ag import AdaptiveGuidance
from .apg import APG
from .cfg import CFG, NoGuidance
from .cfgpp import CFGpp
from .icg import ICG
from .tsg import TSG, TimeEmbeddingNoise
from .compose import Modulated, Sum
from .linear_ag import LinearAG
from .pag import PAG
from .seg import SEG
from .slg import SLG
from .stg import STG
from .cfg_zero_star import CFGZeroStar
from .tcfg import TCFG
from .fdg import FDG
from .autoguidance import AutoGuidance
from .mambo import MAMBO
from .apg_mix import APGMix
from .cfg_renorm import CFGRenorm
from .mahiro import Mahiro
from .skimmed import SkimmedCFG
from .fresca import FreSca
from .nag import NAG
from .tpg import TPG

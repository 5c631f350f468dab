"""The distillation trainer's public names where the documentation (``docs/distillation.md``) and
existing code import them: ``diffguide.distill.trainer.train(DistillConfig(...))``. The code lives
in ``config`` (settings), ``data``, ``methods`` (one class per method), ``run`` (the loop) and
``export``."""

from .config import DistillConfig
from .methods import METHODS
from .run import check_out, train

__all__ = ["METHODS", "DistillConfig", "check_out", "train"]

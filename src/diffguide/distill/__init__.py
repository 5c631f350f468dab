"""Distillation of guided teachers into few-step students: consistency distillation, DMD2, sCM and
iCT (with LADD beside sCM).

Losses, one module per method (``consistency``, ``dmd2``, ``scm``, ``ict``, ``ladd``); the methods
behind one interface (``methods``); the run's settings (``config``), data (``data``), loop
(``run``) and student folder (``export``); ``trainer`` keeps the names the documentation imports.
"""

from .consistency import ConsistencyLoss, PerSampleCFG, pseudo_huber, student_unet

__all__ = ["ConsistencyLoss", "PerSampleCFG", "pseudo_huber", "student_unet"]

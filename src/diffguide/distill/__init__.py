"""Distillation of guided teachers into few-step students (consistency distillation, DMD2)."""
from .consistency import ConsistencyLoss, PerSampleCFG, pseudo_huber, student_unet

__all__ = ["ConsistencyLoss", "PerSampleCFG", "pseudo_huber", "student_unet"]

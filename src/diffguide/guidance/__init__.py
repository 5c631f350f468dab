"""Guidance methods, one file each; importing this package registers them."""
from .cfg import CFG, NoGuidance

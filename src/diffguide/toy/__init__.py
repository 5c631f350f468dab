"""Toy worlds whose true distribution is known exactly."""

from .mixture import GaussianMixture

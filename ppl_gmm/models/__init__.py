"""Latent models, found by name in ``MODELS``; importing this package registers them all."""

from . import gmm
from .base import MODELS, LatentModel, Params

__all__ = ["MODELS", "LatentModel", "Params", "gmm"]

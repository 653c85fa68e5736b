"""Latent models, found by name in ``MODELS``.

Every module of this package registers its models when imported, and importing the package
imports them all: adding a model is adding a file. A model in another package registers through
the entry-point group ``ppl_gmm.models`` (see the README's "Adding a model").
"""

import importlib
import pkgutil
from importlib.metadata import entry_points

from .base import MODELS, ClosedFormEM, ExpFamilyEM, Flat, LatentModel, Params, Stats
from .conjugate import ConjugatePosterior, ConjugateVB

__all__ = [
    "ENTRY_POINT_GROUP",
    "MODELS",
    "ClosedFormEM",
    "ConjugatePosterior",
    "ConjugateVB",
    "ExpFamilyEM",
    "Flat",
    "LatentModel",
    "Params",
    "Stats",
]

ENTRY_POINT_GROUP = "ppl_gmm.models"

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def _load_entry_points() -> None:
    """Register the models of other packages (the entry-point group ``ppl_gmm.models``): at the
    registry's first lookup, so that such a module may import ``ppl_gmm.models`` itself."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        model = entry.load()
        if isinstance(model, type) and issubclass(model, LatentModel) and model.name not in MODELS:
            MODELS.register(model.name)(model)


MODELS.loader = _load_entry_points

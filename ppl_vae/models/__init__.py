"""Model families, each a Pyro program (``model(batch)`` / ``guide(batch)``) with its training stages.

``MODELS`` maps the CLI name to the class; :func:`build_model` instantiates one and lists the valid names on a typo.
Table models (``vae``, ``vaem``, ``hmc-vae``, ``hmc-vaem``, ``h-vae``, ``h-vaem``, ``hh-vae``, ``hh-vaem``,
``miwae``, ``miwaem``) take a ``TableSchema``; image models (``ug-vae``,
``beta-vae``, ``gmvae``, ``ml-vae``) take image sizes.
"""
from __future__ import annotations

import importlib

from ppl_vae.errors import UnknownNameError
from ppl_vae.models.base import Batch, LatentVariableModel, TrainingStage
from ppl_vae.models.tabular.predictor import Predictor
from ppl_vae.models.tabular.table import TableVAE
from ppl_vae.models.tabular.vae import VAE
from ppl_vae.models.tabular.vaem import VAEM

__all__ = ["Batch", "LatentVariableModel", "TrainingStage", "Predictor", "TableVAE", "VAE", "VAEM", "MODELS",
           "TABLE_MODELS", "build_model", "model_class"]

#: CLI name -> "module:Class" (imported lazily so optional families cost nothing until used)
MODELS = {
    "vae": "ppl_vae.models.tabular.vae:VAE",
    "vaem": "ppl_vae.models.tabular.vaem:VAEM",
    "hmc-vae": "ppl_vae.models.tabular.hmc:HMCVAE",
    "hmc-vaem": "ppl_vae.models.tabular.hmc:HMCVAEM",
    "h-vae": "ppl_vae.models.tabular.hierarchical:HVAE",
    "h-vaem": "ppl_vae.models.tabular.hierarchical:HVAEM",
    "hh-vae": "ppl_vae.models.tabular.hierarchical:HHVAE",
    "hh-vaem": "ppl_vae.models.tabular.hierarchical:HHVAEM",
    "miwae": "ppl_vae.models.tabular.miwae:MIWAE",
    "miwaem": "ppl_vae.models.tabular.miwae:MIWAEM",
    "ug-vae": "ppl_vae.models.image.ugvae:UGVAE",
    "beta-vae": "ppl_vae.models.image.betavae:BetaVAE",
    "gmvae": "ppl_vae.models.image.gmvae:GMVAE",
    "ml-vae": "ppl_vae.models.image.mlvae:MLVAE",
    # the lecture models (one file each: model + guide)
    "cvae": "ppl_vae.models.image.cvae:CVAE",
    "m2": "ppl_vae.models.image.m2:M2",
    "poe-vae": "ppl_vae.models.image.poe:PoEVAE",
    "vampprior": "ppl_vae.models.image.vampprior:VampPriorVAE",
    "vade": "ppl_vae.models.image.vade:VaDE",
    "seq-vae": "ppl_vae.models.image.sequential:SequentialVAE",
}
#: the models ``ppl-vae run`` trains on tables
TABLE_MODELS = ("vae", "vaem", "hmc-vae", "hmc-vaem", "h-vae", "h-vaem", "hh-vae", "hh-vaem", "miwae", "miwaem")


def model_class(name: str) -> type:
    """The class registered under ``name``. Raises :class:`~ppl_vae.errors.UnknownNameError` (lists choices)."""
    if name not in MODELS:
        raise UnknownNameError("model", name, MODELS)
    module, _, cls = MODELS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_model(name: str, *args, **kwargs) -> LatentVariableModel:
    """Instantiate the model registered under ``name`` with the given arguments."""
    return model_class(name)(*args, **kwargs)

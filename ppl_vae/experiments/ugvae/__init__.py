"""UG-VAE experiments on MNIST batches (Peis, Olmos, Artés-Rodríguez 2023, Pattern Recognition 134, 109130).

Four experiments, one module each, every one a function taking a trained model and writing PNG figures / returning
tables:

- :mod:`~ppl_vae.experiments.ugvae.interpolation` — :func:`interpolation_grids`: decode a line in beta with z
  fixed, and a line in z with beta fixed (the paper's interpolation figures);
- :mod:`~ppl_vae.experiments.ugvae.classification` — :func:`global_representation`: encode structured batches
  ("MNIST series": even / odd / Fibonacci / prime digit sequences; single-class batches) and random batches to the
  posterior mean of beta, and recognise the batch category with linear and RBF SVMs
  (:func:`svm_accuracy_table`; the paper's table "global representation of structured batches");
- :mod:`~ppl_vae.experiments.ugvae.alignment` — :func:`domain_alignment`: batches from two sources (MNIST vs
  upsampled scikit-learn digits) in beta space (PCA, t-SNE) and a source classifier on beta (the paper's
  domain-alignment figure);
- :mod:`~ppl_vae.experiments.ugvae.frechet` — :func:`sample_quality`: Fréchet distance (Heusel et al. 2017) between
  generated and real test images on the penultimate features of a small digit CNN trained here
  (:class:`DigitClassifier`; UG-VAE vs ML-VAE vs β-VAE vs GMVAE; not Inception features, so the numbers compare the
  models with each other, not with the paper's FID table).

:mod:`~ppl_vae.experiments.ugvae.common` holds what they share (:func:`train_svi`, the seeded :func:`mnist_split`,
image grids, embeddings, markdown tables); :mod:`~ppl_vae.experiments.ugvae.cli` holds :func:`add_arguments` and
:func:`run` (``ppl-vae ugvae-experiment``; ``python -m ppl_vae.experiments.ugvae``), re-exported here.

Data: the 10,000 MNIST test images, split once (seeded) into 8,000 training rows (models, digit classifier) and
2,000 held-out rows (structured batches to encode, real images for the Fréchet distance).
"""
from ppl_vae.experiments.ugvae.alignment import domain_alignment
from ppl_vae.experiments.ugvae.classification import global_representation, svm_accuracy_table
from ppl_vae.experiments.ugvae.cli import EXPERIMENTS, add_arguments, main, run
from ppl_vae.experiments.ugvae.common import markdown_table, mnist_split, save_image_grid, train_svi
from ppl_vae.experiments.ugvae.frechet import (DigitClassifier, frechet_distance, sample_quality,
                                              train_digit_classifier)
from ppl_vae.experiments.ugvae.interpolation import interpolation_grids

__all__ = ["EXPERIMENTS", "train_svi", "mnist_split", "save_image_grid", "interpolation_grids",
           "svm_accuracy_table", "global_representation", "domain_alignment", "DigitClassifier",
           "train_digit_classifier", "frechet_distance", "sample_quality", "markdown_table", "add_arguments", "run",
           "main"]

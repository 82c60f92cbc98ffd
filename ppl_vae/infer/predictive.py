"""Posterior-predictive imputation and target prediction for table models (Partial VAE / VAEM / HH-VAEM usage).

Given a batch with missing entries, draw K latents from the posterior (guide samples, or HMC chains for HMC models),
decode each, and summarise: real and count columns by the posterior-predictive mean, discrete columns by the most
probable level (probabilities averaged over the K draws). Observed entries are returned unchanged.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import torch

from ppl_vae.models.base import Batch

__all__ = ["impute", "predict", "impute_frame"]


def _average_point(likelihood, params: torch.Tensor) -> torch.Tensor:
    """Posterior-predictive point estimate ``(batch, D)`` from ``params (K, batch, P)``: mean of the K means for
    real/count columns, argmax of the averaged probabilities for discrete columns."""
    out = likelihood.impute(params).mean(0)
    for kind, (d, cols) in likelihood.distributions(params).items():
        if kind == "bernoulli":
            out[..., cols] = (d.probs.mean(0) > 0.5).to(out.dtype)
        elif kind == "categorical":
            out[..., cols] = d.probs.mean(0).argmax(-1).to(out.dtype)
    return out


@torch.no_grad()
def impute(model, batch: Batch, num_samples: int = 100) -> torch.Tensor:
    """Fill the missing entries of ``batch.x``.

    Args:
        model: a trained table model (``posterior_latents``, ``predictive_x_params``, ``x_likelihood``).
        batch: ``Batch`` with ``x (batch, D)`` and ``x_mask`` (``False`` = missing), normalised domain.
        num_samples: K posterior draws.

    Returns:
        ``(batch, D)`` tensor in the normalised domain: observed entries as given, missing ones imputed
        (codes for discrete columns).
    """
    h = model.posterior_latents(batch, num_samples)
    point = _average_point(model.x_likelihood, model.predictive_x_params(h, batch))
    return torch.where(batch.x_mask.bool(), batch.x, point)


@torch.no_grad()
def predict(model, batch: Batch, num_samples: int = 100) -> torch.Tensor:
    """Posterior-predictive target ``(batch, 1)`` in the normalised domain (mean for regression, class code for
    classification), marginalising the latent with K draws and imputing missing x from the same draws.

    Raises:
        ValueError: the model has no predictor (its schema has no target).
    """
    if model.predictor is None:
        raise ValueError("this model was built without a target column; there is nothing to predict")
    h = model.posterior_latents(batch, num_samples)
    return _average_point(model.predictor.likelihood, model.y_params(h, batch))


def impute_frame(model, split_or_table, normaliser, rows: Optional[np.ndarray] = None, num_samples: int = 100,
                 batch: Optional[Batch] = None) -> pd.DataFrame:
    """Imputed table in the *original* domain as a ``pandas.DataFrame`` (column names from the model's schema).

    Args:
        model: trained table model.
        split_or_table: a ``TensorTable`` (its ``batch()`` is imputed) unless ``batch`` is given.
        normaliser: the ``Normaliser`` of the split (maps back to original units / category values).
        rows: optional row subset.
        num_samples: K posterior draws.
    """
    if batch is None:
        batch = split_or_table.batch(rows)
    filled = impute(model, batch.to(next(model.parameters()).device), num_samples).cpu().numpy()
    return pd.DataFrame(normaliser.inverse_features(filled), columns=model.schema.feature_names)

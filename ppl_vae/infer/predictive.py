"""Posterior-predictive imputation and target prediction for table models (Partial VAE / VAEM / HH-VAEM usage).

Given a batch with missing entries, draw K latents from the posterior (guide samples, or HMC chains for HMC models),
decode each, and summarise: real and count columns by the posterior-predictive mean, discrete columns by the most
probable level (probabilities averaged over the K draws). Observed entries are returned unchanged.

:func:`sample_predictive` returns the joint posterior-predictive draws themselves, ``(x_U^(k), y^(k))`` for
k = 1..K, every column drawn from its own likelihood (codes for discrete columns, never means): what sequential
active information acquisition (Peis et al. 2022, §3.6 / Ma et al. 2019), multiple imputation and predictive
intervals are computed from.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch

from ppl_vae.models.base import Batch

__all__ = ["impute", "predict", "impute_frame", "PredictiveDraws", "sample_predictive"]


@dataclass
class PredictiveDraws:
    """K joint draws from the posterior predictive ``p(x_U, y | x_O, y_O)`` of every row of a batch.

    Each draw k shares one posterior latent ``h_k ~ p(h | x_O, y_O)`` (guide samples, or HMC chains for HMC
    models) between the features and the target: ``x_U^(k) ~ p(x_U | h_k)`` and ``y^(k) ~ p(y | x̂_k, h_k)``, so
    the K pairs ``(x_i^(k), y^(k))`` are samples of the joint ``p(x_i, y | x_O)`` (the dependence between a feature
    and the target flows through ``h``, as in the model).

    Attributes:
        x: ``(K, N, D)`` feature draws in the *normalised* domain; observed cells equal ``batch.x`` exactly;
            bernoulli/categorical/poisson columns hold sampled codes/counts (not means or probabilities).
        y: ``(K, N, Dy)`` target draws (normalised domain; class codes for classification; an observed target
            equals ``batch.y``), ``None`` when the model has no predictor.
        latent: ``(K, N, latent_dim)`` the posterior latents the draws were decoded from.
    """

    x: torch.Tensor
    y: Optional[torch.Tensor]
    latent: torch.Tensor

    @property
    def num_samples(self) -> int:
        """K, the number of joint draws per row."""
        return self.x.shape[0]


@contextlib.contextmanager
def _seeded(seed: Optional[int], device: torch.device):
    """Fork the global torch RNG (CPU, and the CUDA device in use) and seed it; no-op when ``seed`` is None."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


@torch.no_grad()
def sample_predictive(model, batch: Batch, num_samples: int = 100, *, seed: Optional[int] = None) -> PredictiveDraws:
    """Joint posterior-predictive draws ``(x^(k), y^(k))``, k = 1..K, of every row of ``batch`` (any table model).

    For each row, ``h_k`` is drawn with ``model.posterior_latents`` (encoder samples; the final states of HMC
    chains for HMC-refined models), the missing features are drawn from ``p(x_d | h_k)`` through
    ``model.predictive_x_params`` (VAEM: a code drawn from ``p(z | h)`` and decoded by the marginal decoder of the
    column) with each column's own likelihood (:meth:`ppl_vae.likelihoods.MixedLikelihood.sample`: Gaussian,
    Bernoulli, categorical, Poisson draws), and the target from ``p(y | x̂_k, h_k)`` with ``x̂_k`` the predictor's
    input built from ``model.x_params(h_k)`` (observed features kept), exactly as in training and evaluation.
    This is the sampling distribution of the SAIA reward ``I(y; x_i | x_O)`` (Peis et al. 2022, §3.6).

    Args:
        model: a table model honouring the evaluation contract (``posterior_latents``, ``x_params``,
            ``predictive_x_params``, ``y_params``, ``x_likelihood``, ``predictor``); put in eval mode while sampling.
        batch: :class:`~ppl_vae.models.base.Batch`, normalised domain; ``x_mask``/``y_mask`` say what is observed.
        num_samples: K >= 1 draws per row.
        seed: seeds the draws (the global torch RNG is forked, so the caller's stream is left untouched);
            ``None`` uses the global RNG.

    Returns:
        :class:`PredictiveDraws` with ``x (K, N, D)``, ``y (K, N, Dy)`` or ``None``, ``latent (K, N, latent_dim)``.

    Raises:
        ValueError: ``num_samples < 1``.
    """
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    was_training = model.training
    model.eval()
    try:
        with _seeded(seed, batch.device):
            h = model.posterior_latents(batch, int(num_samples))                  # (K, N, L)
            x_draw = model.x_likelihood.sample(model.predictive_x_params(h, batch))
            x = torch.where(batch.x_mask.bool(), batch.x.to(x_draw.dtype), x_draw)
            y = None
            if model.predictor is not None:
                y_params = model.y_params(h, batch, model.x_params(h, batch))
                y = model.predictor.likelihood.sample(y_params)                    # (K, N, Dy)
                if batch.y is not None and batch.y_mask is not None:
                    y = torch.where(batch.y_mask.bool(), batch.y.to(y.dtype), y)
    finally:
        model.train(was_training)
    return PredictiveDraws(x=x, y=y, latent=h)


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

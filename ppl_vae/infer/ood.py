"""Out-of-distribution detection by likelihood: score inputs by their importance-weighted negative log-likelihood
under a trained model and measure the separation with the area under the ROC curve.

A model that assigns an input low ``log p(x)`` flags it as unlike its training data (Bishop 1994, "Novelty
detection and neural network validation"). Deep generative models can assign *higher* likelihood to some
out-of-distribution inputs (Nalisnick et al. 2019, "Do Deep Generative Models Know What They Don't Know?", ICLR), so
the AUROC is reported, never assumed: 1.0 separates perfectly, 0.5 is chance, below 0.5 ranks the outliers as more
likely than the data.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ppl_vae.infer.likelihood import iw_log_likelihood

__all__ = ["ood_scores", "auroc"]


def ood_scores(model: Callable, guide: Callable, batch, num_particles: int = 100, chunk: Optional[int] = None,
               rows: int = 256) -> torch.Tensor:
    """Per-datapoint OOD score ``-log p̂(x_i)`` (nats; larger = more anomalous), from
    :func:`ppl_vae.infer.likelihood.iw_log_likelihood` with ``num_particles`` importance samples, ``rows`` datapoints
    at a time.

    Args:
        model, guide: Pyro programs taking a batch; batch: a :class:`ppl_vae.models.base.Batch` (``B`` rows).

    Returns:
        ``(B,)`` tensor.
    """
    parts = [-iw_log_likelihood(model, guide, batch[i:i + rows], num_particles, chunk)
             for i in range(0, batch.size, rows)]
    return torch.cat(parts)


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve of telling out-of-distribution inputs (positives) from in-distribution ones by score.

    Args:
        scores_in: ``(N_in,)`` scores of in-distribution inputs; scores_out: ``(N_out,)`` of outliers (larger =
            more anomalous, e.g. :func:`ood_scores`).

    Returns:
        AUROC in ``[0, 1]`` (``sklearn.metrics.roc_auc_score``).

    Raises:
        ValueError: an empty or non-finite score array.
    """
    from sklearn.metrics import roc_auc_score

    a = np.asarray(torch.as_tensor(scores_in).detach().cpu(), dtype=float).reshape(-1)
    b = np.asarray(torch.as_tensor(scores_out).detach().cpu(), dtype=float).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError("auroc needs at least one in-distribution and one out-of-distribution score")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("auroc got non-finite scores")
    labels = np.concatenate([np.zeros(a.size), np.ones(b.size)])
    return float(roc_auc_score(labels, np.concatenate([a, b])))

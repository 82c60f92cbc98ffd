"""Clustering metrics shared by the lecture experiments: unsupervised accuracy under the best one-to-one matching of
clusters to classes (Jiang et al. 2017, "Variational Deep Embedding", IJCAI, eq. 18; the Hungarian algorithm of
Kuhn 1955) and normalised mutual information (Strehl & Ghosh 2002), plus k-means as a reference clustering.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["cluster_matching", "cluster_accuracy", "normalized_mutual_info", "kmeans_clusters"]


def _labels(values, name: str) -> np.ndarray:
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer codes, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) and not np.all(arr == np.round(arr)) or arr.min() < 0):
        raise ValueError(f"{name} must hold non-negative integer codes")
    return arr.astype(np.int64)


def _check(labels, clusters) -> tuple[np.ndarray, np.ndarray]:
    y, c = _labels(labels, "labels"), _labels(clusters, "clusters")
    if y.shape != c.shape or y.size == 0:
        raise ValueError(f"labels and clusters must be non-empty and of equal length, got {y.size} and {c.size}")
    return y, c


def cluster_matching(labels, clusters) -> np.ndarray:
    """The one-to-one map ``m`` from clusters to classes maximising the agreement ``sum_i 1{y_i = m(c_i)}`` (Jiang
    et al. 2017 eq. 18), by :func:`scipy.optimize.linear_sum_assignment` (Hungarian algorithm) on the
    ``(clusters, classes)`` contingency table.

    Args:
        labels: ``(N,)`` non-negative integer class codes (tensor, array or list).
        clusters: ``(N,)`` non-negative integer cluster codes.

    Returns:
        ``(max(clusters) + 1,)`` int array: the class of each cluster code, ``-1`` for a cluster left unmatched
        (more clusters than classes).

    Raises:
        ValueError: not 1-D, unequal lengths, empty, or negative / non-integer codes.
    """
    from scipy.optimize import linear_sum_assignment

    y, c = _check(labels, clusters)
    table = np.zeros((c.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(table, (c, y), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapping = np.full(table.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def cluster_accuracy(labels, clusters) -> float:
    """``ACC = max_m (1/N) sum_i 1{y_i = m(c_i)}`` over one-to-one maps ``m`` from clusters to classes (Jiang et al.
    2017 eq. 18; the map is :func:`cluster_matching`). Points of an unmatched cluster count as errors.

    Args:
        labels: ``(N,)`` non-negative integer class codes (tensor, array or list).
        clusters: ``(N,)`` non-negative integer cluster codes.

    Returns:
        a float in ``[0, 1]``; 1.0 iff the clustering is a relabelling of the classes.

    Raises:
        ValueError: not 1-D, unequal lengths, empty, or negative / non-integer codes.
    """
    y, c = _check(labels, clusters)
    return float((cluster_matching(y, c)[c] == y).mean())


def normalized_mutual_info(labels, clusters) -> float:
    """Normalised mutual information ``I(y; c) / mean(H(y), H(c))`` (arithmetic mean, scikit-learn's default;
    Strehl & Ghosh 2002). Shapes and errors as :func:`cluster_accuracy`; returns a float in ``[0, 1]``."""
    from sklearn.metrics import normalized_mutual_info_score

    y, c = _check(labels, clusters)
    return float(normalized_mutual_info_score(y, c))


def kmeans_clusters(x: torch.Tensor, k: int = 10, seed: int = 0, n_init: int = 3) -> np.ndarray:
    """k-means (Lloyd's algorithm with k-means++ seeding, scikit-learn) on the rows of ``x (N, D)``.

    Returns:
        ``(N,)`` int cluster codes in ``0..k-1``. Raises ValueError: ``x`` not 2-D or ``k`` not in ``1..N``.
    """
    from sklearn.cluster import KMeans

    if x.dim() != 2 or not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans_clusters needs x (N, D) with 1 <= k <= N, got shape {tuple(x.shape)}, k={k}")
    return KMeans(k, n_init=n_init, random_state=seed).fit_predict(x.detach().cpu().double().numpy())

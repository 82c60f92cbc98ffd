"""Global representation of structured batches (Peis, Olmos, Artés-Rodríguez 2023, table "global representation
of structured batches"): linear and RBF SVMs recognise the category of a batch ("MNIST series", single-class or
random) from the posterior mean of the global latent beta."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppl_vae.experiments.ugvae.common import batch_codes, embedding_figures
from ppl_vae.models.base import Batch

__all__ = ["svm_accuracy_table", "global_representation"]


def svm_accuracy_table(features: np.ndarray, categories: np.ndarray, task: str, feature: str = "beta",
                       seed: int = 0, test_size: float = 0.3) -> list[dict]:
    """Train/test accuracy of linear and RBF SVMs recognising a batch category from a batch-level code.

    Standardised features, ``sklearn.svm.SVC`` (``C = 1``), stratified ``test_size`` split seeded by ``seed``.

    Args:
        features: ``(n_batches, d)`` codes (e.g. posterior means of beta).
        categories: ``(n_batches,)`` labels.
        task: task name for the table.
        feature: feature name for the table.

    Returns:
        two rows ``{task, feature, classifier, n_batches, chance, train_acc, test_acc}``; ``chance`` is the
        majority-class share of the test set.

    Raises:
        ValueError: fewer than two categories, or too few batches to put every category in both splits.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    categories = np.asarray(categories)
    if np.unique(categories).size < 2:
        raise ValueError(f"task {task!r} needs at least two categories")
    n_classes = np.unique(categories).size
    n_test = max(int(math.ceil(test_size * categories.size)), n_classes)   # every class can reach the test set
    if categories.size - n_test < n_classes:
        raise ValueError(f"task {task!r}: {categories.size} batches are too few for {n_classes} categories")
    x_tr, x_te, y_tr, y_te = train_test_split(features, categories, test_size=n_test, random_state=seed,
                                              stratify=categories)
    chance = float(np.max(np.unique(y_te, return_counts=True)[1]) / y_te.size)
    rows = []
    for name, kernel in (("linear SVM", "linear"), ("RBF SVM", "rbf")):
        clf = make_pipeline(StandardScaler(), SVC(kernel=kernel, C=1.0)).fit(x_tr, y_tr)
        rows.append({"task": task, "feature": feature, "classifier": name, "n_batches": int(categories.size),
                     "chance": chance, "train_acc": float(clf.score(x_tr, y_tr)),
                     "test_acc": float(clf.score(x_te, y_te))})
    return rows


@torch.no_grad()
def global_representation(model, images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path,
                          n_series_per_kind: int = 50, n_random: int = 400, n_class_per_digit: int = 20,
                          batch_size: int = 128, seed: int = 0, tsne: bool = True) -> dict[str, Any]:
    """Global representation of structured batches (Peis et al. 2023, "MNIST series"; table "Global
    representation of structured batches").

    Encodes ``4 * n_series_per_kind`` series batches (even / odd / Fibonacci / prime), ``n_random`` random batches
    and ``10 * n_class_per_digit`` single-digit batches to the posterior mean of beta, then trains linear and RBF
    SVMs (:func:`svm_accuracy_table`) on these tasks: series kind (4 classes), series vs random (2), series kind +
    random (5), digit of a class batch (10), class batches + random (11). As a baseline feature the same SVMs read
    the batch mean of the local codes z ("mean z"), a permutation-invariant summary without a global latent.
    Figures: beta of the series and random batches (PCA, t-SNE) and z of held-out images coloured by digit.

    Args:
        model: trained UG-VAE.
        images, labels: held-out pool ``(N, 784)`` / ``(N,)`` for the batches.
        out_dir: folder for the figures.
        n_series_per_kind, n_random, n_class_per_digit: numbers of batches.
        batch_size: rows per batch (128 in the paper).
        tsne: also draw t-SNE embeddings.

    Returns:
        ``{"table": rows (see :func:`svm_accuracy_table`), "figures": {name: path}}``.
    """
    from ppl_vae.data.batches import SERIES_KINDS, StructuredBatchSampler, series_batches

    out_dir = Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    series, series_names = [], []
    for kind in SERIES_KINDS:
        series += series_batches(kind, n_series_per_kind, images, labels, batch_size, generator=g)
        series_names += [kind] * n_series_per_kind
    randoms = list(StructuredBatchSampler(images, labels, batch_size, "random", num_batches=n_random, generator=g))
    classes = []
    for digit in range(10):
        classes += list(StructuredBatchSampler(images, labels, batch_size, "class", classes=[digit],
                                               num_batches=n_class_per_digit, generator=g))
    class_names = [f"digit {int(b.group[0])}" for b in classes]

    feats = {name: codes for name, codes in zip(("beta", "mean z"), batch_codes(model, series))}
    feats_r = dict(zip(("beta", "mean z"), batch_codes(model, randoms)))
    feats_c = dict(zip(("beta", "mean z"), batch_codes(model, classes)))
    series_names, class_names = np.array(series_names), np.array(class_names)
    rand_names = np.array(["random"] * n_random)
    table = []
    for feature in ("beta", "mean z"):
        s, r, c = feats[feature], feats_r[feature], feats_c[feature]
        tasks = [
            ("series kind (4)", s, series_names),
            ("series vs random (2)", np.concatenate([s, r]),
             np.concatenate([np.array(["series"] * len(s)), rand_names])),
            ("series kind + random (5)", np.concatenate([s, r]), np.concatenate([series_names, rand_names])),
            ("class batch digit (10)", c, class_names),
            ("class batches + random (11)", np.concatenate([c, r]), np.concatenate([class_names, rand_names])),
        ]
        for task, x, y in tasks:
            table += svm_accuracy_table(x, y, task, feature, seed)

    figures = embedding_figures(np.concatenate([feats["beta"], feats_r["beta"]]),
                                 np.concatenate([series_names, rand_names]).tolist(), out_dir, "global_beta",
                                 "posterior mean of beta: series vs random batches", seed, tsne)
    # local space: z of held-out images, coloured by digit
    device = next(model.parameters()).device
    n_z = min(1000, labels.numel())
    rows = torch.randperm(labels.numel(), generator=g)[:n_z]
    z = model.encode_local(Batch(images[rows].to(device), torch.ones(n_z, images.shape[1], dtype=torch.bool,
                                                                      device=device))).cpu().numpy()
    zfig = embedding_figures(z, [f"digit {int(v)}" for v in labels[rows]], out_dir, "global_z",
                              "posterior mean of z, held-out images", seed, tsne)
    figures.update({f"z_{k}": v for k, v in zfig.items()})
    figures = {(k if k.startswith("z_") else f"beta_{k}"): v for k, v in figures.items()}
    return {"table": table, "figures": figures}

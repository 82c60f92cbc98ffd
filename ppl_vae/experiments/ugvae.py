"""UG-VAE experiments on MNIST batches (Peis, Olmos, Artés-Rodríguez 2023; thesis ch. 3; METHODS §10).

Four experiments, each a function taking a trained model and writing PNG figures / returning tables:

- :func:`interpolation_grids` — decode a line in beta with z fixed, and a line in z with beta fixed (thesis
  "interpolation" figures: beta carries the batch-level style, z the local content);
- :func:`global_representation` — encode structured batches ("MNIST series": even / odd / Fibonacci / prime digit
  sequences; single-class batches) and random batches to the posterior mean of beta, and recognise the batch
  category with linear and RBF SVMs (thesis table "Global representation of structured batches");
- :func:`domain_alignment` — batches from two sources (MNIST vs upsampled scikit-learn digits) in beta space (PCA,
  t-SNE) and a source classifier on beta (thesis "domain alignment" figure);
- :func:`sample_quality` — Fréchet distance between generated and real test images, computed on the penultimate
  features of a small digit CNN trained here (thesis FID table: UG-VAE vs ML-VAE vs β-VAE; our feature network is
  not Inception, so the numbers are comparable between models, not with the paper's).

:func:`run` runs them from parsed CLI arguments (``ppl-vae ugvae-experiment``); :func:`train_svi` is the small
SVI loop used for now (``pyro.infer.SVI`` + ``pyro.optim.Adam``, lr 5e-3 as the reference code), driven by each
model's :meth:`~ppl_vae.models.base.LatentVariableModel.training_stages`.

Data: the 10,000 MNIST test images, split once (seeded) into 8,000 training rows (models, digit classifier) and
2,000 held-out rows (structured batches to encode, real images for the Fréchet distance).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ppl_vae.models.base import Batch, LatentVariableModel
from ppl_vae.pipeline import resolve_device

__all__ = ["EXPERIMENTS", "train_svi", "mnist_split", "save_image_grid", "interpolation_grids",
           "svm_accuracy_table", "global_representation", "domain_alignment", "DigitClassifier",
           "train_digit_classifier", "frechet_distance", "sample_quality", "markdown_table", "add_arguments", "run"]

#: Experiments selectable with ``--experiment`` (``all`` runs every one).
EXPERIMENTS = ("interpolation", "global", "domain", "fid")


# ---------------------------------------------------------------------------------------------------- utilities
def train_svi(model: LatentVariableModel, batches: Iterable[Batch], steps: int, lr: float = 5e-3,
              device: str | torch.device = "cpu", seed: Optional[int] = None, progress: bool = True,
              desc: Optional[str] = None) -> list[float]:
    """Train a model on a stream of batches with its own :meth:`training_stages` through the package's
    :class:`~ppl_vae.infer.svi.Trainer` (``pyro.infer.SVI`` + ``ClippedAdam``).

    Args:
        model: any :class:`LatentVariableModel`.
        batches: an iterable of :class:`Batch` (e.g. a :class:`ppl_vae.data.batches.StructuredBatchSampler`);
            it is cycled when exhausted.
        steps: total SVI steps (given to ``training_stages``).
        lr: Adam learning rate (5e-3, the UG-VAE reference).
        device: where to train.
        seed: ``pyro.set_rng_seed(seed)`` before training when given.
        progress: show a tqdm bar with the running loss.
        desc: unused (the bar shows ``model:stage``); kept for call compatibility.

    Returns:
        the loss of every step divided by the batch size (negative ELBO per datapoint, nats).

    Raises:
        ValueError: ``steps < 1`` or an empty batch stream.
    """
    from ppl_vae.infer.svi import Trainer

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    trainer = Trainer(model, seed=0 if seed is None else seed, device=resolve_device(device), lr=lr,
                      progress=progress)
    history = trainer.fit(batches, steps)
    return [h["loss"] for h in history]


def mnist_split(n_test: int = 2000, seed: int = 0, images: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded split of the MNIST test set into training and held-out rows.

    Returns:
        ``(train_x (N - n_test, 784), train_y, test_x (n_test, 784), test_y)``; images in ``[0, 1]``.

    Raises:
        ValueError: ``n_test`` not in ``1..N-1``.
    """
    from ppl_vae.data.batches import load_mnist_images

    if images is None or labels is None:
        images, labels = load_mnist_images()
    if not 0 < n_test < labels.numel():
        raise ValueError(f"n_test must be in 1..{labels.numel() - 1}, got {n_test}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.numel(), generator=g)
    tr, te = perm[n_test:], perm[:n_test]
    return images[tr], labels[tr], images[te], labels[te]


def save_image_grid(images: torch.Tensor, path: str | Path, title: Optional[str] = None,
                    row_labels: Optional[Sequence[str]] = None) -> Path:
    """Save a ``(rows, cols, 784)`` tensor of 28x28 images in ``[0, 1]`` as one PNG grid.

    Returns:
        the written path. Raises ValueError: ``images`` not ``(rows, cols, 784)``.
    """
    from matplotlib.figure import Figure

    if images.dim() != 3 or images.shape[-1] != 784:
        raise ValueError(f"images must be (rows, cols, 784), got {tuple(images.shape)}")
    rows, cols = images.shape[:2]
    tiles = images.detach().cpu().clamp(0, 1).reshape(rows, cols, 28, 28)
    canvas = torch.ones(rows * 30, cols * 30)
    for r in range(rows):
        for c in range(cols):
            canvas[r * 30 + 1:r * 30 + 29, c * 30 + 1:c * 30 + 29] = tiles[r, c]
    fig = Figure(figsize=(cols * 0.6 + 0.6, rows * 0.6 + (0.5 if title else 0.1)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(canvas.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    if row_labels is not None:
        ax.set_yticks([r * 30 + 14 for r in range(rows)], list(row_labels), fontsize=7)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def markdown_table(rows: Sequence[dict], columns: Optional[Sequence[str]] = None, floatfmt: str = ".3f") -> str:
    """Render a list of dict rows as a GitHub markdown table (floats with ``floatfmt``)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt) if math.isfinite(v) else str(v)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _scatter(points: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """2-D scatter of ``{category: (n, 2) points}`` saved to ``path``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    for name, pts in points.items():
        ax.scatter(pts[:, 0], pts[:, 1], s=9, alpha=0.7, label=name)
    ax.legend(fontsize=7, markerscale=1.5)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _embed(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D PCA or t-SNE embedding of ``(n, d)`` features."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(features)
    perplexity = float(min(30.0, max(2.0, (features.shape[0] - 1) / 3.0)))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(features)


def _embedding_figures(features: np.ndarray, names: Sequence[str], out_dir: Path, stem: str, title: str,
                       seed: int, tsne: bool) -> dict[str, str]:
    names = np.asarray(names)
    paths = {}
    for method in (["pca", "tsne"] if tsne else ["pca"]):
        emb = _embed(features, method, seed)
        groups = {n: emb[names == n] for n in dict.fromkeys(names.tolist())}
        paths[method] = str(_scatter(groups, out_dir / f"{stem}_{method}.png", f"{title} ({method.upper()})"))
    return paths


# ---------------------------------------------------------------------------------------------------- (a) interpolation
@torch.no_grad()
def interpolation_grids(model, images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path,
                        n_rows: int = 8, n_cols: int = 10, classes: tuple[int, int] = (0, 1),
                        batch_size: int = 128, seed: int = 0) -> dict[str, str]:
    """Interpolation grids of a trained UG-VAE (thesis ch. 3, interpolation figures).

    - beta line: ``beta_t = (1 - t) beta_A + t beta_B``, with ``beta_A``/``beta_B`` the posterior means of two
      single-class batches (classes ``classes``); each row keeps the z (posterior mean) of one image of batch A.
    - beta through the mixture prior: row ``d`` decodes the component mean ``z = mu_d(beta)`` at ``beta = s u``,
      ``u = (beta_B - beta_A) / |beta_B - beta_A|``, ``s`` in ``[-2.5, 2.5]`` (the prior's range; posterior
      means of batches lie close to 0).
    - z line: ``z_t = (1 - t) z_i + t z_j`` between two images of a random batch (one pair per row), with beta fixed
      to that batch's posterior mean.

    Args:
        model: trained :class:`ppl_vae.models.image.ugvae.UGVAE` (``encode_global``, ``encode_local``, ``generate``).
        images, labels: ``(N, 784)`` / ``(N,)`` pool to draw the batches from.
        out_dir: folder for ``interpolation_beta.png``, ``interpolation_beta_components.png`` and
            ``interpolation_z.png``.
        n_rows, n_cols: grid size (rows: fixed code; columns: ``t = 0..1``).
        classes: the two classes whose batches give the beta endpoints.

    Returns:
        ``{"beta_grid": path, "beta_components_grid": path, "z_grid": path}``.
    """
    from ppl_vae.data.batches import StructuredBatchSampler, make_batch

    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(labels == c).flatten() for c in classes]
    pick = [rows[torch.randperm(rows.numel(), generator=g)[:batch_size]] for rows in by_class]
    batch_a, batch_b = (make_batch(images, labels, p, int(c), device) for p, c in zip(pick, classes))
    beta_a, beta_b = model.encode_global(batch_a)[0], model.encode_global(batch_b)[0]
    t = torch.linspace(0, 1, n_cols, device=device)
    betas = (1 - t)[:, None] * beta_a + t[:, None] * beta_b                    # (cols, dim_beta)
    z_rows = model.encode_local(batch_a)[:n_rows]                              # (rows, dim_z)
    grid_beta = model.generate(z_rows[:, None, :].expand(-1, n_cols, -1), betas.expand(n_rows, -1, -1))
    beta_path = save_image_grid(grid_beta, out_dir / "interpolation_beta.png",
                                f"beta: batch of {classes[0]}s -> batch of {classes[1]}s (z fixed per row)")
    # beta modulates the mixture prior p(z | d, beta) too: decode each component mean mu_d(beta) along the same
    # direction swept over the prior's range, beta = s * u, s in [-2.5, 2.5], u = unit(beta_B - beta_A)
    u = (beta_b - beta_a) / (beta_b - beta_a).norm().clamp_min(1e-12)
    sweep = torch.linspace(-2.5, 2.5, n_cols, device=device)[:, None] * u                # (cols, dim_beta)
    comp_loc, _ = model.component_params(sweep)                                          # (cols, K, dim_z)
    grid_comp = model.generate(comp_loc.transpose(0, 1), sweep.expand(model.num_components, -1, -1))
    comp_path = save_image_grid(grid_comp, out_dir / "interpolation_beta_components.png",
                                "z = mu_d(beta) per row d; beta = s u, s: -2.5 -> 2.5",
                                row_labels=[f"d={k}" for k in range(model.num_components)])

    batch = StructuredBatchSampler(images, labels, batch_size, "random", generator=g, device=device).sample()
    beta = model.encode_global(batch)[0]
    z = model.encode_local(batch)
    z_i, z_j = z[:n_rows], z[n_rows:2 * n_rows]
    z_line = (1 - t)[None, :, None] * z_i[:, None, :] + t[None, :, None] * z_j[:, None, :]
    grid_z = model.generate(z_line, beta)
    z_path = save_image_grid(grid_z, out_dir / "interpolation_z.png", "z: image i -> image j (beta fixed)")
    return {"beta_grid": str(beta_path), "beta_components_grid": str(comp_path), "z_grid": str(z_path)}


# ---------------------------------------------------------------------------------------------------- (b) global
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
def _batch_codes(model, batches: Sequence[Batch]) -> tuple[np.ndarray, np.ndarray]:
    """Posterior-mean beta ``(n, dim_beta)`` and batch-mean z ``(n, dim_z)`` of each batch."""
    device = next(model.parameters()).device
    betas, zbar = [], []
    for b in batches:
        b = b.to(device)
        betas.append(model.encode_global(b)[0].cpu())
        zbar.append(model.encode_local(b).mean(0).cpu())
    return torch.stack(betas).numpy(), torch.stack(zbar).numpy()


@torch.no_grad()
def global_representation(model, images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path,
                          n_series_per_kind: int = 50, n_random: int = 400, n_class_per_digit: int = 20,
                          batch_size: int = 128, seed: int = 0, tsne: bool = True) -> dict[str, Any]:
    """Global representation of structured batches (METHODS §10 "MNIST series"; thesis table "Global
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

    feats = {name: codes for name, codes in zip(("beta", "mean z"), _batch_codes(model, series))}
    feats_r = dict(zip(("beta", "mean z"), _batch_codes(model, randoms)))
    feats_c = dict(zip(("beta", "mean z"), _batch_codes(model, classes)))
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

    figures = _embedding_figures(np.concatenate([feats["beta"], feats_r["beta"]]),
                                 np.concatenate([series_names, rand_names]).tolist(), out_dir, "global_beta",
                                 "posterior mean of beta: series vs random batches", seed, tsne)
    # local space: z of held-out images, coloured by digit
    device = next(model.parameters()).device
    n_z = min(1000, labels.numel())
    rows = torch.randperm(labels.numel(), generator=g)[:n_z]
    z = model.encode_local(Batch(images[rows].to(device), torch.ones(n_z, images.shape[1], dtype=torch.bool,
                                                                      device=device))).cpu().numpy()
    zfig = _embedding_figures(z, [f"digit {int(v)}" for v in labels[rows]], out_dir, "global_z",
                              "posterior mean of z, held-out images", seed, tsne)
    figures.update({f"z_{k}": v for k, v in zfig.items()})
    figures = {(k if k.startswith("z_") else f"beta_{k}"): v for k, v in figures.items()}
    return {"table": table, "figures": figures}


# ---------------------------------------------------------------------------------------------------- (c) domain
def _domain_training_stream(data, batch_size: int, generator: torch.Generator, device) -> Iterator[Batch]:
    """Training batches for domain alignment: half single-source batches, half uniformly random over both."""
    from ppl_vae.data.batches import StructuredBatchSampler

    single = StructuredBatchSampler(data.images, data.sources, batch_size, "class", generator=generator,
                                    device=device)
    mixed = StructuredBatchSampler(data.images, data.sources, batch_size, "random", generator=generator,
                                   device=device)
    while True:
        yield single.sample() if torch.rand((), generator=generator) < 0.5 else mixed.sample()


def domain_alignment(out_dir: str | Path, steps: int, batch_size: int = 128, kind: str = "digits",
                     n_batches: int = 100, device: str | torch.device = "cpu", seed: int = 0, lr: float = 5e-3,
                     progress: bool = True, tsne: bool = True, model_kwargs: Optional[dict] = None) -> dict[str, Any]:
    """Domain alignment with the global latent (thesis ch. 3, "CelebA vs FACES" figure, here with digits).

    Trains a UG-VAE on batches that are either single-source or uniformly mixed over two sources
    (:func:`ppl_vae.data.batches.two_source_dataset`), then encodes ``n_batches`` batches of each category
    (source 0 only, source 1 only, 50/50 mixed) to the posterior mean of beta, plots PCA / t-SNE embeddings and
    reports linear/RBF SVM accuracy of the batch category from beta.

    Returns:
        ``{"table": rows, "figures": {name: path}, "sources": names, "final_loss": float}``.
    """
    from ppl_vae.data.batches import StructuredBatchSampler, two_source_dataset
    from ppl_vae.models.image.ugvae import UGVAE

    out_dir = Path(out_dir)
    device = resolve_device(device)
    data = two_source_dataset(kind, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    model = UGVAE(**(model_kwargs or {}))
    losses = train_svi(model, _domain_training_stream(data, batch_size, g, "cpu"), steps, lr, device, seed,
                       progress, desc="ug-vae (domain)")
    names = {0: f"{data.names[0]} only", 1: f"{data.names[1]} only"}
    batches, cats = [], []
    for src in (0, 1):
        batches += list(StructuredBatchSampler(data.images, data.sources, batch_size, "class", classes=[src],
                                               num_batches=n_batches, generator=g))
        cats += [names[src]] * n_batches
    batches += list(StructuredBatchSampler(data.images, data.labels, batch_size, "mixed", sources=data.sources,
                                           num_batches=n_batches, generator=g))
    cats += ["mixed 50/50"] * n_batches
    beta, _ = _batch_codes(model, batches)
    cats = np.array(cats)
    table = svm_accuracy_table(beta, cats, "source of batch (3)", "beta", seed)
    table += svm_accuracy_table(beta[cats != "mixed 50/50"], cats[cats != "mixed 50/50"], "source of batch (2)",
                                "beta", seed)
    figures = _embedding_figures(beta, cats.tolist(), out_dir, "domain_beta",
                                 f"beta of {data.names[0]} / {data.names[1]} batches", seed, tsne)
    return {"table": table, "figures": figures, "sources": list(data.names),
            "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):]))}


# ---------------------------------------------------------------------------------------------------- (d) FID
class DigitClassifier(nn.Module):
    """Small CNN digit classifier whose penultimate layer gives the features of the Fréchet distance.

    ``conv(1->32, 3) - ReLU - maxpool - conv(32->64, 3) - ReLU - maxpool - linear(64*7*7 -> feature_dim) - ReLU -
    linear(feature_dim -> 10)``.

    Shapes: ``forward: (..., 784) in [0, 1] -> (..., 10)`` logits; ``features: (..., 784) -> (..., feature_dim)``.
    """

    def __init__(self, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 49, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (ReLU) features. Shapes: ``(..., 784) -> (..., feature_dim)``."""
        lead = x.shape[:-1]
        return self.body(x.reshape(-1, 1, 28, 28)).reshape(*lead, self.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits. Shapes: ``(..., 784) -> (..., 10)``."""
        return self.head(self.features(x))


def train_digit_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 3, batch_size: int = 128,
                           lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu",
                           progress: bool = False) -> DigitClassifier:
    """Train :class:`DigitClassifier` with Adam and cross-entropy.

    Args:
        images: ``(N, 784)`` in ``[0, 1]``; labels ``(N,)`` in ``0..9``.
        epochs, batch_size, lr, seed: training settings (seeded shuffles and initialisation).

    Returns:
        the trained classifier in eval mode on ``device``.
    """
    from tqdm.auto import tqdm

    device = resolve_device(device)
    torch.manual_seed(seed)
    net = DigitClassifier().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="digit classifier", disable=not progress):
        perm = torch.randperm(labels.numel(), generator=g)
        for i in range(0, labels.numel(), batch_size):
            rows = perm[i:i + batch_size]
            loss = F.cross_entropy(net(images[rows].to(device)), labels[rows].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID eq.):
    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.

    ``tr (S_a S_b)^(1/2)`` is computed as ``sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))`` (symmetric PSD, float64).

    Args:
        feat_a, feat_b: ``(n_a, d)`` and ``(n_b, d)`` features, ``n >= 2``.

    Returns:
        the distance (``>= 0`` up to rounding).

    Raises:
        ValueError: feature widths differ or fewer than two rows.
    """
    a, b = np.asarray(feat_a, dtype=np.float64), np.asarray(feat_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need (n, d) feature sets with equal d and n >= 2, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ s_b @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


@torch.no_grad()
def _features(net: DigitClassifier, images: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    device = next(net.parameters()).device
    return torch.cat([net.features(images[i:i + chunk].to(device)).cpu()
                      for i in range(0, images.shape[0], chunk)]).numpy()


def sample_quality(models: dict[str, LatentVariableModel], classifier: DigitClassifier, real_images: torch.Tensor,
                   n_samples: int = 2000, batch_size: int = 128, seed: int = 0,
                   reference_images: Optional[torch.Tensor] = None, out_dir: Optional[str | Path] = None
                   ) -> list[dict]:
    """Fréchet distance (on :class:`DigitClassifier` features) between each model's samples and real images.

    Each model draws ``ceil(n_samples / batch_size)`` batches with its ``sample(num_batches, batch_size,
    generator)`` (UG-VAE: one beta per batch; ML-VAE: one content code per batch; β-VAE / GMVAE: per-image latents),
    as mean images. ``reference_images`` (e.g. real training images) gives the real-vs-real floor.

    Returns:
        rows ``{model, n_samples, frechet_distance}``; with ``out_dir`` also ``samples_<model>.png`` grids.
    """
    real = _features(classifier, real_images)
    rows = []
    num_batches = max(1, math.ceil(n_samples / batch_size))
    for name, model in models.items():
        device = next(model.parameters()).device
        g = torch.Generator(device=device).manual_seed(seed)
        x = model.sample(num_batches, batch_size, generator=g).reshape(-1, 784)[:n_samples]
        rows.append({"model": name, "n_samples": int(x.shape[0]),
                     "frechet_distance": frechet_distance(_features(classifier, x), real)})
        if out_dir is not None:
            k = min(8, batch_size)
            grid = x.reshape(-1, 784)[: (x.shape[0] // k) * k].reshape(-1, k, 784)[:8]
            save_image_grid(grid, Path(out_dir) / f"samples_{name}.png", f"{name} samples (rows: batches)")
    if reference_images is not None:
        rows.append({"model": "real (training rows)", "n_samples": int(reference_images.shape[0]),
                     "frechet_distance": frechet_distance(_features(classifier, reference_images), real)})
    return rows


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``ppl-vae ugvae-experiment`` options to ``parser`` (returns it)."""
    parser.add_argument("--experiment", choices=[*EXPERIMENTS, "all"], default="all",
                        help="which experiment to run (default all)")
    parser.add_argument("--steps", type=int, default=None,
                        help="SVI steps per model (default 5000; 30 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=128, help="rows per batch (default 128, the paper's)")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3, the reference)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    parser.add_argument("--out", default="ugvae-results", help="output folder for tables and PNGs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=["mlp", "conv"], default="mlp", help="network architecture (default mlp)")
    parser.add_argument("--beta-kl", type=float, default=1.0, help="KL weight of the β-VAE baseline (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is fastest for these small nets)")
    parser.add_argument("--no-tsne", action="store_true", help="skip t-SNE embeddings (PCA only)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for tests (seconds)")
    return parser


@dataclass
class _Context:
    args: argparse.Namespace
    out: Path
    device: torch.device
    steps: int
    smoke: bool
    data: tuple = ()
    models: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @property
    def progress(self) -> bool:
        return not getattr(self.args, "no_progress", False)

    def train(self, name: str, factory: Callable[[], LatentVariableModel]) -> LatentVariableModel:
        """Train (once) a model on random batches of the training rows."""
        from ppl_vae.data.batches import StructuredBatchSampler

        if name not in self.models:
            seed = self.args.seed
            torch.manual_seed(seed)
            model = factory()
            train_x, train_y = self.data[0], self.data[1]
            sampler = StructuredBatchSampler(train_x, train_y, self.args.batch_size, "random", seed=seed)
            t0 = time.perf_counter()
            losses = train_svi(model, sampler, self.steps, self.args.lr, self.device, seed, self.progress, name)
            self.timings[f"train {name}"] = time.perf_counter() - t0
            k = max(1, min(100, len(losses) // 10))
            self.losses[name] = {"first": float(np.mean(losses[:k])), "last": float(np.mean(losses[-k:])),
                                 "steps": len(losses)}
            self.models[name] = model
        return self.models[name]


def _write_outputs(out: Path, results: dict) -> None:
    """Write ``results.json`` and ``results.md`` (markdown tables) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    lines = ["# UG-VAE experiments (MNIST)", "", f"Settings: `{json.dumps(results['config'])}`", ""]
    if results.get("losses"):
        lines += ["## Training loss (negative ELBO per image, nats)", "",
                  markdown_table([{"model": k, **v} for k, v in results["losses"].items()], floatfmt=".2f")]
    if "global" in results:
        lines += ["## Global representation of structured batches (SVM on the posterior mean of beta)", "",
                  markdown_table(results["global"]["table"])]
    if "domain" in results:
        lines += ["## Domain alignment (batch source from beta)", "", markdown_table(results["domain"]["table"])]
    if "fid" in results:
        lines += ["## Sample quality: Fréchet distance on digit-CNN features (lower is better)", "",
                  f"Digit CNN held-out accuracy: {results['fid']['classifier_test_accuracy']:.4f}", "",
                  markdown_table(results["fid"]["table"], floatfmt=".2f")]
    figures = [p for key in ("interpolation", "global", "domain", "fid") if key in results
               for p in (results[key].get("figures", {}) or {}).values()]
    if figures:
        lines += ["## Figures", ""] + [f"- `{Path(p).name}`" for p in figures] + [""]
    if results.get("timings"):
        lines += ["## Timings (s)", "", markdown_table([{"step": k, "seconds": v}
                                                        for k, v in results["timings"].items()], floatfmt=".1f")]
    (out / "results.md").write_text("\n".join(lines))


def run(args: argparse.Namespace) -> dict:
    """Run the selected UG-VAE experiments (``ppl-vae ugvae-experiment``) and write ``results.md``,
    ``results.json`` and the PNG figures to ``args.out``.

    Sizes: with ``--smoke`` every model trains 30 steps on small batches, and few batches are encoded (seconds);
    otherwise ``--steps`` (default 5000) per model, 200 series + 400 random + 200 class batches, 2000 samples
    per model for the Fréchet distance.

    Returns:
        ``{"config", "losses", "timings", and per experiment run: "interpolation" {"figures"}, "global"
        {"table", "figures"}, "domain" {"table", "figures", ...}, "fid" {"table", "classifier_test_accuracy",
        "figures"}}``.

    Raises:
        ValueError: bad device, non-positive steps or batch size.
    """
    from ppl_vae.models.image.betavae import BetaVAE
    from ppl_vae.models.image.gmvae import GMVAE
    from ppl_vae.models.image.mlvae import MLVAE
    from ppl_vae.models.image.ugvae import UGVAE

    smoke = bool(getattr(args, "smoke", False))
    steps = args.steps if args.steps is not None else (30 if smoke else 5000)
    if steps < 1 or args.batch_size < 2:
        raise ValueError("--steps must be >= 1 and --batch-size >= 2")
    device = resolve_device(args.device)
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    experiments = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    arch = getattr(args, "arch", "mlp")
    tsne = not getattr(args, "no_tsne", False)
    bs = args.batch_size
    ctx = _Context(args, out, device, steps, smoke)
    ctx.data = mnist_split(n_test=2000, seed=args.seed)
    train_x, train_y, test_x, test_y = ctx.data
    results: dict[str, Any] = {"config": {"experiments": experiments, "steps": steps, "batch_size": bs,
                                          "lr": args.lr, "device": str(device), "seed": args.seed, "arch": arch,
                                          "smoke": smoke}}

    def ugvae() -> LatentVariableModel:
        return ctx.train("ug-vae", lambda: UGVAE(arch=arch))

    if "interpolation" in experiments:
        model = ugvae()
        t0 = time.perf_counter()
        results["interpolation"] = {"figures": interpolation_grids(model, test_x, test_y, out, batch_size=bs,
                                                                   seed=args.seed)}
        ctx.timings["interpolation"] = time.perf_counter() - t0
    if "global" in experiments:
        model = ugvae()
        t0 = time.perf_counter()
        sizes = dict(n_series_per_kind=6, n_random=12, n_class_per_digit=4) if smoke else {}
        results["global"] = global_representation(model, test_x, test_y, out, batch_size=bs, seed=args.seed,
                                                  tsne=tsne and not smoke, **sizes)
        ctx.timings["global (encode + SVM + plots)"] = time.perf_counter() - t0
    if "domain" in experiments:
        t0 = time.perf_counter()
        results["domain"] = domain_alignment(out, steps, bs, n_batches=10 if smoke else 100, device=device,
                                             seed=args.seed, lr=args.lr, progress=ctx.progress,
                                             tsne=tsne and not smoke, model_kwargs={"arch": arch})
        ctx.timings["domain (train + encode)"] = time.perf_counter() - t0
    if "fid" in experiments:
        t0 = time.perf_counter()
        n_clf = 1000 if smoke else train_x.shape[0]
        clf = train_digit_classifier(train_x[:n_clf], train_y[:n_clf], epochs=1 if smoke else 3, seed=args.seed,
                                     device=device, progress=ctx.progress)
        with torch.no_grad():
            acc = float((clf(test_x.to(device)).argmax(-1).cpu() == test_y).float().mean())
        ctx.timings["digit classifier"] = time.perf_counter() - t0
        models = {"ug-vae": ugvae(),
                  "ml-vae": ctx.train("ml-vae", lambda: MLVAE(arch=arch)),
                  "beta-vae": ctx.train("beta-vae", lambda: BetaVAE(arch=arch, beta_kl=args.beta_kl)),
                  "gmvae": ctx.train("gmvae", lambda: GMVAE(arch=arch))}
        n_samples = 256 if smoke else 2000
        real = test_x[:n_samples]
        t0 = time.perf_counter()
        table = sample_quality(models, clf, real, n_samples, bs, args.seed,
                               reference_images=train_x[:n_samples], out_dir=out)
        ctx.timings["fid (sample + features)"] = time.perf_counter() - t0
        results["fid"] = {"table": table, "classifier_test_accuracy": acc,
                          "figures": {name: str(out / f"samples_{name}.png") for name in models}}
    results["losses"] = ctx.losses
    results["timings"] = ctx.timings
    _write_outputs(out, results)
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point: ``python -m ppl_vae.experiments.ugvae [options]`` (same options as the CLI subcommand)."""
    parser = add_arguments(argparse.ArgumentParser(prog="ppl-vae ugvae-experiment", description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    main()

"""Shared pieces of the UG-VAE experiments (Peis, Olmos, Artés-Rodríguez 2023): the MNIST split, the SVI loop,
figures (image grids, 2-D embeddings), markdown tables and the batch-level codes of a trained model.

Data: the 10,000 MNIST test images (LeCun et al. 1998), split once (seeded) into 8,000 training rows (models,
digit classifier) and 2,000 held-out rows (structured batches to encode, real images for the Fréchet distance).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from ppl_vae.models.base import Batch, LatentVariableModel
from ppl_vae.pipeline import resolve_device

__all__ = ["train_svi", "mnist_split", "save_image_grid", "save_figure", "markdown_table", "embedding_figures",
           "batch_codes"]


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
    """Seeded split of the MNIST test set (or the given ``images (N, 784)`` / ``labels (N,)``) into training and
    held-out rows.

    Returns:
        ``(train_x (N - n_test, 784), train_y, test_x (n_test, 784), test_y)``; images in ``[0, 1]``.

    Raises:
        ValueError: ``n_test`` not in ``1..N-1``.
    """
    from ppl_vae.data.batches import mnist_unless_given

    images, labels = mnist_unless_given(images, labels)
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
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out a ``matplotlib.figure.Figure`` and write it (PNG, 110 dpi) to ``path``, creating the folder.

    Returns:
        the written path.
    """
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
    return save_figure(fig, path)


def _embed(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D PCA or t-SNE embedding of ``(n, d)`` features."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(features)
    perplexity = float(min(30.0, max(2.0, (features.shape[0] - 1) / 3.0)))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(features)


def embedding_figures(features: np.ndarray, names: Sequence[str], out_dir: Path, stem: str, title: str,
                      seed: int, tsne: bool) -> dict[str, str]:
    """Scatter plots of a 2-D PCA (and, with ``tsne``, t-SNE) embedding of ``(n, d)`` features coloured by the
    ``n`` category ``names``, written to ``out_dir/<stem>_<method>.png``.

    Returns:
        ``{"pca": path[, "tsne": path]}``.
    """
    names = np.asarray(names)
    paths = {}
    for method in (["pca", "tsne"] if tsne else ["pca"]):
        emb = _embed(features, method, seed)
        groups = {n: emb[names == n] for n in dict.fromkeys(names.tolist())}
        paths[method] = str(_scatter(groups, out_dir / f"{stem}_{method}.png", f"{title} ({method.upper()})"))
    return paths


@torch.no_grad()
def batch_codes(model, batches: Sequence[Batch]) -> tuple[np.ndarray, np.ndarray]:
    """Batch-level codes of ``n`` batches: the posterior-mean global latent (``model.encode_global``) and the
    batch mean of the local posterior means (``model.encode_local``), on the model's device.

    Shapes: ``-> (beta (n, dim_beta), mean z (n, dim_z))``, NumPy.
    """
    device = next(model.parameters()).device
    betas, zbar = [], []
    for b in batches:
        b = b.to(device)
        betas.append(model.encode_global(b)[0].cpu())
        zbar.append(model.encode_local(b).mean(0).cpu())
    return torch.stack(betas).numpy(), torch.stack(zbar).numpy()

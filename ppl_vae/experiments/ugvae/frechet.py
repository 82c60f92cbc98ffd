"""Sample quality: Fréchet distance (Heusel et al. 2017) between generated and real MNIST images, computed on the
penultimate features of a small digit CNN trained here (the feature network is not Inception, so the numbers compare
models with each other, not with the FID values of Peis et al. 2023)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ppl_vae.experiments.ugvae.common import save_image_grid
from ppl_vae.models.base import LatentVariableModel
from ppl_vae.pipeline import resolve_device

__all__ = ["DigitClassifier", "train_digit_classifier", "frechet_distance", "sample_quality"]


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

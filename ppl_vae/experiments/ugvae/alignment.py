"""Domain alignment with the global latent (Peis, Olmos, Artés-Rodríguez 2023, domain-alignment figure, here with
two digit sources): a UG-VAE trained on single-source and mixed batches separates the batch source in beta."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ppl_vae.experiments.ugvae.classification import svm_accuracy_table
from ppl_vae.experiments.ugvae.common import batch_codes, embedding_figures, train_svi
from ppl_vae.models.base import Batch
from ppl_vae.pipeline import resolve_device

__all__ = ["domain_alignment"]


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
    """Domain alignment with the global latent (Peis et al. 2023, "CelebA vs FACES" figure, here with digits).

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
    beta, _ = batch_codes(model, batches)
    cats = np.array(cats)
    table = svm_accuracy_table(beta, cats, "source of batch (3)", "beta", seed)
    table += svm_accuracy_table(beta[cats != "mixed 50/50"], cats[cats != "mixed 50/50"], "source of batch (2)",
                                "beta", seed)
    figures = embedding_figures(beta, cats.tolist(), out_dir, "domain_beta",
                                 f"beta of {data.names[0]} / {data.names[1]} batches", seed, tsne)
    return {"table": table, "figures": figures, "sources": list(data.names),
            "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):]))}

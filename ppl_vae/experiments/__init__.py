"""Paper experiments that go beyond one model on one table (each module exposes ``add_arguments(parser)`` and
``run(args) -> dict`` for a ``ppl-vae`` subcommand).

- :mod:`ppl_vae.experiments.ugvae` (a package, one module per experiment): UG-VAE (Peis et al. 2023) on MNIST
  batches — interpolation grids, global representation of structured batches (SVM table), domain alignment,
  sample quality (Fréchet distance) against ML-VAE and β-VAE. CLI: ``ppl-vae ugvae-experiment``.

Submodules are imported on demand (``from ppl_vae.experiments import ugvae``) so that importing the package stays
cheap.
"""

__all__ = ["ugvae"]

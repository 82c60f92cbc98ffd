"""β-VAE for images (Higgins et al. 2017, "β-VAE: learning basic visual concepts with a constrained variational
framework"), the single-latent baseline of the UG-VAE paper (Peis et al. 2023, FID table).

Program::

    for i in plate("data", B):
        z_i ~ N(0, I)                       (log-density scaled by beta_kl)
        x_i | z_i ~ Bernoulli(logits = f(z_i))

Guide ``q(z_i | x_i) = N(mu(h(x_i)), sigma(h(x_i)))``, its log-density scaled by the same ``beta_kl`` with
``poutine.scale`` on the latent site only, so :class:`pyro.infer.Trace_ELBO` estimates
``E_q[log p(x|z)] - beta_kl * KL(q(z|x) || N(0, I))`` (Higgins et al. eq. 4). ``beta_kl = 1`` is the plain VAE.
The encoder/decoder are the ones every image model shares (:mod:`ppl_vae.models.image.image`).
"""
from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from ppl_vae.models.base import Batch, LatentVariableModel, TrainingStage
from ppl_vae.models.image.image import (LocalImageLatent, PixelScale, build_image_decoder, build_image_encoder, check_arch,
                                  pixel_likelihood)
from ppl_vae.nn import GaussianHead

__all__ = ["BetaVAE"]


class BetaVAE(LocalImageLatent, LatentVariableModel):
    """Image β-VAE: one Gaussian latent per datapoint with a KL weight ``beta_kl`` (Higgins et al. 2017, eq. 4).

    Args:
        x_dim: features per datapoint (784 for 28x28 images).
        dim_z: latent size.
        beta_kl: KL weight ``> 0`` (1 = VAE).
        arch, likelihood, hidden, pixel_scale: as in :class:`ppl_vae.models.image.ugvae.UGVAE`.

    Pyro sites in ``plate("data", B)``: ``z`` (event ``(dim_z,)``, scaled by ``beta_kl``), ``x`` (observed).

    Raises:
        ppl_vae.errors.UnknownNameError: unknown ``arch`` / ``likelihood``. ValueError: ``beta_kl <= 0`` or
        non-positive sizes.
    """

    name = "beta-vae"

    def __init__(self, x_dim: int = 784, dim_z: int = 10, beta_kl: float = 1.0, arch: str = "mlp",
                 likelihood: str = "bernoulli", hidden: int = 256, pixel_scale: Optional[float] = None):
        super().__init__(x_dim=x_dim, dim_z=dim_z, beta_kl=beta_kl, arch=arch, likelihood=likelihood,
                         hidden=hidden, pixel_scale=pixel_scale)
        check_arch(arch, likelihood, x_dim)
        if not beta_kl > 0:
            raise ValueError(f"beta_kl must be > 0 (poutine.scale needs a positive scale), got {beta_kl}")
        if min(dim_z, hidden) <= 0:
            raise ValueError("dim_z and hidden must be positive")
        self.x_dim, self.dim_z, self.beta_kl, self.likelihood = x_dim, dim_z, float(beta_kl), likelihood
        self.encoder = build_image_encoder(arch, x_dim, hidden)
        self.z_head = GaussianHead(hidden, dim_z)
        self.decoder = build_image_decoder(arch, dim_z, x_dim, hidden)
        self.pixel_scale = PixelScale(x_dim, pixel_scale) if likelihood == "gaussian" else None

    def model(self, batch: Batch) -> None:
        """p(x, z) for every row of ``batch.x (B, x_dim)``; the prior term is scaled by ``beta_kl``."""
        pyro.module("betavae", self)
        dev = batch.x.device
        with pyro.plate("data", batch.size, device=dev):
            with poutine.scale(scale=self.beta_kl):
                z = pyro.sample("z", dist.Normal(batch.x.new_zeros(self.dim_z), 1.0).to_event(1))
            sc = self.pixel_scale() if self.pixel_scale is not None else None
            pyro.sample("x", pixel_likelihood(self.decoder(z), batch.x_mask, self.likelihood, sc), obs=batch.x)

    def guide(self, batch: Batch) -> None:
        """q(z | x), its log-density scaled by ``beta_kl``."""
        pyro.module("betavae", self)
        loc, scale = self.z_head(self.encoder(batch.x))
        with pyro.plate("data", batch.size, device=batch.x.device), poutine.scale(scale=self.beta_kl):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def training_stages(self, steps: int, lr: float = 5e-3) -> list[TrainingStage]:
        """One ``Trace_ELBO`` stage."""
        import pyro.infer

        return [TrainingStage("elbo", self.model, self.guide, pyro.infer.Trace_ELBO(), steps, lr)]

    @torch.no_grad()
    def sample(self, num_batches: int, batch_size: int, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
        """Mean images of ``z ~ N(0, I)``. Shapes: ``-> (num_batches, batch_size, x_dim)``."""
        device = device or next(self.parameters()).device
        dtype = next(self.parameters()).dtype
        z = torch.randn(num_batches, batch_size, self.dim_z, generator=generator, device=device, dtype=dtype)
        return self.generate(z)

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

from dataclasses import dataclass
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from ppl_vae.models.base import Batch
from ppl_vae.models.image.image import ImageModel, ImageModelConfig, LocalImageLatent
from ppl_vae.nn import GaussianHead

__all__ = ["BetaVAE", "BetaVAEConfig"]


@dataclass
class BetaVAEConfig(ImageModelConfig):
    """Options of :class:`BetaVAE`.

    Attributes:
        dim_z: latent size (10).
        beta_kl: KL weight ``> 0`` (1 = VAE; Higgins et al. 2017, eq. 4).
        x_dim, arch, likelihood, hidden, pixel_scale: see :class:`~ppl_vae.models.image.image.ImageModelConfig`.
    """

    dim_z: int = 10
    beta_kl: float = 1.0


class BetaVAE(LocalImageLatent, ImageModel):
    """Image β-VAE: one Gaussian latent per datapoint with a KL weight ``beta_kl`` (Higgins et al. 2017, eq. 4).

    Args:
        config: a :class:`BetaVAEConfig` (or a dict of its options), or ``None`` for the defaults.
        **options: fields of :class:`BetaVAEConfig`, overriding ``config``: ``x_dim`` (784), ``dim_z`` (10),
            ``beta_kl`` (1.0), and ``arch``, ``likelihood``, ``hidden``, ``pixel_scale`` as in
            :class:`ppl_vae.models.image.ugvae.UGVAE`.

    Pyro sites in ``plate("data", B)``: ``z`` (event ``(dim_z,)``, scaled by ``beta_kl``), ``x`` (observed).

    Raises:
        TypeError: an unknown option, named. ppl_vae.errors.UnknownNameError: unknown ``arch`` / ``likelihood``.
        ValueError: ``beta_kl <= 0`` or non-positive sizes.
    """

    name = "beta-vae"
    Config = BetaVAEConfig

    def __init__(self, config: Optional[BetaVAEConfig] = None, **options: Any):
        super().__init__(config, **options)
        self.dim_z, self.beta_kl = self.cfg.dim_z, float(self.cfg.beta_kl)
        self.z_head = GaussianHead(self.cfg.hidden, self.dim_z)
        self.decoder = self.build_decoder(self.dim_z)

    def validate(self, cfg: BetaVAEConfig) -> None:
        """Raises ValueError unless ``beta_kl > 0``."""
        if not cfg.beta_kl > 0:
            raise ValueError(f"beta_kl must be > 0 (poutine.scale needs a positive scale), got {cfg.beta_kl}")

    def model(self, batch: Batch) -> None:
        """p(x, z) for every row of ``batch.x (B, x_dim)``; the prior term is scaled by ``beta_kl``."""
        pyro.module(self.pyro_name, self)
        with pyro.plate("data", batch.size, device=batch.x.device):
            with poutine.scale(scale=self.beta_kl):
                z = pyro.sample("z", dist.Normal(batch.x.new_zeros(self.dim_z), 1.0).to_event(1))
            pyro.sample("x", self.pixel_distribution(self.decoder(z), batch.x_mask), obs=batch.x)

    def guide(self, batch: Batch) -> None:
        """q(z | x), its log-density scaled by ``beta_kl``."""
        pyro.module(self.pyro_name, self)
        loc, scale = self.z_head(self.encoder(batch.x))
        with pyro.plate("data", batch.size, device=batch.x.device), poutine.scale(scale=self.beta_kl):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def sample(self, num_batches: int, batch_size: int, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
        """Mean images of ``z ~ N(0, I)``. Shapes: ``-> (num_batches, batch_size, x_dim)``."""
        device, dtype = self._device_dtype(device)
        z = torch.randn(num_batches, batch_size, self.dim_z, generator=generator, device=device, dtype=dtype)
        return self.generate(z)

"""GMVAE: a VAE with a Gaussian-mixture prior and an enumerated component, no global latent (the UG-VAE baseline
of Peis et al. 2023, after Dilokthanakul et al. 2016, "Deep unsupervised clustering with Gaussian mixture VAEs").

Generative model (per datapoint; no variable is shared across the batch)::

    for i in plate("data", B):
        d_i ~ Cat(1/K)                                 enumerated
        z_i | d_i ~ N(mu_{d_i}, diag sigma_{d_i}^2)    K learned component means / scales
        x_i | z_i ~ Bernoulli(logits = f(z_i))         (or Gaussian)

Guide: ``q(z_i | x_i) q(d_i | z_i)`` with ``q(d_i | z_i) = Cat(softmax(MLP_tanh(z_i)))`` enumerated on the guide
side, so :class:`pyro.infer.TraceEnum_ELBO` computes exactly
``E_q[log p(x|z)] - KL(q(d|z) || Cat(1/K)) - E_q(z)[log q(z|x) - sum_k q(k|z) log p(z|k)]`` — UG-VAE's ELBO
without beta. This is UG-VAE with beta removed: the component parameters are free parameters instead of networks of
beta (Dilokthanakul et al.'s extra per-point latent ``w`` is omitted; state this when comparing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn
import torch.nn.functional as F

from ppl_vae.models.base import Batch
from ppl_vae.models.image.image import ImageModel, ImageModelConfig, LocalImageLatent
from ppl_vae.nn import MLP, GaussianHead

__all__ = ["GMVAE", "GMVAEConfig"]


@dataclass
class GMVAEConfig(ImageModelConfig):
    """Options of :class:`GMVAE`.

    Attributes:
        dim_z: latent size (10).
        num_components: K mixture components (10).
        x_dim, arch, likelihood, hidden, pixel_scale: see :class:`~ppl_vae.models.image.image.ImageModelConfig`.
    """

    dim_z: int = 10
    num_components: int = 10


class GMVAE(LocalImageLatent, ImageModel):
    """Gaussian-mixture-prior VAE with an enumerated component (Dilokthanakul et al. 2016, simplified; the GMVAE
    baseline of the UG-VAE paper).

    Args:
        config: a :class:`GMVAEConfig` (or a dict of its options), or ``None`` for the defaults.
        **options: fields of :class:`GMVAEConfig`, overriding ``config``: ``x_dim`` (784), ``dim_z`` (10),
            ``num_components`` (K = 10), ``arch`` (``"mlp"`` or ``"conv"``, see :mod:`ppl_vae.models.image.image`),
            ``likelihood`` (``"bernoulli"`` or ``"gaussian"``), ``hidden`` (256), ``pixel_scale`` (fixed Gaussian
            scale, or ``None`` to learn it; Gaussian likelihood only).

    Pyro sites in ``plate("data", B)``: ``d`` (enumerated), ``z`` (event ``(dim_z,)``), ``x`` (observed).

    Raises:
        TypeError: an unknown option, named. ppl_vae.errors.UnknownNameError: unknown ``arch`` / ``likelihood``.
        ValueError: non-positive sizes.
    """

    name = "gmvae"
    Config = GMVAEConfig
    enumerated = True

    def __init__(self, config: Optional[GMVAEConfig] = None, **options: Any):
        super().__init__(config, **options)
        cfg = self.cfg
        self.dim_z, self.num_components = cfg.dim_z, cfg.num_components
        self.z_head = GaussianHead(cfg.hidden, cfg.dim_z)
        self.d_net = MLP(cfg.dim_z, [cfg.hidden], cfg.num_components, activation="tanh")
        # spread the initial component means so that the components are distinguishable from the start
        self.component_loc = nn.Parameter(torch.randn(cfg.num_components, cfg.dim_z))
        self.component_raw_scale = nn.Parameter(torch.zeros(cfg.num_components, cfg.dim_z))
        self.decoder = self.build_decoder(cfg.dim_z)

    def component_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of the K prior components, each ``(K, dim_z)``; ``scale = softplus(raw) + 1e-3``."""
        return self.component_loc, F.softplus(self.component_raw_scale) + 1e-3

    def model(self, batch: Batch) -> None:
        """p(x, z, d) = p(x | z) p(z | d) Cat(d; 1/K) for every row of ``batch.x (B, x_dim)``."""
        pyro.module(self.pyro_name, self)
        loc, scale = self.component_params()
        with pyro.plate("data", batch.size, device=batch.x.device):
            d = pyro.sample("d", dist.Categorical(logits=batch.x.new_zeros(self.num_components)),
                            infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(loc[d], scale[d]).to_event(1))
            pyro.sample("x", self.pixel_distribution(self.decoder(z), batch.x_mask), obs=batch.x)

    def guide(self, batch: Batch) -> None:
        """q(z | x) q(d | z), ``d`` enumerated under q(d | z)."""
        pyro.module(self.pyro_name, self)
        loc, scale = self.z_head(self.encoder(batch.x))
        with pyro.plate("data", batch.size, device=batch.x.device):
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            pyro.sample("d", dist.Categorical(logits=self.d_net(z)), infer={"enumerate": "parallel"})

    @torch.no_grad()
    def sample(self, num_batches: int, batch_size: int, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
        """Ancestral mean images: ``d ~ Cat(1/K)``, ``z ~ p(z | d)``. Shapes: ``-> (num_batches, batch_size,
        x_dim)``."""
        device = device or self.component_loc.device
        loc, scale = self.component_params()
        d = torch.randint(self.num_components, (num_batches, batch_size), generator=generator, device=device)
        eps = torch.randn(num_batches, batch_size, self.dim_z, generator=generator, device=device, dtype=loc.dtype)
        z = loc[d] + scale[d] * eps
        return self.generate(z)

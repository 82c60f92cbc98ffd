"""ML-VAE: the Multi-Level VAE for grouped observations (Bouchacourt, Tomioka, Nowozin, AAAI 2018), the grouped
baseline of the UG-VAE paper (Peis et al. 2023).

Program for a batch whose rows fall in G groups (``batch.group``; the whole batch is one group when it is ``None``,
as in the UG-VAE reference code, where group supervision comes only from how batches are built)::

    for g in plate("groups", G):
        c_g ~ N(0, I)                              content (group) latent, shared by the members of group g
    for i in plate("data", B):
        s_i ~ N(0, I)                              style (per-point) latent
        x_i | s_i, c_{g(i)} ~ Bernoulli(logits = f([s_i, c_{g(i)}]))

Guide: ``q(s_i | x_i)`` Gaussian, and ``q(c_g | X_g)`` the group-evidence accumulation of Bouchacourt et al. (eq. 6):
the normalised product of per-member Gaussian experts ``N(mu(x_i), sigma(x_i))``, ``i in g`` (with the N(0, I)
prior expert when ``prior_expert``; the paper's product has no prior factor, ``prior_expert=False``).
Loss: :class:`pyro.infer.Trace_ELBO` — the content KL is counted once per group, the style KL once per point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch

from ppl_vae.models.base import Batch
from ppl_vae.models.image.image import ImageModel, ImageModelConfig, mean_image
from ppl_vae.models.image.ugvae import concat_global, product_of_gaussian_experts
from ppl_vae.nn import GaussianHead

__all__ = ["MLVAE", "MLVAEConfig", "group_index"]


def group_index(batch: Batch) -> tuple[torch.Tensor, int]:
    """Map ``batch.group`` to consecutive group indices.

    Returns:
        ``(index (B,) long in 0..G-1, G)``; all zeros and ``G = 1`` when ``batch.group`` is ``None``.

    Raises:
        ValueError: ``batch.group`` not of shape ``(B,)``.
    """
    if batch.group is None:
        return torch.zeros(batch.size, dtype=torch.long, device=batch.x.device), 1
    if batch.group.shape != (batch.size,):
        raise ValueError(f"Batch.group must have shape ({batch.size},), got {tuple(batch.group.shape)}")
    uniq, inverse = torch.unique(batch.group, return_inverse=True)
    return inverse.to(batch.x.device), int(uniq.numel())


@dataclass
class MLVAEConfig(ImageModelConfig):
    """Options of :class:`MLVAE`.

    Attributes:
        dim_style: per-point latent size (10, like UG-VAE's ``dim_z``).
        dim_content: group latent size (20, like UG-VAE's ``dim_beta``).
        prior_expert: include the N(0, I) prior expert in the group product (``True``; Bouchacourt et al.'s
            eq. 6 has none: ``False``).
        x_dim, arch, likelihood, hidden, pixel_scale: see :class:`~ppl_vae.models.image.image.ImageModelConfig`.
    """

    dim_style: int = 10
    dim_content: int = 20
    prior_expert: bool = True


class MLVAE(ImageModel):
    """Multi-Level VAE (Bouchacourt et al. 2018) with a content latent per group and a style latent per point.

    Args:
        config: a :class:`MLVAEConfig` (or a dict of its options), or ``None`` for the defaults.
        **options: fields of :class:`MLVAEConfig`, overriding ``config``: ``x_dim`` (784), ``dim_style`` (10),
            ``dim_content`` (20), ``prior_expert`` (``True``), and ``arch``, ``likelihood``, ``hidden``,
            ``pixel_scale`` as in :class:`ppl_vae.models.image.ugvae.UGVAE`.

    Pyro sites: in ``plate("groups", G)``: ``content`` (event ``(dim_content,)``); in ``plate("data", B)``:
    ``style`` (event ``(dim_style,)``) and ``x`` (observed).

    Raises:
        TypeError: an unknown option, named. ppl_vae.errors.UnknownNameError: unknown ``arch`` / ``likelihood``.
        ValueError: non-positive sizes.
    """

    name = "ml-vae"
    Config = MLVAEConfig

    def __init__(self, config: Optional[MLVAEConfig] = None, **options: Any):
        super().__init__(config, **options)
        cfg = self.cfg
        self.dim_style, self.dim_content, self.prior_expert = cfg.dim_style, cfg.dim_content, cfg.prior_expert
        self.style_head = GaussianHead(cfg.hidden, cfg.dim_style)
        self.content_head = GaussianHead(cfg.hidden, cfg.dim_content)
        self.decoder = self.build_decoder(cfg.dim_style + cfg.dim_content)

    def content_posterior(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(c_g | X_g) for every group of the batch (product of the members' experts).

        Returns:
            ``(loc (G, dim_content), scale (G, dim_content), index (B,))``.
        """
        idx, num_groups = group_index(batch)
        loc_i, scale_i = self.content_head(self.encoder(batch.x))
        loc, scale = product_of_gaussian_experts(loc_i, scale_i, 1.0 if self.prior_expert else 0.0,
                                                 group=idx, num_groups=num_groups)
        return loc, scale, idx

    def model(self, batch: Batch) -> None:
        """p(X, S, C) = prod_g p(c_g) prod_i p(s_i) p(x_i | s_i, c_{g(i)})."""
        pyro.module(self.pyro_name, self)
        dev = batch.x.device
        idx, num_groups = group_index(batch)
        with pyro.plate("groups", num_groups, device=dev):
            c = pyro.sample("content", dist.Normal(batch.x.new_zeros(self.dim_content), 1.0).to_event(1))
        with pyro.plate("data", batch.size, device=dev):
            s = pyro.sample("style", dist.Normal(batch.x.new_zeros(self.dim_style), 1.0).to_event(1))
            pyro.sample("x", self.pixel_distribution(self.decoder(torch.cat([s, c[idx]], dim=-1)), batch.x_mask),
                        obs=batch.x)

    def guide(self, batch: Batch) -> None:
        """q(S | X) q(C | X): per-point style posterior and per-group product-of-experts content posterior."""
        pyro.module(self.pyro_name, self)
        dev = batch.x.device
        h = self.encoder(batch.x)
        s_loc, s_scale = self.style_head(h)
        c_loc, c_scale, _ = self.content_posterior(batch)
        with pyro.plate("groups", c_loc.shape[0], device=dev):
            pyro.sample("content", dist.Normal(c_loc, c_scale).to_event(1))
        with pyro.plate("data", batch.size, device=dev):
            pyro.sample("style", dist.Normal(s_loc, s_scale).to_event(1))

    @torch.no_grad()
    def encode_local(self, batch: Batch) -> torch.Tensor:
        """Posterior mean of the style latent. Shapes: ``(B, x_dim) -> (B, dim_style)``."""
        return self.style_head(self.encoder(batch.x))[0]

    @torch.no_grad()
    def encode_global(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(c | X) with the whole batch as one group. Shapes: ``-> ((dim_content,),) * 2``."""
        loc, scale, _ = self.content_posterior(batch.replace(group=None))
        return loc[0], scale[0]

    @torch.no_grad()
    def generate(self, style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """Mean image of p(x | s, c). Shapes: ``style (..., B, dim_style)``, ``content (dim_content,)`` or
        broadcastable ``(..., B, dim_content)`` -> ``(..., B, x_dim)``."""
        return mean_image(self.decoder(concat_global(style, content)), self.likelihood)

    @torch.no_grad()
    def sample(self, num_batches: int, batch_size: int, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
        """Mean images with one content code per batch (``c ~ N(0, I)``) and ``s_i ~ N(0, I)``.

        Shapes: ``-> (num_batches, batch_size, x_dim)``.
        """
        device, dtype = self._device_dtype(device)
        c = torch.randn(num_batches, 1, self.dim_content, generator=generator, device=device, dtype=dtype)
        s = torch.randn(num_batches, batch_size, self.dim_style, generator=generator, device=device, dtype=dtype)
        return self.generate(s, c)

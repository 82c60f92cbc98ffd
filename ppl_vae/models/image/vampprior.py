"""VAE with a VampPrior (Tomczak & Welling 2018, "VAE with a VampPrior", AISTATS), and the standard-normal baseline
on the same networks (``prior="normal"``).

Generative model (per datapoint)::

    for i in plate("data", B):
        z_i ~ p_λ(z) = (1/K) Σ_k q_φ(z | u_k)            (Tomczak & Welling eq. 9), or N(0, I)
        x_i | z_i ~ Bernoulli(logits = f(z_i))

The prior is a mixture of the *encoder's* Gaussians at K learned pseudo-inputs ``u_k = hardtanh(w_k, 0, 1)``
(pixels in ``[0, 1]``, as in the authors' code; ``w_k`` initialised ``N(pseudo_init_mean, pseudo_init_std)`` or
from training images with :meth:`VampPriorVAE.init_pseudo_inputs`), written as one ``dist.MixtureSameFamily``
site ``z``: a single continuous latent, so any Pyro inference (``Trace_ELBO``, IW bounds, HMC) treats it as usual.
The ELBO's prior term ``E_q[log p_λ(z)]`` is estimated by sampling (no closed-form KL), and the prior's gradient
reaches both the pseudo-inputs and the shared encoder. Guide: ``q_φ(z | x) = N(μ(h(x)), σ(h(x)))``.
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
from ppl_vae.nn import GaussianHead

__all__ = ["VampPriorVAE", "VampPriorVAEConfig", "PRIORS"]

#: the priors :class:`VampPriorVAE` offers
PRIORS = ("vamp", "normal")


@dataclass
class VampPriorVAEConfig(ImageModelConfig):
    """Options of :class:`VampPriorVAE`.

    Attributes:
        dim_z: latent size (10). num_pseudo: K pseudo-inputs (100).
        prior: ``"vamp"`` (eq. 9) or ``"normal"`` (N(0, I), the baseline on the same encoder/decoder).
        pseudo_init_mean, pseudo_init_std: initialisation of the pseudo-input pixels (0.5, 0.1).
        x_dim, arch, likelihood, hidden, pixel_scale: see :class:`~ppl_vae.models.image.image.ImageModelConfig`.
    """

    dim_z: int = 10
    num_pseudo: int = 100
    prior: str = "vamp"
    pseudo_init_mean: float = 0.5
    pseudo_init_std: float = 0.1


class VampPriorVAE(LocalImageLatent, ImageModel):
    """VAE whose prior is the aggregated variational posterior at learned pseudo-inputs (Tomczak & Welling 2018).

    Args:
        config: a :class:`VampPriorVAEConfig` (or a dict of its options), or ``None``.
        **options: fields of :class:`VampPriorVAEConfig`, overriding ``config``.

    Pyro sites in ``plate("data", B)``: ``z`` (event ``(dim_z,)``, a ``MixtureSameFamily`` under the VampPrior),
    ``x`` (observed, masked).

    Raises:
        TypeError: an unknown option. ppl_vae.errors.UnknownNameError: unknown ``prior``. ValueError: non-positive
        sizes or ``pseudo_init_std < 0``.
    """

    name = "vampprior"
    Config = VampPriorVAEConfig

    def __init__(self, config: Optional[VampPriorVAEConfig] = None, **options: Any):
        super().__init__(config, **options)
        cfg = self.cfg
        self.dim_z = cfg.dim_z
        self.z_head = GaussianHead(cfg.hidden, cfg.dim_z)
        self.decoder = self.build_decoder(cfg.dim_z)
        self.pseudo_raw = (nn.Parameter(torch.randn(cfg.num_pseudo, cfg.x_dim) * cfg.pseudo_init_std
                                        + cfg.pseudo_init_mean) if cfg.prior == "vamp" else None)

    def validate(self, cfg: VampPriorVAEConfig) -> None:
        """Raises UnknownNameError for a ``prior`` not in :data:`PRIORS`, ValueError for ``pseudo_init_std < 0``."""
        from ppl_vae.errors import UnknownNameError

        if cfg.prior not in PRIORS:
            raise UnknownNameError("prior", cfg.prior, PRIORS)
        if cfg.pseudo_init_std < 0:
            raise ValueError(f"pseudo_init_std must be >= 0, got {cfg.pseudo_init_std}")

    @property
    def pseudo_inputs(self) -> Optional[torch.Tensor]:
        """``(K, x_dim)`` pseudo-inputs ``hardtanh(w, 0, 1)`` in ``[0, 1]`` (``None`` for the normal prior)."""
        return None if self.pseudo_raw is None else F.hardtanh(self.pseudo_raw, 0.0, 1.0)

    @torch.no_grad()
    def init_pseudo_inputs(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                           margin: float = 0.05) -> None:
        """Set the pseudo-inputs to K random rows of ``images (N, x_dim)``, squeezed into ``[margin, 1 - margin]``
        so that hardtanh passes gradients. Raises ValueError: normal prior, or shape/size mismatch."""
        if self.pseudo_raw is None:
            raise ValueError("init_pseudo_inputs needs prior='vamp'")
        if images.dim() != 2 or images.shape[1] != self.x_dim or images.shape[0] < self.cfg.num_pseudo:
            raise ValueError(f"images must be (N >= {self.cfg.num_pseudo}, {self.x_dim}), got {tuple(images.shape)}")
        rows = torch.randperm(images.shape[0], generator=generator)[:self.cfg.num_pseudo]
        self.pseudo_raw.copy_(margin + (1 - 2 * margin) * images[rows].to(self.pseudo_raw))

    def prior(self, like: torch.Tensor) -> dist.TorchDistribution:
        """p(z) with event ``(dim_z,)`` and batch shape ``()`` on ``like``'s device/dtype: the uniform mixture of
        ``q(z | u_k)`` (Tomczak & Welling eq. 9) or N(0, I)."""
        if self.pseudo_raw is None:
            return dist.Normal(like.new_zeros(self.dim_z), 1.0).to_event(1)
        loc, scale = self.z_head(self.encoder(self.pseudo_inputs))                     # (K, dim_z) each
        return dist.MixtureSameFamily(dist.Categorical(logits=loc.new_zeros(loc.shape[0])),
                                      dist.Normal(loc, scale).to_event(1))

    def model(self, batch: Batch) -> None:
        """p(x, z) = p(x | z) p_λ(z) for every row of ``batch.x (B, x_dim)``."""
        pyro.module(self.pyro_name, self)
        prior = self.prior(batch.x)
        with pyro.plate("data", batch.size, device=batch.x.device):
            z = pyro.sample("z", prior)
            pyro.sample("x", self.pixel_distribution(self.decoder(z), batch.x_mask), obs=batch.x)

    def guide(self, batch: Batch) -> None:
        """q(z | x) = N(μ(h(x)), σ(h(x)))."""
        pyro.module(self.pyro_name, self)
        loc, scale = self.z_head(self.encoder(batch.x))
        with pyro.plate("data", batch.size, device=batch.x.device):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mean images of ``z ~ p(z)`` (a uniform pseudo-input ``k``, then ``z ~ q(z | u_k)``).
        Shapes: ``-> (n, x_dim)`` in ``(0, 1)`` (Bernoulli)."""
        device, dtype = self._device_dtype(None)
        eps = torch.randn(n, self.dim_z, generator=generator, device=device, dtype=dtype)
        if self.pseudo_raw is None:
            return self.generate(eps)
        loc, scale = self.z_head(self.encoder(self.pseudo_inputs))
        k = torch.randint(loc.shape[0], (n,), generator=generator, device=device)
        return self.generate(loc[k] + scale[k] * eps)

"""Conditional VAE (Sohn, Lee & Yan 2015, "Learning Structured Output Representation using Deep Conditional
Generative Models", NeurIPS): a VAE whose generative model and guide are both conditioned on an observed class c.

Program (per datapoint; c = ``batch.y`` is observed for every row)::

    for i in plate("data", B):
        z_i ~ N(0, I)                                   (Sohn et al. use p(z | x) with x the input; here the
                                                         "input" is the class, so the prior is N(0, I))
        x_i | z_i, c_i ~ Bernoulli(logits = f([z_i, onehot(c_i)]))     (or Gaussian)

Guide (recognition network) ``q(z_i | x_i, c_i) = N(mu, sigma)([h(x_i), onehot(c_i)])``, so
:class:`pyro.infer.Trace_ELBO` estimates the conditional ELBO
``E_q[log p(x | z, c)] - KL(q(z | x, c) || N(0, I))`` (Sohn et al. eq. 4 with a class-independent prior).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from ppl_vae.errors import PplVaeError
from ppl_vae.models.base import Batch
from ppl_vae.models.image.image import ImageModel, ImageModelConfig, mean_image
from ppl_vae.nn import GaussianHead

__all__ = ["CVAE", "CVAEConfig", "class_codes", "with_onehot"]


def class_codes(batch: Batch, num_classes: int, owner: str) -> torch.Tensor:
    """The observed class of every row: ``batch.y (B, 1)`` float codes -> ``(B,)`` long in ``0..num_classes-1``.

    Raises:
        PplVaeError: ``batch.y`` is ``None``, ``y_mask`` is not all ``True``, ``y`` is not ``(B, 1)``, or a code is
            not an integer in ``0..num_classes-1``.
    """
    if batch.y is None or batch.y_mask is None:
        raise PplVaeError(f"{owner} conditions on the class: the batch has no label (batch.y is None)")
    if batch.y.dim() != 2 or batch.y.shape[-1] != 1:
        raise PplVaeError(f"{owner}: batch.y must be (B, 1) class codes, got {tuple(batch.y.shape)}")
    if not bool(batch.y_mask.all()):
        raise PplVaeError(f"{owner} conditions on the class: {int((~batch.y_mask).sum())} row(s) of the batch have no "
                          "observed label (y_mask False); use a semi-supervised model such as 'm2' for those")
    c = batch.y[:, 0].round().long()
    if bool(((c < 0) | (c >= num_classes) | (c.to(batch.y.dtype) != batch.y[:, 0])).any()):
        raise PplVaeError(f"{owner}: batch.y must hold integer class codes in 0..{num_classes - 1}")
    return c


def with_onehot(h: torch.Tensor, c: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[h, onehot(c)]`` broadcast over leading (particle / enumeration) dims.

    Shapes: ``h (..., H)``, ``c (...)`` long -> ``(..., H + num_classes)``.
    """
    onehot = F.one_hot(c, num_classes).to(h.dtype)
    lead = torch.broadcast_shapes(h.shape[:-1], onehot.shape[:-1])
    return torch.cat([h.expand(*lead, h.shape[-1]), onehot.expand(*lead, num_classes)], -1)


@dataclass
class CVAEConfig(ImageModelConfig):
    """Options of :class:`CVAE`.

    Attributes:
        dim_z: latent size (10).
        num_classes: K classes of the condition c (10 for MNIST).
        x_dim, arch, likelihood, hidden, pixel_scale, kl_schedule, kl_warmup, kl_cycles, kl_ratio: see
            :class:`~ppl_vae.models.image.image.ImageModelConfig`.
    """

    dim_z: int = 10
    num_classes: int = 10


class CVAE(ImageModel):
    """Class-conditional VAE p(x | z, c) p(z) with guide q(z | x, c) (Sohn, Lee & Yan 2015, NeurIPS).

    Args:
        config: a :class:`CVAEConfig` (or a dict of its options), or ``None`` for the defaults.
        **options: fields of :class:`CVAEConfig`, overriding ``config``: ``dim_z`` (10), ``num_classes`` (10) and
            ``x_dim``, ``arch``, ``likelihood``, ``hidden``, ``pixel_scale``, ``kl_*`` (see
            :mod:`ppl_vae.models.image.image`).

    Pyro sites in ``plate("data", B)``: ``z`` (event ``(dim_z,)``), ``x`` (observed). The class is an input, not a
    site: every row of a batch must carry an observed label ``batch.y (B, 1)`` (class code as a float).

    Raises:
        TypeError: an unknown option, named. ppl_vae.errors.UnknownNameError: unknown ``arch`` / ``likelihood``.
        ValueError: non-positive sizes. PplVaeError (a ValueError): from ``model`` / ``guide`` on a batch with a
            missing or invalid label (:func:`class_codes`).
    """

    name = "cvae"
    Config = CVAEConfig

    def __init__(self, config: Optional[CVAEConfig] = None, **options: Any):
        super().__init__(config, **options)
        self.dim_z, self.num_classes = self.cfg.dim_z, self.cfg.num_classes
        self.z_head = GaussianHead(self.cfg.hidden + self.num_classes, self.dim_z)   # q(z | x, c)
        self.decoder = self.build_decoder(self.dim_z + self.num_classes)              # p(x | z, c)

    def model(self, batch: Batch) -> None:
        """p(x, z | c) = p(x | z, c) N(z; 0, I) for every row of ``batch.x (B, x_dim)``, ``c`` from ``batch.y``."""
        pyro.module(self.pyro_name, self)
        c = class_codes(batch, self.num_classes, type(self).__name__)
        with pyro.plate("data", batch.size, device=batch.x.device):
            z = pyro.sample("z", dist.Normal(batch.x.new_zeros(self.dim_z), 1.0).to_event(1))
            out = self.decoder(with_onehot(z, c, self.num_classes))
            pyro.sample("x", self.pixel_distribution(out, batch.x_mask), obs=batch.x)

    def guide(self, batch: Batch) -> None:
        """q(z | x, c) = N(mu, sigma)([h(x), onehot(c)])."""
        pyro.module(self.pyro_name, self)
        c = class_codes(batch, self.num_classes, type(self).__name__)
        loc, scale = self.z_head(with_onehot(self.encoder(batch.x), c, self.num_classes))
        with pyro.plate("data", batch.size, device=batch.x.device):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def generate(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Mean image of p(x | z, c). Shapes: ``z (..., dim_z)``, ``c (...)`` long -> ``(..., x_dim)``."""
        return mean_image(self.decoder(with_onehot(z, c.long(), self.num_classes)), self.likelihood)

    @torch.no_grad()
    def sample(self, c: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Conditional mean images with ``z ~ N(0, I)``: ``c (N,)`` long classes -> ``(N, x_dim)``.

        Raises:
            ValueError: ``c`` not 1-D or a class outside ``0..num_classes-1``.
        """
        if c.dim() != 1 or bool(((c < 0) | (c >= self.num_classes)).any()):
            raise ValueError(f"c must be (N,) classes in 0..{self.num_classes - 1}, got shape {tuple(c.shape)}")
        device, dtype = self._device_dtype(None)
        z = torch.randn(c.shape[0], self.dim_z, generator=generator, device=device, dtype=dtype)
        return self.generate(z, c.to(device))

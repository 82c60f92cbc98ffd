"""Multimodal VAE with a product-of-experts posterior (MVAE; Wu & Goodman 2018, "Multimodal Generative Models for
Scalable Weakly-Supervised Learning", NeurIPS) over two modalities: an image and its class label.

Generative model (per datapoint)::

    for i in plate("data", B):
        z_i ~ N(0, I)
        x_i | z_i ~ Bernoulli(logits = f(z_i))          masked: 0 when the image is absent (x_mask all False)
        y_i | z_i ~ Cat(softmax(g(z_i)))                masked by y_mask; log-density scaled by label_weight

Guide (Wu & Goodman §2, eq. 3-4): ``q(z | observed) ∝ p(z) Π_{m observed} q_m(z | x_m)``, a product of Gaussian
experts including the prior expert N(0, I): precision ``T = 1 + Σ_m o_m / σ_m²`` and mean
``μ = (Σ_m o_m μ_m / σ_m²) / T`` with ``o_m ∈ {0, 1}`` the row's modality indicator (vectorised over rows).

Training (``subsample_elbo=True``, Wu & Goodman §3): the ELBO of the paired modalities plus the ELBO of each
modality alone, ``ELBO(x, y) + ELBO(x) + ELBO(y)``, computed as one ``Trace_ELBO`` over three masked copies of the
batch (rows keep only the terms their observed modalities allow, so an unpaired row contributes its own ELBO once).
The label likelihood is up-weighted by ``label_weight`` (the per-modality weights λ_i of Wu & Goodman's weighted
ELBO, §2; 50 for the label is the MNIST setting of the authors' public code, not a number stated in the paper).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn

from ppl_vae.models.base import Batch, TrainingStage
from ppl_vae.models.image.image import ImageModel, ImageModelConfig, mean_image
from ppl_vae.nn import MLP, GaussianHead

__all__ = ["PoEVAE", "PoEVAEConfig", "product_of_experts"]


@dataclass
class PoEVAEConfig(ImageModelConfig):
    """Options of :class:`PoEVAE`.

    Attributes:
        dim_z: latent size (10). num_classes: K label classes (10).
        label_weight: λ ``> 0`` scaling the label log-likelihood in training (50, the MNIST setting of Wu & Goodman's public code).
        subsample_elbo: train on ``ELBO(x, y) + ELBO(x) + ELBO(y)`` (True) or on the observed-modality ELBO only.
        x_dim, arch, likelihood, hidden, pixel_scale: see :class:`~ppl_vae.models.image.image.ImageModelConfig`.
    """

    dim_z: int = 10
    num_classes: int = 10
    label_weight: float = 50.0
    subsample_elbo: bool = True


def product_of_experts(locs: torch.Tensor, scales: torch.Tensor, present: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Product of the N(0, I) prior expert and the present Gaussian experts (Wu & Goodman 2018, §2).

    Args:
        locs, scales: ``(M, ..., D)`` means and standard deviations (``> 0``) of M experts.
        present: ``(M, ..., 1)`` (or broadcastable) bool/0-1, whether expert m is in the product for that row.

    Returns:
        ``(loc, scale)`` each ``(..., D)``: ``T = 1 + Σ o_m σ_m⁻²``, ``loc = Σ o_m μ_m σ_m⁻² / T``,
        ``scale = T^-1/2``.
    """
    precision = present.to(locs.dtype) * scales.pow(-2)
    total = 1.0 + precision.sum(0)
    return (precision * locs).sum(0) / total, total.rsqrt()


class PoEVAE(ImageModel):
    """MVAE on (image, label) pairs with any modality missing per row (Wu & Goodman 2018).

    Args:
        config: a :class:`PoEVAEConfig` (or a dict of its options), or ``None``.
        **options: fields of :class:`PoEVAEConfig`, overriding ``config``.

    Pyro sites in ``plate("data", B)``: ``z`` (event ``(dim_z,)``), ``x`` and ``y`` (observed, masked).
    ``batch.y`` is ``(B, 1)`` float class codes in ``0..num_classes-1``; a row's image is absent when its
    ``x_mask`` row is all False.

    Raises:
        TypeError: an unknown option. ValueError: non-positive sizes, ``num_classes < 2`` or ``label_weight <= 0``.
    """

    name = "poe-vae"
    Config = PoEVAEConfig

    def __init__(self, config: Optional[PoEVAEConfig] = None, **options: Any):
        super().__init__(config, **options)
        cfg = self.cfg
        self.dim_z, self.num_classes = cfg.dim_z, cfg.num_classes
        self.image_expert = GaussianHead(cfg.hidden, cfg.dim_z)                     # q(z | x) on self.encoder
        self.label_encoder = nn.Sequential(nn.Embedding(cfg.num_classes, cfg.hidden), nn.ReLU())
        self.label_expert = GaussianHead(cfg.hidden, cfg.dim_z)                     # q(z | y)
        self.decoder = self.build_decoder(cfg.dim_z)                                # p(x | z)
        self.label_decoder = MLP(cfg.dim_z, [cfg.hidden], cfg.num_classes)          # p(y | z) logits

    def validate(self, cfg: PoEVAEConfig) -> None:
        """Raises ValueError unless ``num_classes >= 2`` and ``label_weight > 0``."""
        if cfg.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {cfg.num_classes}")
        if not cfg.label_weight > 0:
            raise ValueError(f"label_weight must be > 0, got {cfg.label_weight}")

    def _check(self, batch: Batch) -> None:
        if batch.y is None or batch.y.shape != (batch.size, 1):
            raise ValueError(f"PoEVAE needs batch.y of shape (B, 1) = ({batch.size}, 1) (label codes, y_mask for "
                             f"missing ones), got {None if batch.y is None else tuple(batch.y.shape)}")

    def posterior(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of the PoE ``q(z | observed modalities)``, each ``(B, dim_z)`` (the prior N(0, I)
        for a row with neither modality). Raises ValueError: ``batch.y`` missing or not ``(B, 1)``."""
        self._check(batch)
        has_x = batch.x_mask.any(-1, keepdim=True)
        image = self.image_expert(self.encoder(batch.x * batch.x_mask))
        label = self.label_expert(self.label_encoder(batch.y[:, 0].long().clamp(0, self.num_classes - 1)))
        return product_of_experts(torch.stack([image[0], label[0]]), torch.stack([image[1], label[1]]),
                                  torch.stack([has_x, batch.y_mask.bool()]))

    def model(self, batch: Batch) -> None:
        """p(x, y, z) for ``batch``; absent modalities are masked out (add 0)."""
        self._check(batch)
        pyro.module(self.pyro_name, self)
        with pyro.plate("data", batch.size, device=batch.x.device):
            z = pyro.sample("z", dist.Normal(batch.x.new_zeros(self.dim_z), 1.0).to_event(1))
            pyro.sample("x", self.pixel_distribution(self.decoder(z), batch.x_mask), obs=batch.x)
            with poutine.scale(scale=self.cfg.label_weight):
                pyro.sample("y", dist.Categorical(logits=self.label_decoder(z)).mask(batch.y_mask[:, 0].bool()),
                            obs=batch.y[:, 0].long().clamp(0, self.num_classes - 1))

    def guide(self, batch: Batch) -> None:
        """q(z | observed modalities) = the product of experts of :meth:`posterior`."""
        pyro.module(self.pyro_name, self)
        loc, scale = self.posterior(batch)
        with pyro.plate("data", batch.size, device=batch.x.device):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @staticmethod
    def subsampled(batch: Batch) -> Batch:
        """The ``3B`` rows ``[paired; image only; label only]`` whose ELBO sum is Wu & Goodman's §3 objective:
        paired copies keep rows with both modalities, the unimodal copies rows with that modality."""
        has_x, has_y = batch.x_mask.any(-1, keepdim=True), batch.y_mask.bool()
        none_x, none_y = torch.zeros_like(batch.x_mask), torch.zeros_like(has_y)
        return Batch(x=batch.x.repeat(3, 1), y=batch.y.repeat(3, 1),
                     x_mask=torch.cat([batch.x_mask & has_y, batch.x_mask, none_x]),
                     y_mask=torch.cat([has_y & has_x, none_y, has_y]))

    def training_stages(self, steps: int, lr: float = 5e-3) -> list[TrainingStage]:
        """The base ELBO stage; with ``subsample_elbo`` its model and guide read :meth:`subsampled` batches, so the
        per-row loss is ``-(ELBO(x, y) + ELBO(x) + ELBO(y))``."""
        stages = super().training_stages(steps, lr)
        if not self.cfg.subsample_elbo:
            return stages
        return [replace(s, model=lambda b, m=s.model: m(self.subsampled(b)),
                        guide=lambda b, g=s.guide: g(self.subsampled(b))) for s in stages]

    @torch.no_grad()
    def cross_generate_image(self, labels: torch.Tensor, generator: Optional[torch.Generator] = None,
                             sample: bool = True) -> torch.Tensor:
        """Mean images of ``p(x | z)``, ``z ~ q(z | y)`` (its mean when ``sample=False``) from labels alone.
        Shapes: ``labels (N,)`` long in ``0..K-1`` -> ``(N, x_dim)`` in ``(0, 1)``. Raises ValueError: bad labels."""
        labels = labels.reshape(-1).long()
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        device, dtype = self._device_dtype(None)
        x = torch.zeros(labels.numel(), self.x_dim, device=device, dtype=dtype)
        batch = Batch(x=x, x_mask=torch.zeros_like(x, dtype=torch.bool), y=labels.to(x).unsqueeze(-1),
                      y_mask=torch.ones(labels.numel(), 1, dtype=torch.bool, device=x.device))
        loc, scale = self.posterior(batch)
        if sample:
            loc = loc + scale * torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
        return mean_image(self.decoder(loc), self.likelihood)

    @torch.no_grad()
    def predict_label(self, images: torch.Tensor) -> torch.Tensor:
        """``p(y | z = E q(z | x))`` from images alone. Shapes: ``(N, x_dim) -> (N, num_classes)`` probabilities."""
        x = images.to(*self._device_dtype(None))
        batch = Batch(x=x, x_mask=torch.ones_like(x, dtype=torch.bool), y=x.new_zeros(x.shape[0], 1),
                      y_mask=torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device))
        return self.label_decoder(self.posterior(batch)[0]).softmax(-1)

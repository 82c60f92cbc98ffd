"""Shared pieces of the image models (UG-VAE, ML-VAE, GMVAE, β-VAE): the typed options every family shares
(:class:`ImageModelConfig`), the common base class (:class:`ImageModel`), encoder/decoder builders and the pixel
likelihood.

Every image model in :mod:`ppl_vae.models` reads flattened images ``x`` of shape ``(batch, 784)`` in ``[0, 1]``
(28x28, one channel) or, with ``arch="mlp"``, any vector of ``x_dim`` features. The builders here make the same
networks for every family so that the families differ only in their latent structure:

- ``arch="mlp"``: pre-encoder ``h(x) = ReLU(Linear(x_dim, 256))`` (one 256-unit layer, as in the UG-VAE reference
  code for 28x28 inputs) and decoder ``MLP(latent, [256], x_dim)``;
- ``arch="conv"``: :class:`ppl_vae.nn.ConvEncoder28` / :class:`ppl_vae.nn.ConvDecoder28` (28x28 images only).

The likelihood is Bernoulli on the pixels (``likelihood="bernoulli"``; targets may be binary or continuous in
``[0, 1]``: ``log p = -BCE(logits, x)``, the continuous relaxation used by the UG-VAE/ML-VAE image code) or a
diagonal Gaussian (``likelihood="gaussian"``, for vector data; fixed or learned scale).

Each family declares a ``Config`` dataclass (a subclass of :class:`ImageModelConfig`) and is built either from
keyword options (``UGVAE(dim_z=4)``) or from a config object (``UGVAE(UGVAE.Config(dim_z=4))``); an unknown option
raises ``TypeError`` naming it (:func:`ppl_vae.models.config.resolve_config`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Optional

import pyro.distributions as dist
import torch
from torch import nn
import torch.nn.functional as F

from ppl_vae.models.base import LatentVariableModel, TrainingStage
from ppl_vae.models.config import resolve_config
from ppl_vae.models.schedules import KLScheduleConfig, annealed_stage
from ppl_vae.nn import MLP, ConvDecoder28, ConvEncoder28

__all__ = ["ARCHS", "LIKELIHOODS", "ImageModelConfig", "ImageModel", "LocalImageLatent", "build_image_encoder",
           "build_image_decoder", "pixel_likelihood", "PixelScale", "check_arch", "mean_image"]

#: Network architectures understood by :func:`build_image_encoder` / :func:`build_image_decoder`.
ARCHS = ("mlp", "conv")
#: Observation models understood by :func:`pixel_likelihood`.
LIKELIHOODS = ("bernoulli", "gaussian")


def check_arch(arch: str, likelihood: str, x_dim: int) -> None:
    """Validate the ``(arch, likelihood, x_dim)`` triple shared by the image models.

    Raises:
        ppl_vae.errors.UnknownNameError: unknown ``arch`` or ``likelihood``.
        ValueError: ``arch="conv"`` with ``x_dim != 784`` or a non-positive ``x_dim``.
    """
    from ppl_vae.errors import UnknownNameError

    if arch not in ARCHS:
        raise UnknownNameError("architecture", arch, ARCHS)
    if likelihood not in LIKELIHOODS:
        raise UnknownNameError("likelihood", likelihood, LIKELIHOODS)
    if x_dim <= 0:
        raise ValueError(f"x_dim must be positive, got {x_dim}")
    if arch == "conv" and x_dim != 784:
        raise ValueError(f"arch='conv' needs 28x28 images (x_dim=784), got x_dim={x_dim}")


def build_image_encoder(arch: str = "mlp", x_dim: int = 784, hidden: int = 256) -> nn.Module:
    """The shared pre-encoder ``h(x)`` of every image model.

    Args:
        arch: ``"mlp"`` (``ReLU(Linear(x_dim, hidden))``, the UG-VAE reference's 28x28 encoder) or ``"conv"``
            (:class:`ppl_vae.nn.ConvEncoder28` with ``hidden`` output features).
        x_dim: input width (784 for 28x28 images).
        hidden: feature width; the returned module has ``out_features == hidden``.

    Shapes: ``(..., x_dim) -> (..., hidden)``, features ``>= 0`` (ReLU).

    Raises:
        ppl_vae.errors.UnknownNameError: unknown ``arch``. ValueError: conv with ``x_dim != 784``.
    """
    check_arch(arch, "bernoulli", x_dim)
    if arch == "conv":
        return ConvEncoder28(out_features=hidden)
    net = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU())
    net.out_features = hidden  # type: ignore[attr-defined]
    return net


def build_image_decoder(arch: str = "mlp", latent_dim: int = 10, x_dim: int = 784, hidden: int = 256) -> nn.Module:
    """The shared decoder from a latent code to pixel logits (Bernoulli) or means (Gaussian).

    Args:
        arch: ``"mlp"`` (``MLP(latent_dim, [hidden], x_dim)``, ReLU) or ``"conv"`` (:class:`ConvDecoder28`).
        latent_dim: width of the decoder input (e.g. ``dim_z + dim_beta`` for UG-VAE's ``[z_i, beta]``).
        x_dim: output width.
        hidden: hidden width of the MLP decoder.

    Shapes: ``(..., latent_dim) -> (..., x_dim)``, unconstrained reals.

    Raises:
        ppl_vae.errors.UnknownNameError: unknown ``arch``. ValueError: conv with ``x_dim != 784``.
    """
    check_arch(arch, "bernoulli", x_dim)
    if arch == "conv":
        return ConvDecoder28(latent_dim)
    return MLP(latent_dim, [hidden], x_dim)


class PixelScale(nn.Module):
    """Scale of the Gaussian pixel likelihood: fixed (``scale`` given) or a learned per-feature parameter.

    The UG-VAE reference trains with a fixed pixel variance of 0.2 (``scale = sqrt(0.2)``).

    Args:
        x_dim: number of features.
        scale: fixed positive standard deviation, or ``None`` to learn ``softplus(raw) + 1e-3`` per feature.

    Shapes: ``forward() -> (x_dim,)`` positive scales.

    Raises:
        ValueError: non-positive fixed ``scale``.
    """

    def __init__(self, x_dim: int, scale: Optional[float] = None):
        super().__init__()
        if scale is not None and scale <= 0:
            raise ValueError(f"pixel scale must be positive, got {scale}")
        self.fixed = scale
        self.x_dim = x_dim
        if scale is None:
            self.raw = nn.Parameter(torch.zeros(x_dim))
        else:
            self.raw = None
            self.register_buffer("value", torch.full((x_dim,), float(scale)))   # follows .to(device / dtype)

    def forward(self) -> torch.Tensor:
        """The per-feature scales. Shapes: ``-> (x_dim,)``, positive."""
        if self.raw is None:
            return self.value
        return F.softplus(self.raw) + 1e-3


def pixel_likelihood(out: torch.Tensor, x_mask: Optional[torch.Tensor] = None, likelihood: str = "bernoulli",
                     scale: Optional[torch.Tensor] = None) -> dist.TorchDistribution:
    """Distribution of a flattened image (or feature vector) given the decoder output, masked and with the feature
    dimension declared as an event: use as ``pyro.sample("x", pixel_likelihood(out, mask), obs=x)``.

    Args:
        out: ``(..., x_dim)`` decoder output: Bernoulli logits, or Gaussian means.
        x_mask: optional ``(..., x_dim)`` bool (``True`` = observed); unobserved pixels add 0 to the log-likelihood.
        likelihood: ``"bernoulli"`` (targets in ``[0, 1]``, binary or continuous; ``log p(x) = -BCE(logits, x)``)
            or ``"gaussian"`` (``Normal(out, scale)``).
        scale: ``(x_dim,)`` or broadcastable positive scale for ``"gaussian"`` (required there).

    Returns:
        a distribution with ``batch_shape = out.shape[:-1]`` and ``event_shape = (x_dim,)``.

    Raises:
        ppl_vae.errors.UnknownNameError: unknown ``likelihood``. ValueError: Gaussian without ``scale``.

    Source: UG-VAE (Peis et al. 2023) eq. for p(x_i | z_i, β); Bernoulli pixels for binarised images.
    """
    from ppl_vae.errors import UnknownNameError

    if likelihood == "bernoulli":
        # validate_args=False: continuous targets in [0, 1] are allowed (cross-entropy relaxation).
        d = dist.Bernoulli(logits=out, validate_args=False)
    elif likelihood == "gaussian":
        if scale is None:
            raise ValueError("the Gaussian pixel likelihood needs a scale")
        d = dist.Normal(out, scale.to(device=out.device, dtype=out.dtype).expand_as(out))
    else:
        raise UnknownNameError("likelihood", likelihood, LIKELIHOODS)
    if x_mask is not None:
        d = d.mask(x_mask.bool())
    return d.to_event(1)


def mean_image(out: torch.Tensor, likelihood: str = "bernoulli") -> torch.Tensor:
    """Mean of the pixel likelihood: ``sigmoid(logits)`` (Bernoulli) or the Gaussian mean itself.

    Shapes: ``(..., x_dim) -> (..., x_dim)``; Bernoulli means lie in ``(0, 1)``.
    """
    return torch.sigmoid(out) if likelihood == "bernoulli" else out


class LocalImageLatent:
    """Mixin for image models with ``encoder``, ``z_head`` (Gaussian head), ``decoder`` and ``likelihood``
    attributes: posterior mean of the local latent and mean images (shared by β-VAE and GMVAE)."""

    @torch.no_grad()
    def encode_local(self, batch) -> torch.Tensor:
        """Posterior mean of z. Shapes: ``(B, x_dim) -> (B, dim_z)``."""
        return self.z_head(self.encoder(batch.x))[0]

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Mean image of p(x | z). Shapes: ``(..., dim_z) -> (..., x_dim)``."""
        return mean_image(self.decoder(z), self.likelihood)


@dataclass
class ImageModelConfig(KLScheduleConfig):
    """Options every image model shares (the family configs add their latent sizes).

    Attributes:
        x_dim: features per datapoint (784 for 28x28 images).
        arch: ``"mlp"`` or ``"conv"`` (see :func:`build_image_encoder`).
        likelihood: ``"bernoulli"`` or ``"gaussian"`` (see :func:`pixel_likelihood`).
        hidden: hidden width of the shared networks.
        pixel_scale: fixed Gaussian scale, or ``None`` to learn it (Gaussian likelihood only).
        kl_schedule, kl_warmup, kl_cycles, kl_ratio: the KL schedule of training
            (:class:`~ppl_vae.models.schedules.KLScheduleConfig`; default ``"constant"``, the plain ELBO).
    """

    x_dim: int = 784
    arch: str = "mlp"
    likelihood: str = "bernoulli"
    hidden: int = 256
    pixel_scale: Optional[float] = None


class ImageModel(LatentVariableModel):
    """Base of the image model families: typed config, validation, the shared pre-encoder, the pixel likelihood
    and the single-stage SVI schedule.

    Subclasses set ``name``, ``Config`` (their :class:`ImageModelConfig` subclass; every ``int`` option is a size
    that must be ``> 0``) and ``enumerated`` (train with ``TraceEnum_ELBO(max_plate_nesting=1)`` instead of
    ``Trace_ELBO``), and build their own networks after ``super().__init__`` (which builds ``self.encoder`` first,
    so the seeded initialisation order is encoder, then the family's networks).

    Args:
        config: a ``Config`` object, a plain dict of options, or ``None``.
        **options: options (fields of ``Config``); they override ``config``.

    Attributes:
        cfg: the typed config; ``config`` is its plain dict (``type(model)(**model.config)`` rebuilds the model).

    Raises:
        TypeError: an unknown option (named, with the closest valid one) or a config of another family.
        ppl_vae.errors.UnknownNameError: unknown ``arch`` / ``likelihood``.
        ValueError: a non-positive size, conv with ``x_dim != 784``, or a family-specific bad value.
    """

    name = "image"
    Config: ClassVar[type[ImageModelConfig]] = ImageModelConfig
    enumerated: ClassVar[bool] = False

    def __init__(self, config: Optional[ImageModelConfig] = None, **options: Any):
        cfg = resolve_config(self.Config, config, options, type(self).__name__)
        super().__init__(**cfg.to_dict())
        check_arch(cfg.arch, cfg.likelihood, cfg.x_dim)
        for name in self.size_options():
            if not getattr(cfg, name) > 0:
                raise ValueError(f"{type(self).__name__}: {name} must be positive, got {getattr(cfg, name)}")
        cfg.check_kl_options()
        self.validate(cfg)
        self.cfg = cfg
        self.x_dim, self.likelihood = cfg.x_dim, cfg.likelihood
        self.encoder = build_image_encoder(cfg.arch, cfg.x_dim, cfg.hidden)      # h(x): (B, x_dim) -> (B, hidden)
        self.pixel_scale = PixelScale(cfg.x_dim, cfg.pixel_scale) if cfg.likelihood == "gaussian" else None

    @classmethod
    def size_options(cls) -> list[str]:
        """The ``int`` options of ``Config`` (sizes such as ``hidden``, ``dim_z``), each required to be ``> 0``."""
        return [f.name for f in fields(cls.Config) if f.type in (int, "int") and not f.name.startswith("kl_")]

    @property
    def pyro_name(self) -> str:
        """The ``pyro.module`` name of the model's networks: ``name`` without dashes (``"ug-vae"`` -> ``"ugvae"``)."""
        return self.name.replace("-", "")

    def validate(self, cfg: ImageModelConfig) -> None:
        """Family-specific checks beyond sizes and architecture (none here). Raises on a bad option."""

    def elbo_stage(self, name: str, loss, steps: int, lr: float) -> TrainingStage:
        """A stage on ``self.model`` / ``self.guide`` with ``loss``, under the KL schedule when one is set."""
        return annealed_stage(self.cfg, name, self.model, self.guide, loss, steps, lr)

    def build_decoder(self, latent_dim: int) -> nn.Module:
        """The shared decoder from a ``latent_dim`` code (:func:`build_image_decoder` with this model's options)."""
        return build_image_decoder(self.cfg.arch, latent_dim, self.cfg.x_dim, self.cfg.hidden)

    def pixel_distribution(self, out: torch.Tensor, x_mask: Optional[torch.Tensor]) -> dist.TorchDistribution:
        """:func:`pixel_likelihood` of decoder output ``out (..., x_dim)`` with this model's likelihood and scale."""
        scale = self.pixel_scale() if self.pixel_scale is not None else None
        return pixel_likelihood(out, x_mask, self.likelihood, scale)

    def _device_dtype(self, device: Optional[torch.device]) -> tuple[torch.device, torch.dtype]:
        """``device`` (default: the parameters') and the parameters' dtype, for drawing prior samples."""
        p = next(self.parameters())
        return device or p.device, p.dtype

    def training_stages(self, steps: int, lr: float = 5e-3) -> list[TrainingStage]:
        """One ELBO stage: ``TraceEnum_ELBO(max_plate_nesting=1)`` when ``enumerated`` (a discrete site summed out
        exactly), else ``Trace_ELBO``; Adam lr 5e-3 as in the UG-VAE reference code (Peis et al. 2023); the KL
        schedule of the config (:meth:`kl_annealing`) applies."""
        import pyro.infer

        loss = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1) if self.enumerated else pyro.infer.Trace_ELBO()
        return [self.elbo_stage("elbo", loss, steps, lr)]

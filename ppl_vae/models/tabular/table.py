"""A VAE over a partially observed, mixed-type table with a target: the part VAE, VAEM and their HMC variants
share (Partial VAE, Ma et al. 2018; VAEM, Ma et al. 2020; HH-VAEM, Peis et al. 2022 §3).

Generative story of one row: ``h ~ N(0, I)``; the observed table entries ``x_O`` (VAE) or their marginal codes
(VAEM) are emitted from ``h`` by a masked likelihood; ``y ~ p(y | x̂, h)`` (:class:`~ppl_vae.models.tabular.predictor.
Predictor`). The guide is the amortised Gaussian ``q(h | x_O, y_O)`` whose encoder reads
``[features(x) ⊙ m_x, m_x, features(y) ⊙ m_y, m_y]`` (zero imputation + mask).

Subclasses say how the table is emitted: :meth:`observation_features` (what the encoder reads of x),
:meth:`x_params` (likelihood parameters of x given h), :meth:`observe_x` (the Pyro sites) and
:meth:`log_lik_x` (the same log-likelihood in plain torch: the optional, verified fast path of the HMC target).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
from pyro import poutine
import torch

from ppl_vae.likelihoods import MixedLikelihood
from ppl_vae.models.base import Batch, LatentVariableModel, TrainingStage
from ppl_vae.models.config import ModelConfig, resolve_config
from ppl_vae.models.tabular.predictor import Predictor
from ppl_vae.nn import MLP, GaussianHead

__all__ = ["TableVAE", "TableConfig", "as_schema"]


@dataclass
class TableConfig(ModelConfig):
    """Options shared by the table models.

    Attributes:
        latent_dim: width of the latent ``h``.
        hidden: hidden widths of the encoder and decoder MLPs.
        predictor_hidden: hidden widths of the predictor MLP.
        beta: weight of the KL term (β-VAE, Higgins et al. 2017); also the end point of KL warm-up.
        kl_warmup: steps of linear KL annealing from 0 to ``beta`` at the start of the ELBO stage (0: none).
        gaussian_scale: ``"learned"`` (bounded) or a fixed std for real columns (see :mod:`ppl_vae.likelihoods`).
    """

    latent_dim: int = 10
    hidden: Sequence[int] = (64, 64)
    predictor_hidden: Sequence[int] = (64,)
    beta: float = 1.0
    kl_warmup: int = 0
    gaussian_scale: Union[str, float] = "learned"


def as_schema(schema: Any):
    """Accept a ``ppl_vae.data.TableSchema`` or its ``to_dict()`` form; return the ``TableSchema``."""
    from ppl_vae.data.schema import TableSchema

    return schema if isinstance(schema, TableSchema) else TableSchema.from_dict(schema)


class TableVAE(LatentVariableModel):
    """Base of the table models. Not used directly: see :class:`~ppl_vae.models.tabular.vae.VAE` and
    :class:`~ppl_vae.models.tabular.vaem.VAEM`.

    Args:
        schema: ``TableSchema`` (or its dict) of the features and the optional target.
        config: a :class:`TableConfig` (of the subclass's ``Config`` type); keyword ``options`` override its fields.
        **options: the config's fields by name (``latent_dim=5``...).

    Raises:
        TypeError: an unknown option (named, with the closest valid one).

    The latent site is ``self.latent_site`` (``"z"`` for the VAE, ``"h"`` for VAEM), shape ``(batch, latent_dim)``.
    """

    latent_site = "z"

    Config = TableConfig

    def __init__(self, schema, config: Optional[TableConfig] = None, **options: Any):
        schema = as_schema(schema)
        cfg = resolve_config(type(self).Config, config, options, type(self).__name__)
        super().__init__(schema=schema.to_dict(), **cfg.to_dict())
        self.cfg = cfg
        hidden = list(cfg.hidden)
        self.schema = schema
        self.latent_dim = int(cfg.latent_dim)
        self.beta = float(cfg.beta)
        self.kl_warmup = int(cfg.kl_warmup)
        self.kl_weight = self.beta
        self.x_likelihood = MixedLikelihood(schema.features, gaussian_scale=cfg.gaussian_scale)
        D, F = self.x_likelihood.num_columns, self.x_likelihood.feature_dim
        self.predictor: Optional[Predictor] = None
        y_width = 0
        if schema.target is not None:
            self.predictor = Predictor(F, D, self.latent_dim, schema.target, list(cfg.predictor_hidden),
                                       cfg.gaussian_scale)
            y_width = self.predictor.likelihood.feature_dim + 1
        self.encoder = MLP(self.observation_width() + D + y_width, hidden[:-1], hidden[-1])
        self.encoder_head = GaussianHead(hidden[-1], self.latent_dim)

    # ------------------------------------------------------------------ subclass hooks
    def observation_width(self) -> int:
        """Width of :meth:`observation_features` (default: the table's feature space)."""
        return self.x_likelihood.feature_dim

    def observation_features(self, batch: Batch) -> torch.Tensor:
        """What the encoder reads of x: ``(batch, observation_width)``, zero on missing entries."""
        return self.observation_features_for_predictor(batch)

    def x_params(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Likelihood parameters of every table entry given the latent: ``(..., batch, param_dim)``."""
        raise NotImplementedError

    def predictive_x_params(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Parameters of ``p(x_d | h)`` used for imputation metrics (default: :meth:`x_params`)."""
        return self.x_params(h, batch)

    def observe_x(self, h: torch.Tensor, batch: Batch, x_params: Optional[torch.Tensor] = None) -> None:
        """Emit the Pyro observation sites of the table (inside the data plate); ``x_params`` may pass the
        already computed :meth:`x_params`."""
        raise NotImplementedError

    def log_lik_x(self, h: torch.Tensor, batch: Batch, x_params: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Plain-torch log-likelihood of the observed table given ``h``: ``(..., batch)``; equals the sum of
        the sites emitted by :meth:`observe_x`."""
        raise NotImplementedError

    def generative_modules(self) -> dict:
        """``{pyro module name: module}`` trained by the model side of the ELBO (decoder, predictor...)."""
        return {"predictor": self.predictor} if self.predictor is not None else {}

    # ------------------------------------------------------------------ shared pieces
    def encoder_modules(self) -> dict:
        """``{pyro module name: module}`` of the amortised encoder q(h | x_O, y_O)."""
        return {"encoder": self.encoder, "encoder_head": self.encoder_head}

    def encoder_input(self, batch: Batch) -> torch.Tensor:
        """``[features(x) ⊙ m_x, m_x, features(y) ⊙ m_y, m_y]``: ``(batch, encoder input width)``."""
        parts = [self.observation_features(batch), batch.x_mask.to(batch.x.dtype)]
        if self.predictor is not None:
            y, ym = self.target(batch)
            parts += [self.predictor.likelihood.encode(y, ym), ym.to(batch.x.dtype)]
        return torch.cat(parts, -1)

    def target(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y (batch, 1), y_mask (batch, 1) bool)``; an all-missing target when the batch has none."""
        if batch.y is None:
            zeros = batch.x.new_zeros(batch.size, 1)
            return zeros, zeros.bool()
        return batch.y, batch.y_mask.bool()

    def proposal(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The guide's Gaussian ``q(h | x_O, y_O)``: ``(loc, scale)``, each ``(batch, latent_dim)``."""
        return self.encoder_head(torch.relu(self.encoder(self.encoder_input(batch))))

    def y_params(self, h: torch.Tensor, batch: Batch, x_params: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Target parameters ``(..., batch, target param_dim)`` of ``p(y | x̂, h)``, with
        ``x̂ = fill_features(x_params(h))`` (observed features kept, missing ones imputed from the same h)."""
        if x_params is None:
            x_params = self.x_params(h, batch)
        x_obs = self.observation_features_for_predictor(batch)
        fmask = batch.cached("feature_mask", lambda: self.x_likelihood.feature_mask(batch.x_mask.bool()))
        x_hat = torch.where(fmask, x_obs, self.x_likelihood.expected_features(x_params))
        return self.predictor(x_hat, batch.x_mask, h)

    def observation_features_for_predictor(self, batch: Batch) -> torch.Tensor:
        """Features of the observed table entries ``(batch, feature_dim)`` (zero where missing), cached per batch."""
        return batch.cached("x_table_features", lambda: self.x_likelihood.encode(batch.x, batch.x_mask))

    def log_joint(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Hand-written ``log p(x_O, y_O, h)`` per datapoint: ``(..., batch)`` for ``h`` ``(..., batch, latent_dim)``.

        An optional fast path of the HMC target (Peis et al. 2022, §3.5): the HMC-refined models hand it to
        :class:`~ppl_vae.infer.potential.TracePotential`, which checks it against the log joint derived from the
        trace of :meth:`model` on first use (float64, relative error ≤ 1e-5) and raises on disagreement, so a
        subclass that changes :meth:`model` without changing this method gets an error, never a wrong target."""
        x_params = self.x_params(h, batch)
        prior = dist.Normal(0.0, 1.0).log_prob(h).sum(-1)
        out = prior + self.log_lik_x(h, batch, x_params=x_params)
        if self.predictor is not None and batch.y is not None:
            y, ym = self.target(batch)
            out = out + self.predictor.likelihood.log_prob(self.y_params(h, batch, x_params), y, ym)
        return out

    # ------------------------------------------------------------------ Pyro programs
    def register_modules(self, modules: dict) -> None:
        """``pyro.module(name, module)`` for each entry: the parameters this Pyro program trains."""
        for name, module in modules.items():
            pyro.module(name, module)

    def model(self, batch: Batch) -> None:
        """Pyro model: ``h ~ N(0, I)`` (KL weighted by ``kl_weight``), the masked table likelihood and the masked
        target likelihood, all inside ``pyro.plate("data", batch.size)``."""
        self.register_modules(self.generative_modules())
        with pyro.plate("data", batch.size, dim=-1, device=batch.device):
            prior = dist.Normal(batch.x.new_zeros(self.latent_dim), 1.0).expand([batch.size, self.latent_dim])
            with poutine.scale(scale=self.kl_weight):
                h = pyro.sample(self.latent_site, prior.to_event(1))
            x_params = self.x_params(h, batch)
            self.observe_x(h, batch, x_params=x_params)
            if self.predictor is not None and batch.y is not None:
                y, ym = self.target(batch)
                self.predictor.likelihood.observe("y", self.y_params(h, batch, x_params), y, ym)

    def guide(self, batch: Batch) -> None:
        """Pyro guide: the amortised Gaussian ``q(h | x_O, y_O)`` (KL weighted by ``kl_weight``)."""
        self.register_modules(self.encoder_modules())
        with pyro.plate("data", batch.size, dim=-1, device=batch.device):
            loc, scale = self.proposal(batch)
            with poutine.scale(scale=self.kl_weight):
                pyro.sample(self.latent_site, dist.Normal(loc, scale).to_event(1))

    def _kl_schedule(self, step: int) -> None:
        self.kl_weight = self.beta * min(1.0, (step + 1) / self.kl_warmup) if self.kl_warmup > 0 else self.beta

    def elbo_stage(self, steps: int, lr: float, name: str = "elbo") -> TrainingStage:
        """The ELBO stage (``Trace_ELBO``) with KL warm-up."""
        return TrainingStage(name, self.model, self.guide, pyro.infer.Trace_ELBO(), steps, lr,
                             on_step=self._kl_schedule)

    def training_stages(self, steps: int, lr: float = 1e-3) -> list[TrainingStage]:
        """One ELBO stage of ``steps`` steps."""
        return [self.elbo_stage(steps, lr)]

    # ------------------------------------------------------------------ evaluation contract
    def posterior_latents(self, batch: Batch, num_samples: int) -> torch.Tensor:
        """``(num_samples, batch, latent_dim)`` draws of ``h`` from the guide (HMC models: chains)."""
        loc, scale = self.proposal(batch)
        return dist.Normal(loc, scale).sample((num_samples,))

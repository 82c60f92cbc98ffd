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

import contextlib
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
from ppl_vae.models.schedules import KL_SCHEDULES, make_kl_schedule
from ppl_vae.nn import MLP, GaussianHead, MaskedConvEncoder28

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
        gaussian_scale: ``"learned"`` (bounded) or a fixed std for real columns (see :mod:`ppl_vae.likelihoods`;
            the HH-VAEM paper's fixed variance 0.1 is ``gaussian_scale=0.1 ** 0.5``).
        kl_schedule: ``"linear"`` (warm-up over ``kl_warmup`` steps), ``"cyclical"`` (Fu et al. 2019: ``kl_cycles``
            cycles over the ELBO stage) or ``"constant"``; see :mod:`ppl_vae.models.schedules`.
        kl_cycles: cycles of the cyclical schedule.
        network: ``"mlp"`` or ``"conv28"`` (28x28 images whose 784 columns are Bernoulli pixels: a convolutional
            encoder, :class:`~ppl_vae.nn.MaskedConvEncoder28`, and decoder, :class:`~ppl_vae.nn.ConvDecoder28`).
    """

    latent_dim: int = 10
    hidden: Sequence[int] = (64, 64)
    predictor_hidden: Sequence[int] = (64,)
    beta: float = 1.0
    kl_warmup: int = 0
    gaussian_scale: Union[str, float] = "learned"
    kl_schedule: str = "linear"
    kl_cycles: int = 4
    network: str = "mlp"


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
        if cfg.kl_schedule not in KL_SCHEDULES:
            raise ValueError(f"unknown kl_schedule {cfg.kl_schedule!r}; choose one of {KL_SCHEDULES}")
        if cfg.network not in ("mlp", "conv28"):
            raise ValueError(f"unknown network {cfg.network!r}; choose 'mlp' or 'conv28'")
        self.x_likelihood = MixedLikelihood(schema.features, gaussian_scale=cfg.gaussian_scale)
        D, F = self.x_likelihood.num_columns, self.x_likelihood.feature_dim
        self.predictor: Optional[Predictor] = None
        y_width = 0
        if schema.target is not None:
            self.predictor = Predictor(F, D, self.latent_dim, schema.target, list(cfg.predictor_hidden),
                                       cfg.gaussian_scale)
            y_width = self.predictor.likelihood.feature_dim + 1
        if cfg.network == "conv28":
            if self.observation_width() != 784 or D != 784:
                raise ValueError(f"network='conv28' needs 784 pixel columns observed as themselves, got "
                                 f"{D} columns and an encoder input of {self.observation_width()}")
            self.encoder = MaskedConvEncoder28(hidden[-1], y_width)
        else:
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

    def imputation_log_prob(self, h: torch.Tensor, batch: Batch, x: torch.Tensor, entries: torch.Tensor,
                            x_params: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``log p(x_d | h)`` of the table entries in ``entries``, the quantity the imputation NLL averages.

        Args:
            h: latent samples ``(..., batch, latent_dim)``.
            batch: the (masked) input the latents were inferred from.
            x: true values ``(batch, D)``, normalised domain (NaN allowed off ``entries``).
            entries: ``(batch, D)`` bool, the entries to score (the hidden test entries).
            x_params: :meth:`x_params` of ``h`` if already computed.

        Returns: ``(..., batch, D)`` log-probabilities (nats), 0 off ``entries``. Default: the decoder's likelihood
        at ``h`` (exact for a VAE, where ``x`` depends on ``h`` only through the decoder).
        """
        params = self.x_params(h, batch) if x_params is None else x_params
        return self.x_likelihood.log_prob_entries(params, x, entries)

    def observe_x(self, h: torch.Tensor, batch: Batch, x_params: Optional[torch.Tensor] = None) -> None:
        """Emit the Pyro observation sites of the table (inside the data plate); ``x_params`` may pass the
        already computed :meth:`x_params`."""
        raise NotImplementedError

    def log_lik_x(self, h: torch.Tensor, batch: Batch, x_params: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Plain-torch log-likelihood of the observed table given ``h``: ``(..., batch)``; equals the sum of
        the sites emitted by :meth:`observe_x`."""
        raise NotImplementedError

    def decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """The latent the decoder and predictor read, from the flat latent of the Pyro sites: ``(..., batch,
        flat_latent_dim) -> (..., batch, latent_dim)`` (identity here; the hierarchical models run their
        hierarchy ``h_1(ε)``)."""
        return z

    @property
    def flat_latent_dim(self) -> int:
        """Width of the flat vector of every latent site (what HMC moves); ``latent_dim`` here."""
        return self.latent_dim

    @property
    def num_latent_sites(self) -> int:
        """Number of latent sample sites per datapoint (1 here)."""
        return 1

    def particle_plate(self):
        """Context entered inside the data plate of :meth:`model` and :meth:`guide` (none here; the
        importance-weighted models open their particle plate)."""
        return contextlib.nullcontext()

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
        """Hand-written ``log p(x_O, y_O, h)`` per datapoint: ``(..., batch)`` for ``h`` ``(..., batch,
        flat_latent_dim)`` (the flat vector of the latent sites, standard normal prior; :meth:`decoder_input` maps
        it to what the decoder reads).

        An optional fast path of the HMC target (Peis et al. 2022, §3.5): the HMC-refined models hand it to
        :class:`~ppl_vae.infer.potential.TracePotential`, which checks it against the log joint derived from the
        trace of :meth:`model` on first use (float64, relative error ≤ 1e-5) and raises on disagreement, so a
        subclass that changes :meth:`model` without changing this method gets an error, never a wrong target."""
        # argument validation off, as on the trace path: a non-finite leapfrog position must give a non-finite
        # density (counted as a divergence by the HMC kernel), never an exception
        with pyro.validation_enabled(False):
            prior = dist.Normal(0.0, 1.0).log_prob(h).sum(-1)   # every latent site has a N(0, I) prior
            h = self.decoder_input(h)
            x_params = self.x_params(h, batch)
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
        with pyro.plate("data", batch.size, dim=-1, device=batch.device), self.particle_plate():
            h = self.sample_latent(batch)
            x_params = self.x_params(h, batch)
            self.observe_x(h, batch, x_params=x_params)
            if self.predictor is not None and batch.y is not None:
                y, ym = self.target(batch)
                self.predictor.likelihood.observe("y", self.y_params(h, batch, x_params), y, ym)

    def guide(self, batch: Batch) -> None:
        """Pyro guide: the amortised Gaussian ``q(h | x_O, y_O)`` (KL weighted by ``kl_weight``)."""
        self.register_modules(self.encoder_modules())
        with pyro.plate("data", batch.size, dim=-1, device=batch.device), self.particle_plate():
            self.guide_latent(batch)

    def sample_latent(self, batch: Batch) -> torch.Tensor:
        """Model side, inside the data plate: the latent site(s) under their ``N(0, I)`` prior (KL weighted by
        ``kl_weight``); returns the decoder's input ``(batch, latent_dim)`` (:meth:`decoder_input`)."""
        prior = dist.Normal(batch.x.new_zeros(self.latent_dim), 1.0).expand([batch.size, self.latent_dim])
        with poutine.scale(scale=self.kl_weight):
            return pyro.sample(self.latent_site, prior.to_event(1))

    def guide_latent(self, batch: Batch) -> None:
        """Guide side, inside the data plate: ``q(h | x_O, y_O)`` (KL weighted by ``kl_weight``)."""
        loc, scale = self.proposal(batch)
        with poutine.scale(scale=self.kl_weight):
            pyro.sample(self.latent_site, dist.Normal(loc, scale).to_event(1))

    def kl_schedule(self, steps: int):
        """The KL schedule of an ELBO stage of ``steps`` steps (``cfg.kl_schedule``; see
        :mod:`ppl_vae.models.schedules`)."""
        return make_kl_schedule(self.cfg.kl_schedule, beta=self.beta, warmup=self.kl_warmup, total=steps,
                                cycles=self.cfg.kl_cycles)

    def _kl_schedule(self, step: int) -> None:
        schedule = getattr(self, "_active_kl_schedule", None) or self.kl_schedule(max(1, self.kl_warmup))
        self.kl_weight = schedule(step)
        self.kl_annealing = schedule.annealing(step)

    def elbo_loss(self):
        """The loss of the ELBO stage (``Trace_ELBO``; the importance-weighted models return their bound)."""
        return pyro.infer.Trace_ELBO()

    def elbo_stage(self, steps: int, lr: float, name: str = "elbo") -> TrainingStage:
        """The ELBO stage (:meth:`elbo_loss`) with the KL schedule (:meth:`kl_schedule` of its ``steps``)."""
        self._active_kl_schedule = self.kl_schedule(steps)
        return TrainingStage(name, self.model, self.guide, self.elbo_loss(), steps, lr,
                             on_step=self._kl_schedule)

    def training_stages(self, steps: int, lr: float = 1e-3) -> list[TrainingStage]:
        """One ELBO stage of ``steps`` steps."""
        return [self.elbo_stage(steps, lr)]

    # ------------------------------------------------------------------ evaluation contract
    def posterior_latents(self, batch: Batch, num_samples: int) -> torch.Tensor:
        """``(num_samples, batch, latent_dim)`` draws of the decoder's input from the guide (HMC models: chains)."""
        loc, scale = self.proposal(batch)
        return self.decoder_input(dist.Normal(loc, scale).sample((num_samples,)))

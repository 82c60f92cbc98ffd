"""VAE and β-VAE for partially observed mixed-type tables (Kingma & Welling 2014; Higgins et al. 2017; the
Partial-VAE encoder of Ma et al. 2018).

``h ~ N(0, I)``, ``x_d | h ~ p_d(x_d | decoder(h))`` for every observed entry d (masked likelihood heads of
:mod:`ppl_vae.likelihoods`), ``y | x̂, h`` by the predictor; guide ``q(h | x_O, y_O)``. ``beta != 1`` weights the
KL term (β-VAE).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ppl_vae.models.base import Batch
from ppl_vae.models.tabular.table import TableConfig, TableVAE
from ppl_vae.nn import MLP, ConvDecoder28

__all__ = ["VAE", "VAEConfig"]


@dataclass
class VAEConfig(TableConfig):
    """Options of :class:`VAE` (those of :class:`~ppl_vae.models.tabular.table.TableConfig`)."""


class VAE(TableVAE):
    """VAE whose decoder emits the parameters of every column's likelihood.

    Args: ``schema``, and a :class:`VAEConfig` or its fields as keywords (``latent_dim``, ``hidden``,
    ``predictor_hidden``, ``beta``, ``kl_warmup``, ``gaussian_scale``; see
    :class:`~ppl_vae.models.tabular.table.TableConfig`). An unknown option raises ``TypeError``.

    Latent site ``"z"``: ``(batch, latent_dim)``. Observation sites ``"x_<likelihood>"`` (one per likelihood type,
    masked by ``x_mask``) and ``"y_<likelihood>"`` (masked by ``y_mask``).
    """

    name = "vae"
    latent_site = "z"

    Config = VAEConfig

    def __init__(self, schema, config: Optional[VAEConfig] = None, **options):
        super().__init__(schema, config, **options)
        if self.cfg.network == "conv28":
            if self.x_likelihood.param_dim != 784 or set(self.x_likelihood.kinds) != {"bernoulli"}:
                raise ValueError("network='conv28' needs 784 bernoulli pixel columns (e.g. the 'mnist' data set)")
            self.decoder = ConvDecoder28(self.latent_dim)
        else:
            self.decoder = MLP(self.latent_dim, list(self.cfg.hidden)[::-1], self.x_likelihood.param_dim)

    def generative_modules(self) -> dict:
        """Decoder and predictor: what the model side of the ELBO trains."""
        return {"decoder": self.decoder, **super().generative_modules()}

    def x_params(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``decoder(h)``: ``(..., batch, param_dim)``."""
        return self.decoder(h)

    def observe_x(self, h: torch.Tensor, batch: Batch, x_params: Optional[torch.Tensor] = None) -> None:
        """Sites ``x_<likelihood>``: every observed entry under its column's likelihood (masked)."""
        params = self.x_params(h, batch) if x_params is None else x_params
        self.x_likelihood.observe("x", params, batch.x, batch.x_mask)

    def log_lik_x(self, h: torch.Tensor, batch: Batch, x_params: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``Σ_{d observed} log p(x_d | h)``: ``(..., batch)``."""
        params = self.x_params(h, batch) if x_params is None else x_params
        return self.x_likelihood.log_prob(params, batch.x, batch.x_mask)

"""MIWAE and MIWAEM: table models trained with a per-datapoint importance-weighted bound (Burda et al. 2016, "Importance
Weighted Autoencoders", ICLR; Mattei & Frellsen 2019, "MIWAE: Deep Generative Modelling and Imputation of Incomplete
Data Sets", ICML, eq. 4; MIWAEM is the VAEM variant used as a baseline by Peis et al. 2022 §4).

The bound of one row with observed part ``x_O`` (and ``y_O``) and ``K`` particles ``z_k ~ q(z | x_O, y_O)``::

    L_K(x_O) = log (1/K) Σ_k  p(x_O, y_O, z_k) / q(z_k | x_O, y_O)          (Mattei & Frellsen 2019, eq. 4)

``L_1`` is the ELBO, ``E L_K ≤ E L_{K+1} ≤ log p(x_O, y_O)`` (Burda et al. 2016, Theorem 1).

As a Pyro program the particles are a plate **inside** the data plate: ``pyro.plate("data", N, dim=-1)`` then
``pyro.plate("particles", K, dim=-2)``, so every latent and observation site of one row has log density of shape
``(K, N)``. :class:`PerDatapointIWELBO` sums the model's minus the guide's site log densities to ``log w (K, N)`` and
takes ``logsumexp`` over the particle dimension per datapoint. This is not Pyro's ``RenyiELBO(alpha=0)``, whose
particles replicate the whole program and whose weights are products over the minibatch: the two coincide only
while every latent is local, and once a global latent exists ``RenyiELBO`` is a bound on the minibatch's joint
likelihood rather than a sum of per-datapoint bounds.

At test time the posterior samples are drawn by sampling-importance-resampling from the encoder with the same
weights (Mattei & Frellsen 2019, §3.2: single imputation by self-normalised importance sampling, here multiple
imputation by resampling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.poutine.util import site_is_subsample
import torch

from ppl_vae.models.base import Batch
from ppl_vae.models.tabular.vae import VAE, VAEConfig
from ppl_vae.models.tabular.vaem import VAEM, VAEMConfig

__all__ = ["PerDatapointIWELBO", "ImportanceWeighted", "IWOptions", "MIWAE", "MIWAEM", "MIWAEConfig",
           "MIWAEMConfig", "PARTICLE_PLATE"]

#: name of the particle plate inside the data plate
PARTICLE_PLATE = "particles"


class PerDatapointIWELBO(pyro.infer.ELBO):
    """Per-datapoint importance-weighted bound of a program whose particles are a plate inside its data plate.

    ``loss = -Σ_n [logsumexp_k log w_{k,n} - log K]`` with ``log w_{k,n}`` the sum over sites of the model's minus
    the guide's log densities (scales and masks applied, as in Pyro's ``Trace.compute_log_prob``). Sites inside the
    data plate but outside the particle plate add the same term to every particle; a site outside the data plate
    (a global term) is shared equally among the ``N`` datapoints, so the loss is the sum of per-datapoint bounds
    plus the global terms.

    Args:
        particle_plate: name of the particle plate (default ``"particles"``); its dimension and size are read from
            the trace.
        data_plate: name of the data plate.

    Raises:
        ValueError: from the loss, a site with a batch dimension that is neither plate's, or a program without the
            particle plate.
    """

    def __init__(self, particle_plate: str = PARTICLE_PLATE, data_plate: str = "data"):
        super().__init__(num_particles=1)
        self.particle_plate, self.data_plate = particle_plate, data_plate

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - not used
        raise NotImplementedError

    def log_weights(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``(K, N)`` log importance weights ``log p(x_O, y_O, z_k) - log q(z_k | x_O, y_O)`` (differentiable)."""
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        shape = None
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    for f in site["cond_indep_stack"]:
                        if f.name == self.particle_plate:
                            shape = (f.size, f.dim)
        if shape is None:
            raise ValueError(f"the program has no {self.particle_plate!r} plate inside its data plate")
        K, kdim = shape
        total = None
        terms = []
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            trace.compute_log_prob()
            for site in trace.nodes.values():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                terms.append((sign, site))
        N = None
        for _, site in terms:
            for f in site["cond_indep_stack"]:
                if f.name == self.data_plate:
                    N = f.size
        if N is None:
            raise ValueError(f"the program has no {self.data_plate!r} plate")
        for sign, site in terms:
            lp = site["log_prob"]
            names = {f.name for f in site["cond_indep_stack"] if f.vectorized}
            unknown = names - {self.particle_plate, self.data_plate}
            if unknown:
                raise ValueError(f"site {site['name']!r} is in plate(s) {sorted(unknown)}; the per-datapoint bound "
                                 f"knows only {self.data_plate!r} and {self.particle_plate!r}")
            if self.data_plate in names:
                lp = torch.as_tensor(lp).reshape((1,) * max(0, 2 - torch.as_tensor(lp).dim()) + tuple(lp.shape)[-2:])
                lp = lp.expand(K, N)
            else:   # global term: shared by the N datapoints (and the particles, if outside their plate)
                lp = torch.as_tensor(lp).sum()
                lp = (lp / N).expand(K, N)
            total = sign * lp if total is None else total + sign * lp
        return total

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``-Σ_n L_K(x_n)`` as a differentiable scalar."""
        log_w = self.log_weights(model, guide, *args, **kwargs)
        bound = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
        return -bound.sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        """``-Σ_n L_K(x_n)`` (no gradients)."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss, with ``.backward()`` run on it (what ``pyro.infer.SVI`` needs)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


@dataclass
class IWOptions:
    """Options of the importance-weighted models.

    Attributes:
        iw_particles: ``K`` particles per datapoint in training (reference: 5).
    """

    iw_particles: int = 5


@dataclass
class MIWAEConfig(IWOptions, VAEConfig):
    """Options of :class:`MIWAE`: :class:`~ppl_vae.models.tabular.vae.VAEConfig` + :class:`IWOptions`."""


@dataclass
class MIWAEMConfig(IWOptions, VAEMConfig):
    """Options of :class:`MIWAEM`: :class:`~ppl_vae.models.tabular.vaem.VAEMConfig` + :class:`IWOptions`."""


class ImportanceWeighted:
    """Mixin training a table model's ELBO stage with :class:`PerDatapointIWELBO` (put it before the model class).

    The model and guide open ``pyro.plate("particles", K, dim=-2)`` inside the data plate (the base classes'
    :meth:`~ppl_vae.models.tabular.table.TableVAE.particle_plate` hook), so their sites are ``(K, N)``-shaped.
    ``posterior_latents`` resamples the encoder's draws by their importance weights.

    Raises:
        ValueError: ``iw_particles < 1``.
    """

    def __init__(self, schema, config=None, **options: Any):
        super().__init__(schema, config, **options)
        if int(self.cfg.iw_particles) < 1:
            raise ValueError(f"iw_particles must be >= 1, got {self.cfg.iw_particles}")
        self.iw_particles = int(self.cfg.iw_particles)

    def particle_plate(self):
        """``pyro.plate("particles", K, dim=-2)``, entered inside the data plate."""
        return pyro.plate(PARTICLE_PLATE, self.iw_particles, dim=-2)

    def elbo_loss(self):
        """:class:`PerDatapointIWELBO`."""
        return PerDatapointIWELBO()

    @torch.no_grad()
    def posterior_latents(self, batch: Batch, num_samples: int, num_proposals: int | None = None) -> torch.Tensor:
        """``(num_samples, batch, latent_dim)``: sampling-importance-resampling from ``num_proposals`` (default
        ``num_samples``) encoder draws per row with weights ``p(x_O, y_O, z) / q(z | x_O, y_O)``."""
        loc, scale = self.proposal(batch)
        q = dist.Normal(loc, scale)
        z = q.sample((num_proposals or num_samples,))                     # (S, B, L)
        log_w = self.log_joint(z, batch) - q.log_prob(z).sum(-1)           # (S, B)
        log_w = torch.nan_to_num(log_w, nan=-float("inf"))
        idx = torch.multinomial(torch.softmax(log_w.T, -1), num_samples, replacement=True).T   # (K, B)
        picked = torch.gather(z, 0, idx.unsqueeze(-1).expand(-1, -1, z.shape[-1]))
        return self.decoder_input(picked)


class MIWAE(ImportanceWeighted, VAE):
    """MIWAE (Mattei & Frellsen 2019): :class:`~ppl_vae.models.tabular.vae.VAE` trained with the per-datapoint
    importance-weighted bound (CLI ``miwae``). Sites ``"z"`` ``(K, batch, latent_dim)``, ``"x_<likelihood>"``,
    ``"y_<likelihood>"`` ``(K, batch)``. Options: :class:`MIWAEConfig`."""

    name = "miwae"
    Config = MIWAEConfig


class MIWAEM(ImportanceWeighted, VAEM):
    """MIWAEM (the baseline of Peis et al. 2022 §4): VAEM whose dependency VAE is trained with the per-datapoint
    importance-weighted bound (CLI ``miwaem``); stage 1 (marginal VAEs) is VAEM's. Options: :class:`MIWAEMConfig`."""

    name = "miwaem"
    Config = MIWAEMConfig

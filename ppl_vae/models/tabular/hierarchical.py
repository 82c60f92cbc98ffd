"""Hierarchical table models with an ε-reparameterised hierarchy: H-VAE, H-VAEM and their HMC variants HH-VAE,
HH-VAEM (Peis, Ma & Hernández-Lobato 2022, "Missing Data Imputation and Acquisition with Deep Hierarchical Models and
Hamiltonian Monte Carlo", NeurIPS, §3.2–3.5).

Generative story of one row (§3.2, eqs. 3–4), ``L`` layers of widths ``dims = (d_1, ..., d_L)``::

    ε_l ~ N(0, I_{d_l})                    l = 1..L        (Pyro sites "eps_1" .. "eps_L", in the data plate)
    h_L = ε_L
    h_l = f_μ,l(h_{l+1}) + f_σ,l(h_{l+1}) ⊙ ε_l   l = L-1..1
    x_O | h_1  (VAE: the decoder's masked likelihood; VAEM: the marginal codes, §3.3)
    y | x̂, h_1 (the predictor, §3.4)

The ``h_l`` are deterministic functions of ``ε``; the latents of the Pyro program are the ``ε_l`` only, with a
standard normal prior. This is what keeps HMC on the posterior of ``ε`` well conditioned (Betancourt & Girolami
2015: an autoregressive hierarchy ``h_l ~ N(f_μ(h_{l+1}), f_σ(h_{l+1}))`` has a funnel-shaped posterior).

Guide (§3.2, eq. 5): a bottom-up encoder ``r_0 = [x ⊙ m_x, m_x, y ⊙ m_y, m_y]``, ``r_l = f_r,l(r_{l-1})`` and
``q(ε_l | x_O, y_O) = N(g_μ,l(r_l), g_σ,l(r_l))``, independent across layers given ``r``. Layer 1 reuses the base
model's encoder and Gaussian head.

KL warm-up and balancing (:mod:`ppl_vae.models.schedules`; Vahdat & Kautz 2020 §3.3): every ``eps_l`` site is scaled by the KL weight of
the schedule and, while the schedule is annealing and ``kl_balancing`` is on, by ``L · w_l`` with the detached
balancing weights ``w_l ∝ d_l · KL_l`` (``Σ w_l = 1``, so the mean factor is 1). The per-layer KLs are the guide's
analytic ``KL(q(ε_l) ‖ N(0, I))``, averaged over the batch, computed in the guide of the same step (Pyro runs the
guide before the model).

HMC (§3.5): :class:`HHVAE` / :class:`HHVAEM` refine the stacked ``ε = (ε_1, ..., ε_L)`` with
:class:`~ppl_vae.infer.refined_guide.HMCRefinedGuide` derived from the model's trace; the proposal inflation is one
learnable scale per layer (``inflation="layer"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pyro
import pyro.distributions as dist
from pyro import poutine
import torch
from torch import nn
import torch.nn.functional as F

from ppl_vae.models.base import Batch
from ppl_vae.models.config import resolve_config
from ppl_vae.models.schedules import KLBalancer, gaussian_kl_to_standard_normal
from ppl_vae.models.tabular.hmc import HMCOptions, HMCRefinement
from ppl_vae.models.tabular.vae import VAE, VAEConfig
from ppl_vae.models.tabular.vaem import VAEM, VAEMConfig
from ppl_vae.nn import MLP, GaussianHead

__all__ = ["Hierarchy", "HierarchicalOptions", "HierarchicalLatents", "HVAE", "HVAEM", "HHVAE", "HHVAEM",
           "HVAEConfig", "HVAEMConfig", "HHVAEConfig", "HHVAEMConfig"]


class Hierarchy(nn.Module):
    """The deterministic map ``ε -> h_1`` of the reparameterised hierarchy (Peis et al. 2022, eq. 4).

    ``h_L = ε_L``; ``h_l = f_μ,l(h_{l+1}) + f_σ,l(h_{l+1}) ⊙ ε_l`` with ``f_σ = softplus(·) + 1e-3``; ``f_μ,l`` and
    ``f_σ,l`` share one MLP ``d_{l+1} -> hidden -> 2 d_l``.

    Args:
        dims: ``(d_1, ..., d_L)``, ``L >= 1`` (``L = 1``: ``h_1 = ε_1``, a plain VAE).
        hidden: hidden widths of each layer's MLP.

    Shapes: :meth:`forward` ``(..., batch, Σ d_l)`` flat ``ε`` (layer 1 first) -> ``(..., batch, d_1)``;
    :meth:`layers` returns every ``h_l``.

    Raises:
        ValueError: empty ``dims`` or a non-positive width; a flat ``ε`` of the wrong width.
    """

    def __init__(self, dims: Sequence[int], hidden: Sequence[int] = (64,)):
        super().__init__()
        dims = [int(d) for d in dims]
        if not dims or min(dims) < 1:
            raise ValueError(f"layer_dims must be positive widths, got {dims}")
        self.dims = dims
        self.nets = nn.ModuleList(MLP(dims[l + 1], list(hidden), 2 * dims[l]) for l in range(len(dims) - 1))

    def split(self, eps: torch.Tensor) -> list[torch.Tensor]:
        """Flat ``(..., Σ d_l)`` -> ``[ε_1 (..., d_1), ..., ε_L (..., d_L)]``."""
        if eps.shape[-1] != sum(self.dims):
            raise ValueError(f"flat ε must have {sum(self.dims)} entries (layers {self.dims}), got {eps.shape[-1]}")
        return list(eps.split(self.dims, -1))

    def step(self, l: int, h_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f_μ,l(h_{l+1}), f_σ,l(h_{l+1}))`` for layer ``l`` (0-based, ``l < L - 1``)."""
        mu, raw = self.nets[l](h_above).chunk(2, -1)
        return mu, F.softplus(raw) + 1e-3

    def layers(self, eps: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """``[h_1, ..., h_L]`` from the ``ε_l`` (a list, or the flat vector)."""
        eps = self.split(eps) if isinstance(eps, torch.Tensor) else list(eps)
        h = [None] * len(self.dims)
        h[-1] = eps[-1]
        for l in range(len(self.dims) - 2, -1, -1):
            mu, sigma = self.step(l, h[l + 1])
            h[l] = mu + sigma * eps[l]
        return h

    def forward(self, eps: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return self.layers(eps)[0]


@dataclass
class HierarchicalOptions:
    """Options of the ε-reparameterised hierarchy (mixed into the base model's config).

    Attributes:
        layer_dims: ``(d_1, ..., d_L)``; ``None`` -> ``(latent_dim, max(1, latent_dim // 2))`` (so the paper's
            ``[10, 5]`` by default and ``[4, 2]`` with ``latent_dim=4``, its choice for small tables). ``latent_dim``
            is then ``d_1``, the width of ``h_1`` that the decoder and predictor read.
        hierarchy_hidden: hidden widths of each ``f_μ,l / f_σ,l`` MLP.
        kl_balancing: balance the layers' KL terms while the KL schedule anneals (weights ∝ ``d_l · KL_l``).
    """

    layer_dims: Optional[Sequence[int]] = None
    hierarchy_hidden: Sequence[int] = (64,)
    kl_balancing: bool = True


@dataclass
class HVAEConfig(HierarchicalOptions, VAEConfig):
    """Options of :class:`HVAE`: :class:`~ppl_vae.models.tabular.vae.VAEConfig` + :class:`HierarchicalOptions`."""


@dataclass
class HVAEMConfig(HierarchicalOptions, VAEMConfig):
    """Options of :class:`HVAEM`: :class:`~ppl_vae.models.tabular.vaem.VAEMConfig` + :class:`HierarchicalOptions`."""


@dataclass
class _LayerInflation:
    inflation: str = "layer"


@dataclass
class HHVAEConfig(_LayerInflation, HMCOptions, HVAEConfig):
    """Options of :class:`HHVAE`: :class:`HVAEConfig` + :class:`~ppl_vae.models.tabular.hmc.HMCOptions` with one
    proposal inflation per layer (``inflation="layer"``)."""


@dataclass
class HHVAEMConfig(_LayerInflation, HMCOptions, HVAEMConfig):
    """Options of :class:`HHVAEM`: :class:`HVAEMConfig` + :class:`~ppl_vae.models.tabular.hmc.HMCOptions` with one
    proposal inflation per layer (``inflation="layer"``)."""


class HierarchicalLatents:
    """Mixin replacing a table model's single latent ``h ~ N(0, I)`` by the ε-reparameterised hierarchy (put it
    before the table model class in the bases; see the module docstring).

    What changes: the latent sites (``"eps_1".."eps_L"`` in model and guide), the encoder (bottom-up, one Gaussian
    head per layer), :meth:`decoder_input` (``h_1(ε)``) and the KL scaling (schedule × balancing). Everything else —
    likelihoods, predictor, VAEM's stages, evaluation, the hand-written log joint — is the base model's, applied to
    ``h_1``.

    Raises:
        ValueError: ``layer_dims`` whose first width contradicts an explicitly given ``latent_dim``.
        TypeError: an unknown option.
    """

    latent_site = "eps_1"

    def __init__(self, schema, config=None, **options: Any):
        cfg = resolve_config(type(self).Config, config, options, type(self).__name__)
        dims = tuple(int(d) for d in cfg.layer_dims) if cfg.layer_dims else \
            (int(cfg.latent_dim), max(1, int(cfg.latent_dim) // 2))
        explicit = options.get("latent_dim", config.get("latent_dim") if isinstance(config, dict) else None)
        if explicit is not None and cfg.layer_dims and int(explicit) != dims[0]:
            raise ValueError(f"latent_dim={explicit} contradicts layer_dims={list(dims)} (latent_dim is the width "
                             "of h_1, the first layer)")
        super().__init__(schema, cfg.replace(latent_dim=dims[0], layer_dims=dims))
        self.layer_dims = list(dims)
        self.hierarchy = Hierarchy(dims, self.cfg.hierarchy_hidden)
        width = list(self.cfg.hidden)[-1]
        self.up_nets = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in dims[1:])
        self.up_heads = nn.ModuleList(GaussianHead(width, d) for d in dims[1:])
        self.kl_balancing = bool(self.cfg.kl_balancing)
        self.balancer = KLBalancer(dims)
        self.kl_annealing = False
        self._layer_scales = [1.0] * len(dims)

    # ------------------------------------------------------------------ latent layout
    @property
    def flat_latent_dim(self) -> int:
        """``Σ d_l``: the width of the stacked ``ε`` that HMC moves."""
        return sum(self.layer_dims)

    @property
    def num_latent_sites(self) -> int:
        """``L``, the number of ``eps_l`` sites."""
        return len(self.layer_dims)

    @property
    def latent_sites(self) -> list[str]:
        """``["eps_1", ..., "eps_L"]`` in trace (and flat-vector) order."""
        return [f"eps_{l + 1}" for l in range(len(self.layer_dims))]

    def decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """``h_1(ε)``: ``(..., batch, Σ d_l) -> (..., batch, d_1)``."""
        return self.hierarchy(z)

    # ------------------------------------------------------------------ encoder
    def encoder_modules(self) -> dict:
        """The base encoder (layer 1) plus the bottom-up nets and heads of layers 2..L."""
        return {**super().encoder_modules(), "up_nets": self.up_nets, "up_heads": self.up_heads}

    def generative_modules(self) -> dict:
        """The base model's generative networks plus the hierarchy's ``f_μ,l / f_σ,l``."""
        return {**super().generative_modules(), "hierarchy": self.hierarchy}

    def layer_proposals(self, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(loc_l, scale_l)]`` of ``q(ε_l | x_O, y_O)``, each ``(batch, d_l)`` (bottom-up, eq. 5)."""
        r = torch.relu(self.encoder(self.encoder_input(batch)))
        out = [self.encoder_head(r)]
        for net, head in zip(self.up_nets, self.up_heads):
            r = net(r)
            out.append(head(r))
        return out

    def proposal(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The guide's Gaussian over the flat ``ε``: ``(loc, scale)`` each ``(batch, Σ d_l)``."""
        layers = self.layer_proposals(batch)
        return torch.cat([p[0] for p in layers], -1), torch.cat([p[1] for p in layers], -1)

    # ------------------------------------------------------------------ Pyro sites
    def _update_layer_scales(self, layers) -> None:
        if self.kl_balancing and getattr(self, "kl_annealing", False) and self.training:
            with torch.no_grad():
                kls = torch.stack([gaussian_kl_to_standard_normal(loc, scale).mean() for loc, scale in layers])
            w = self.balancer.update(kls)
            self._layer_scales = [float(v) * len(self.layer_dims) for v in w]
        else:
            self._layer_scales = [1.0] * len(self.layer_dims)

    def sample_latent(self, batch: Batch) -> torch.Tensor:
        """Model side: ``ε_l ~ N(0, I)`` as sites ``eps_l`` (scaled by ``kl_weight × L·w_l``); returns ``h_1``."""
        eps = []
        for l, (name, d) in enumerate(zip(self.latent_sites, self.layer_dims)):
            prior = dist.Normal(batch.x.new_zeros(d), 1.0).expand([batch.size, d])
            with poutine.scale(scale=self.kl_weight * self._layer_scales[l]):
                eps.append(pyro.sample(name, prior.to_event(1)))
        return self.hierarchy(eps)

    def guide_latent(self, batch: Batch) -> None:
        """Guide side: ``q(ε_l | x_O, y_O)`` as sites ``eps_l`` (same scales as the model's)."""
        layers = self.layer_proposals(batch)
        self._update_layer_scales(layers)
        for l, (name, (loc, scale)) in enumerate(zip(self.latent_sites, layers)):
            with poutine.scale(scale=self.kl_weight * self._layer_scales[l]):
                pyro.sample(name, dist.Normal(loc, scale).to_event(1))


class HVAE(HierarchicalLatents, VAE):
    """H-VAE: :class:`~ppl_vae.models.tabular.vae.VAE` with the ε-reparameterised hierarchy (CLI ``h-vae``).

    Sites: ``"eps_1".."eps_L"`` ``(batch, d_l)``; ``"x_<likelihood>"``; ``"y_<likelihood>"``. Options:
    :class:`HVAEConfig`."""

    name = "h-vae"
    Config = HVAEConfig


class HVAEM(HierarchicalLatents, VAEM):
    """H-VAEM: :class:`~ppl_vae.models.tabular.vaem.VAEM` whose dependency VAE has the ε-reparameterised hierarchy
    (CLI ``h-vaem``; Peis et al. 2022 §3.3). Stage 1 (marginal VAEs) is VAEM's.

    Sites of stage 2: ``"eps_1".."eps_L"``, ``"codes"``, ``"y_<likelihood>"``. Options: :class:`HVAEMConfig`."""

    name = "h-vaem"
    Config = HVAEMConfig


class HHVAE(HMCRefinement, HVAE):
    """HH-VAE: :class:`HVAE` whose posterior over the stacked ``ε`` is refined by gradient-tuned HMC with one
    inflation per layer (CLI ``hh-vae``; Peis et al. 2022 §3.5). Options: :class:`HHVAEConfig`."""

    name = "hh-vae"
    Config = HHVAEConfig


class HHVAEM(HMCRefinement, HVAEM):
    """HH-VAEM (Peis et al. 2022): marginal VAEs, a hierarchical dependency VAE over their codes, and HMC on the
    stacked ``ε`` with one inflation per layer (CLI ``hh-vaem``). Options: :class:`HHVAEMConfig`."""

    name = "hh-vaem"
    Config = HHVAEMConfig

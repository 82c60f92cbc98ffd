"""UG-VAE: the Unsupervised Global VAE (Peis, Olmos, Artés-Rodríguez, *Pattern Recognition* 134, 109130, 2023;
"Unsupervised learning of global factors in deep generative models"), declared as a Pyro program.

Generative model of one batch ``X = {x_1..x_B}`` (Peis et al. 2023, the UG-VAE generative model)::

    beta            ~ N(0, I)                                   one global latent per batch, outside the data plate
    for i in plate("data", B):
        d_i         ~ Cat(1/K)                                  enumerated (never sampled)
        z_i | d_i, beta ~ N(mu^(d_i)(beta), diag sigma^(d_i)(beta)^2)   K component networks of beta
        x_i | z_i, beta ~ Bernoulli(logits = f([z_i, beta]))    (or Gaussian for vector data)

Inference model ``q(Z, d, beta | X) = q(Z | X) q(d | Z) q(beta | X, Z)``:

- ``q(z_i | x_i) = N(mu(h(x_i)), sigma(h(x_i)))`` with the shared pre-encoder ``h`` (one 256-unit layer or a conv
  net);
- ``q(d_i | z_i) = Cat(pi(z_i))``, ``pi = softmax(MLP_tanh(z_i))``;
- ``q(beta | X, Z)`` = normalised product of per-point Gaussian experts ``N(mu_i, sigma_i)`` computed from
  ``[h(x_i), pi(z_i)]`` (Bromiley 2003): ``Lambda_beta = 1 + sum_i Lambda_i``, ``mu_beta = Lambda_beta^-1 sum_i
  Lambda_i mu_i``. **The N(0, I) prior is included as one more expert** (``prior_expert=True``, the "+1"); the
  reference code omits it (``prior_expert=False`` reproduces that), so there the posterior variance is exactly
  ``1 / sum_i Lambda_i``.

Objective (``enumerate_d="guide"``, default). The guide declares ``d_i ~ q(d_i | z_i)`` with
``infer={"enumerate": "parallel"}``; :class:`pyro.infer.TraceEnum_ELBO` then sums over ``d_i`` exactly under
``q(d_i | z_i)``, so the per-batch ELBO is the paper's (Peis et al. 2023, UG-VAE ELBO)::

    E_q[log p(X | Z, beta)] - sum_i KL(q(d_i|z_i) || Cat(1/K))
      - sum_i E_q(z_i) [ log q(z_i|x_i) - sum_k pi_k(z_i) log p(z_i | d_i=k, beta) ] - KL(q(beta|X,Z) || p(beta))

(the reference's "KL(q(z|x) || p(z|d,beta)) weighted by pi(z)"), with ``z`` and ``beta`` estimated by one
reparameterised sample each (Pyro uses the sampled log-density ratio where the reference uses the closed-form
Gaussian KLs; both have the same expectation). ``tests/test_ugvae.py`` checks the Pyro loss against this formula
computed by hand, to float precision.

With ``enumerate_d="model"`` the guide has no ``d`` site and the model's ``d`` is enumerated: the ELBO then uses
the exact mixture marginal ``log sum_k (1/K) p(z_i | d_i=k, beta)`` (a bound at least as tight, but ``q(d|z)`` is
then trained only through its role as an input of the global encoder).
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
from ppl_vae.models.image.image import ImageModel, ImageModelConfig, mean_image
from ppl_vae.nn import MLP, ColumnwiseMLP, GaussianHead

__all__ = ["UGVAE", "UGVAEConfig", "product_of_gaussian_experts", "concat_global"]

_ENUMERATE = ("guide", "model")


def product_of_gaussian_experts(loc: torch.Tensor, scale: torch.Tensor, prior_precision: float = 1.0,
                                group: Optional[torch.Tensor] = None, num_groups: Optional[int] = None,
                                weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised product of diagonal Gaussian experts (Bromiley 2003, "Products and convolutions of Gaussian
    probability density functions", eqs. for the product of N Gaussians).

    ``Lambda = prior_precision + sum_i w_i Lambda_i`` with ``Lambda_i = scale_i^-2``, and
    ``mu = Lambda^-1 sum_i w_i Lambda_i mu_i`` (the optional prior expert is ``N(0, prior_precision^-1 I)``, so it
    adds precision but no mean). Used by UG-VAE's global encoder q(beta | X, Z) (Peis et al. 2023, mu_beta and
    Lambda_beta) and by ML-VAE's group-evidence accumulation (Bouchacourt et al. 2018, eq. 6).

    Args:
        loc: ``(..., N, D)`` expert means (``group is None``) or ``(N, D)`` (grouped).
        scale: same shape as ``loc``, positive expert standard deviations.
        prior_precision: precision of the ``N(0, I / prior_precision)`` prior expert; ``0`` omits it (then at least
            one expert per output is needed).
        group: optional ``(N,)`` long group index in ``0..num_groups-1``: one product per group.
        num_groups: number of groups (required with ``group``).
        weight: optional ``(..., N)`` non-negative weights (0 drops an expert, e.g. a padded row).

    Returns:
        ``(loc, scale)`` of the product: ``(..., D)`` each, or ``(num_groups, D)`` with ``group``; ``scale > 0``.

    Raises:
        ValueError: shape mismatch, negative ``prior_precision``, or ``group`` without ``num_groups``.
    """
    if loc.shape != scale.shape:
        raise ValueError(f"expert loc {tuple(loc.shape)} and scale {tuple(scale.shape)} shapes differ")
    if loc.dim() < 2:
        raise ValueError(f"experts must be (..., N, D), got shape {tuple(loc.shape)}")
    if prior_precision < 0:
        raise ValueError(f"prior_precision must be >= 0, got {prior_precision}")
    precision = scale.pow(-2)
    if weight is not None:
        precision = precision * weight.unsqueeze(-1).to(precision.dtype)
    if group is None:
        total = precision.sum(-2) + prior_precision
        mean = (precision * loc).sum(-2) / total
    else:
        if num_groups is None:
            raise ValueError("num_groups is required with group")
        if loc.dim() != 2 or group.shape != loc.shape[:1]:
            raise ValueError(f"grouped experts must be (N, D) with group (N,), got {tuple(loc.shape)} and "
                             f"{tuple(group.shape)}")
        zeros = loc.new_zeros(num_groups, loc.shape[-1])
        total = zeros.index_add(0, group, precision) + prior_precision
        mean = zeros.index_add(0, group, precision * loc) / total
    return mean, total.rsqrt()


def concat_global(local: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
    """Concatenate per-point codes with a (broadcast) global code: the decoder input ``[z_i, beta]``.

    Shapes: ``local (..., B, Dz)`` and ``glob (..., Db)`` broadcastable to ``(..., B, Db)`` (a single ``(Db,)`` beta,
    or ``(..., B, Db)`` per-row codes) -> ``(..., B, Dz + Db)``.
    """
    if glob.dim() < local.dim():
        glob = glob.unsqueeze(-2)
    lead = torch.broadcast_shapes(local.shape[:-1], glob.shape[:-1])
    return torch.cat([local.expand(*lead, local.shape[-1]), glob.expand(*lead, glob.shape[-1])], dim=-1)


@dataclass
class UGVAEConfig(ImageModelConfig):
    """Options of :class:`UGVAE` (defaults: the MNIST settings of the reference code, Peis et al. 2023).

    Attributes:
        dim_z: local latent size (10).
        dim_beta: global latent size (20).
        num_components: K, mixture components of p(z | d, beta) (10).
        prior_expert: include the N(0, I) prior as an expert of q(beta | X, Z) (``True``).
        enumerate_d: ``"guide"`` (sum over d under q(d | z), default) or ``"model"`` (exact mixture marginal).
        x_dim, arch, likelihood, hidden, pixel_scale: see :class:`~ppl_vae.models.image.image.ImageModelConfig`.
    """

    dim_z: int = 10
    dim_beta: int = 20
    num_components: int = 10
    prior_expert: bool = True
    enumerate_d: str = "guide"


class UGVAE(ImageModel):
    """Unsupervised Global VAE (Peis et al. 2023) with local ``z_i``, enumerated mixture component ``d_i`` and a
    global ``beta`` shared by the batch. See the module docstring for the program and its ELBO.

    Args:
        config: a :class:`UGVAEConfig` (or a dict of its options), or ``None`` for the defaults.
        **options: fields of :class:`UGVAEConfig`, overriding ``config``:
            ``x_dim`` (784), ``dim_z`` (10), ``dim_beta`` (20), ``num_components`` (10), ``arch`` (``"mlp"``: one
            256-unit pre-encoder layer and a 256-unit MLP decoder; ``"conv"``: 28x28 conv nets), ``likelihood``
            (``"bernoulli"`` for pixels in ``[0, 1]``, ``"gaussian"`` for vector data), ``hidden`` (256: pre-encoder
            output, q(d|z) net, beta experts, component nets), ``pixel_scale`` (fixed Gaussian scale, the
            reference's variance 0.2 is ``0.2 ** 0.5``; ``None`` learns it), ``prior_expert`` (``True``),
            ``enumerate_d`` (``"guide"`` or ``"model"``).

    Pyro sites: ``beta`` (global, event ``(dim_beta,)``), and in ``plate("data", B)``: ``d`` (enumerated),
    ``z`` (event ``(dim_z,)``), ``x`` (observed, event ``(x_dim,)``, masked by ``batch.x_mask``).

    Raises:
        TypeError: an unknown option (e.g. ``dim_zz``), named.
        ppl_vae.errors.UnknownNameError: unknown ``arch``/``likelihood``/``enumerate_d``.
        ValueError: non-positive sizes, conv with ``x_dim != 784``.
    """

    name = "ug-vae"
    Config = UGVAEConfig
    enumerated = True

    def __init__(self, config: Optional[UGVAEConfig] = None, **options: Any):
        super().__init__(config, **options)
        cfg, hidden = self.cfg, self.cfg.hidden
        self.dim_z, self.dim_beta, self.num_components = cfg.dim_z, cfg.dim_beta, cfg.num_components
        self.prior_expert, self.enumerate_d = cfg.prior_expert, cfg.enumerate_d
        # guide networks (after the shared pre-encoder h(x))
        self.z_head = GaussianHead(hidden, cfg.dim_z)                                      # q(z | x)
        self.d_net = MLP(cfg.dim_z, [hidden], cfg.num_components, activation="tanh")      # q(d | z) logits
        self.beta_net = nn.Sequential(nn.Linear(hidden + cfg.num_components, hidden), nn.ReLU(),
                                      GaussianHead(hidden, cfg.dim_beta))                  # per-point beta experts
        # model networks: the K component nets beta -> (mu_k, log var_k) evaluated as one batched network
        self.component_net = ColumnwiseMLP(cfg.num_components, cfg.dim_beta, [hidden], 2 * cfg.dim_z)
        self.decoder = self.build_decoder(cfg.dim_z + cfg.dim_beta)

    def validate(self, cfg: UGVAEConfig) -> None:
        """Raises :class:`~ppl_vae.errors.UnknownNameError` on an unknown ``enumerate_d``."""
        from ppl_vae.errors import UnknownNameError

        if cfg.enumerate_d not in _ENUMERATE:
            raise UnknownNameError("enumeration mode", cfg.enumerate_d, _ENUMERATE)

    # ------------------------------------------------------------------ building blocks
    def component_params(self, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and scales of the K components of p(z | d, beta).

        ``sigma_k^2 = exp(tanh(raw_k))`` as in the reference code (variances in ``[e^-1, e]``).

        Shapes: ``beta (..., dim_beta) -> (loc, scale)`` each ``(..., K, dim_z)``.
        """
        inputs = beta.unsqueeze(-2).expand(*beta.shape[:-1], self.num_components, self.dim_beta)
        loc, raw = self.component_net(inputs).chunk(2, dim=-1)
        return loc, torch.exp(0.5 * torch.tanh(raw))

    def local_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-encoder features and q(z | x).

        Shapes: ``x (B, x_dim) -> (h (B, hidden), loc (B, dim_z), scale (B, dim_z))``.
        """
        h = self.encoder(x)
        loc, scale = self.z_head(h)
        return h, loc, scale

    def component_probs(self, z: torch.Tensor) -> torch.Tensor:
        """``pi(z) = q(d | z)`` probabilities. Shapes: ``(..., dim_z) -> (..., K)``, rows sum to 1."""
        return F.softmax(self.d_net(z), dim=-1)

    def global_posterior(self, h: torch.Tensor, probs: torch.Tensor,
                         weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(beta | X, Z): the product of the per-point experts ``N(mu_i, sigma_i)`` from ``[h(x_i), pi(z_i)]``
        (plus the N(0, I) prior expert when ``prior_expert``), see :func:`product_of_gaussian_experts`.

        Shapes: ``h (..., B, hidden)``, ``probs (..., B, K)``, optional ``weight (..., B)`` ->
        ``(loc, scale)`` each ``(..., dim_beta)``. Invariant to permutations of the B rows.
        """
        loc_i, scale_i = self.beta_net(torch.cat([h, probs], dim=-1))
        return product_of_gaussian_experts(loc_i, scale_i, 1.0 if self.prior_expert else 0.0, weight=weight)

    # ------------------------------------------------------------------ Pyro program
    def model(self, batch: Batch) -> None:
        """Generative model p(X, Z, d, beta) of one batch (Peis et al. 2023, the UG-VAE joint).

        Args:
            batch: :class:`Batch` with ``x (B, x_dim)`` in ``[0, 1]`` (Bernoulli) and ``x_mask (B, x_dim)``.
        """
        pyro.module(self.pyro_name, self)
        x, dev = batch.x, batch.x.device
        beta = pyro.sample("beta", dist.Normal(x.new_zeros(self.dim_beta), 1.0).to_event(1))
        comp_loc, comp_scale = self.component_params(beta)                     # (K, dim_z)
        with pyro.plate("data", batch.size, device=dev):
            d = pyro.sample("d", dist.Categorical(logits=x.new_zeros(self.num_components)),
                            infer={"enumerate": "parallel"})                    # (B,) or (K, 1) enumerated
            z = pyro.sample("z", dist.Normal(comp_loc[d], comp_scale[d]).to_event(1))
            pyro.sample("x", self.pixel_distribution(self.decoder(concat_global(z, beta)), batch.x_mask), obs=x)

    def guide(self, batch: Batch) -> None:
        """Inference model q(Z | X) q(d | Z) q(beta | X, Z) (Peis et al. 2023, UG-VAE inference model).

        ``d`` is declared (enumerated under ``q(d | z)``) only when ``enumerate_d == "guide"``.
        """
        pyro.module(self.pyro_name, self)
        h, z_loc, z_scale = self.local_posterior(batch.x)
        data = pyro.plate("data", batch.size, device=batch.x.device)
        with data:
            z = pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))
        logits = self.d_net(z)                                                   # (B, K)
        beta_loc, beta_scale = self.global_posterior(h, F.softmax(logits, dim=-1))
        # beta depends on pi(z), never on d: declare it before d (the model's order) so the plate stays valid.
        pyro.sample("beta", dist.Normal(beta_loc, beta_scale).to_event(1))
        if self.enumerate_d == "guide":
            with data:
                pyro.sample("d", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})

    # ------------------------------------------------------------------ experiment helpers
    @torch.no_grad()
    def encode_local(self, batch: Batch) -> torch.Tensor:
        """Posterior mean of the local latent. Shapes: ``batch.x (B, x_dim) -> (B, dim_z)``."""
        return self.local_posterior(batch.x)[1]

    @torch.no_grad()
    def encode_global(self, batch: Batch, sample_z: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(beta | X, Z) for one batch, with ``Z`` at its posterior mean (or sampled).

        Shapes: ``batch.x (B, x_dim) -> ((dim_beta,), (dim_beta,))``; the loc is the posterior-mean global code
        used in the experiments (SVM on structured batches, domain alignment).
        """
        h, z_loc, z_scale = self.local_posterior(batch.x)
        z = z_loc + z_scale * torch.randn_like(z_loc) if sample_z else z_loc
        return self.global_posterior(h, self.component_probs(z))

    @torch.no_grad()
    def generate(self, z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Mean image of p(x | z, beta) (``sigmoid(logits)`` for Bernoulli pixels).

        Shapes: ``z (..., B, dim_z)``, ``beta (dim_beta,)`` or broadcastable ``(..., B, dim_beta)`` ->
        ``(..., B, x_dim)``, in ``(0, 1)`` for Bernoulli.
        """
        return mean_image(self.decoder(concat_global(z, beta)), self.likelihood)

    @torch.no_grad()
    def sample(self, num_batches: int, batch_size: int, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
        """Ancestral samples (mean images): per batch ``beta ~ N(0, I)``, per row ``d ~ Cat(1/K)``,
        ``z ~ p(z | d, beta)``.

        Shapes: ``-> (num_batches, batch_size, x_dim)``. ``generator`` seeds the draws (its device is used).
        """
        device, dtype = self._device_dtype(device)
        beta = torch.randn(num_batches, self.dim_beta, generator=generator, device=device, dtype=dtype)
        loc, scale = self.component_params(beta)                                   # (N, K, dim_z)
        d = torch.randint(self.num_components, (num_batches, batch_size), generator=generator, device=device)
        idx = d.unsqueeze(-1).expand(-1, -1, self.dim_z)
        eps = torch.randn(num_batches, batch_size, self.dim_z, generator=generator, device=device, dtype=dtype)
        z = loc.gather(1, idx) + scale.gather(1, idx) * eps
        return self.generate(z, beta.unsqueeze(-2))

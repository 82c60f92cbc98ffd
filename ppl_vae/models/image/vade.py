"""VaDE: Variational Deep Embedding (Jiang, Zheng, Tan, Tang & Zhou 2017, IJCAI, "Variational Deep Embedding: An
Unsupervised and Generative Approach to Clustering").

Generative model (paper §3.1)::

    for i in plate("data", B):
        c_i ~ Cat(pi),  pi = softmax(pi_logits)       learned cluster weights; enumerated
        z_i | c_i ~ N(mu_c, diag sigma_c^2)            K learned cluster means / scales
        x_i | z_i ~ Bernoulli(logits = f(z_i))         (or Gaussian)

Guide ``q(z_i | x_i) q(c_i | z_i)`` with ``q(c | z) = gamma(z) = p(c | z)``, the posterior responsibility of the
model's current mixture (paper eq. 16, the q(c | x) that maximises the ELBO for a given z), enumerated on the guide
side, so :class:`pyro.infer.TraceEnum_ELBO` computes exactly the VaDE ELBO (paper §3.2) with one draw of z.
``gamma`` is computed from *detached* prior parameters and z: at ``q(c | z) = p(c | z)`` the ELBO is stationary in
``q(c | z)`` (its inner sum equals ``log p(z)``), so the gradient through ``gamma`` is exactly zero and detaching
changes no gradient; it only saves a backward pass and keeps ``gamma`` out of the graph.

Training (:meth:`VaDE.training_stages`; the paper's experimental setup pre-trains an autoencoder, then fits a GMM to
its codes): stage
``"pretrain"`` fits encoder/decoder with a standard-normal prior (``pretrain="vae"``: the VAE ELBO; ``"ae"``:
amortised MAP codes, a ``Delta`` guide, i.e. an autoencoder with an L2 penalty on the codes); its guide keeps the
last ``gmm_rows`` input rows; at step 0 of stage ``"vade"`` a diagonal :class:`sklearn.mixture.GaussianMixture` is
fitted to their encoder means and sets ``pi, mu, sigma`` (:meth:`VaDE.init_from_data`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn
import torch.nn.functional as F

from ppl_vae.models.base import Batch, TrainingStage
from ppl_vae.models.image.image import ImageModel, ImageModelConfig, LocalImageLatent
from ppl_vae.nn import GaussianHead

__all__ = ["VaDE", "VaDEConfig"]


@dataclass
class VaDEConfig(ImageModelConfig):
    """Options of :class:`VaDE`.

    Attributes:
        dim_z: latent size (10, as in Jiang et al. 2017 for MNIST).
        num_clusters: K mixture components / clusters (10).
        pretrain: ``"ae"`` (amortised MAP codes) or ``"vae"`` (standard-normal VAE) for the pre-training stage.
        pretrain_fraction: share of the training steps in the pre-training stage, in ``[0, 1)``; ``0`` skips it
            and the GMM fit (the mixture then starts at ``mu ~ N(0, I)``, ``sigma = 0.69``, uniform ``pi``).
        gmm_rows: input rows kept from the pre-training batches to fit the GMM (the most recent ones).
        x_dim, arch, likelihood, hidden, pixel_scale: see :class:`~ppl_vae.models.image.image.ImageModelConfig`.
    """

    dim_z: int = 10
    num_clusters: int = 10
    pretrain: str = "ae"
    pretrain_fraction: float = 0.5
    gmm_rows: int = 10000


class VaDE(LocalImageLatent, ImageModel):
    """Variational Deep Embedding (Jiang et al. 2017): a VAE whose prior is a learned Gaussian mixture with learned
    weights, clustered by the posterior responsibility ``gamma_c = p(c | z)`` (eq. 16).

    Args:
        config: a :class:`VaDEConfig` (or a dict of its options), or ``None`` for the defaults.
        **options: fields of :class:`VaDEConfig`, overriding ``config``.

    Pyro sites in ``plate("data", B)``: ``c`` (enumerated in model and guide), ``z`` (event ``(dim_z,)``), ``x``.

    Raises:
        TypeError: an unknown option, named. ppl_vae.errors.UnknownNameError: unknown ``arch`` / ``likelihood`` /
        ``pretrain``. ValueError: non-positive sizes, ``pretrain_fraction`` outside ``[0, 1)``.
    """

    name = "vade"
    Config = VaDEConfig
    enumerated = True

    def __init__(self, config: Optional[VaDEConfig] = None, **options: Any):
        super().__init__(config, **options)
        cfg = self.cfg
        self.dim_z, self.num_clusters = cfg.dim_z, cfg.num_clusters
        self.z_head = GaussianHead(cfg.hidden, cfg.dim_z)
        self.pi_logits = nn.Parameter(torch.zeros(cfg.num_clusters))
        self.cluster_loc = nn.Parameter(torch.randn(cfg.num_clusters, cfg.dim_z))
        self.cluster_raw_scale = nn.Parameter(torch.zeros(cfg.num_clusters, cfg.dim_z))
        self.decoder = self.build_decoder(cfg.dim_z)
        self._fit_rows: list[torch.Tensor] = []          # recent pre-training inputs, for the GMM fit

    def validate(self, cfg: VaDEConfig) -> None:
        """Raises UnknownNameError for an unknown ``pretrain``, ValueError for ``pretrain_fraction`` not in [0, 1)."""
        from ppl_vae.errors import UnknownNameError

        if cfg.pretrain not in ("ae", "vae"):
            raise UnknownNameError("pretrain", cfg.pretrain, ("ae", "vae"))
        if not 0 <= cfg.pretrain_fraction < 1:
            raise ValueError(f"pretrain_fraction must be in [0, 1), got {cfg.pretrain_fraction}")

    def cluster_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log pi (K,), mu (K, dim_z), sigma (K, dim_z))``; ``sigma = softplus(raw) + 1e-3``."""
        return F.log_softmax(self.pi_logits, -1), self.cluster_loc, F.softplus(self.cluster_raw_scale) + 1e-3

    def cluster_log_posterior(self, z: torch.Tensor) -> torch.Tensor:
        """``log gamma_c(z) = log p(c | z) = log pi_c N(z | mu_c, sigma_c^2) - log sum_k (...)`` (eq. 16).
        Shapes: ``(..., dim_z) -> (..., K)``, rows of ``exp`` sum to 1. Differentiable (detach where needed)."""
        log_pi, loc, scale = self.cluster_params()
        joint = log_pi + dist.Normal(loc, scale).log_prob(z.unsqueeze(-2)).sum(-1)
        return joint - joint.logsumexp(-1, keepdim=True)

    def model(self, batch: Batch) -> None:
        """p(x, z, c) = p(x | z) N(z | mu_c, sigma_c^2) Cat(c | pi) for every row of ``batch.x (B, x_dim)``."""
        pyro.module(self.pyro_name, self)
        log_pi, loc, scale = self.cluster_params()
        with pyro.plate("data", batch.size, device=batch.x.device):
            c = pyro.sample("c", dist.Categorical(logits=log_pi), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(loc[c], scale[c]).to_event(1))
            pyro.sample("x", self.pixel_distribution(self.decoder(z), batch.x_mask), obs=batch.x)

    def guide(self, batch: Batch) -> None:
        """q(z | x) q(c | z) with ``q(c | z) = gamma(z)`` from detached prior parameters; ``c`` enumerated."""
        pyro.module(self.pyro_name, self)
        loc, scale = self.z_head(self.encoder(batch.x))
        with pyro.plate("data", batch.size, device=batch.x.device):
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            with torch.no_grad():
                logits = self.cluster_log_posterior(z)
            pyro.sample("c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})

    def pretrain_model(self, batch: Batch) -> None:
        """Stage-1 model p(x | z) N(z | 0, I): the mixture parameters are not registered, hence not trained."""
        for part in ("encoder", "z_head", "decoder", "pixel_scale"):
            if getattr(self, part) is not None:
                pyro.module(f"{self.pyro_name}_{part}", getattr(self, part))
        with pyro.plate("data", batch.size, device=batch.x.device):
            z = pyro.sample("z", dist.Normal(batch.x.new_zeros(self.dim_z), 1.0).to_event(1))
            pyro.sample("x", self.pixel_distribution(self.decoder(z), batch.x_mask), obs=batch.x)

    def pretrain_guide(self, batch: Batch) -> None:
        """Stage-1 guide: ``N(mu(x), sigma(x))`` (``pretrain="vae"``) or ``Delta(mu(x))`` (``"ae"``); keeps the
        last ``gmm_rows`` rows of ``batch.x`` for the GMM fit."""
        self._fit_rows = (self._fit_rows + [batch.x.detach()])[-(self.cfg.gmm_rows // batch.size + 1):]
        loc, scale = self.z_head(self.encoder(batch.x))
        q = dist.Normal(loc, scale) if self.cfg.pretrain == "vae" else dist.Delta(loc)
        with pyro.plate("data", batch.size, device=batch.x.device):
            pyro.sample("z", q.to_event(1))

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, seed: Optional[int] = None) -> None:
        """Set ``pi, mu, sigma`` from a diagonal GaussianMixture (scikit-learn) fitted to the encoder means of
        ``images (N, x_dim)`` (as in Jiang et al. 2017's experiments). ``seed`` defaults to a draw from torch's RNG.

        Raises:
            ValueError: ``images`` is not ``(N, x_dim)`` with ``N >= num_clusters``.
        """
        from sklearn.mixture import GaussianMixture

        if images.dim() != 2 or images.shape[1] != self.x_dim or images.shape[0] < self.num_clusters:
            raise ValueError(f"init_from_data needs (N >= {self.num_clusters}, {self.x_dim}) images, "
                             f"got {tuple(images.shape)}")
        z = torch.cat([self.z_head(self.encoder(x))[0] for x in images.to(self.cluster_loc.device).split(2048)])
        seed = int(torch.randint(2 ** 31 - 1, ())) if seed is None else seed
        gmm = GaussianMixture(self.num_clusters, covariance_type="diag", n_init=5, random_state=seed)
        gmm.fit(z.double().cpu())
        like = self.cluster_loc
        self.pi_logits.copy_(torch.as_tensor(gmm.weights_).log().to(like))
        self.cluster_loc.copy_(torch.as_tensor(gmm.means_).to(like))
        sigma = (torch.as_tensor(gmm.covariances_).sqrt() - 1e-3).clamp_min(1e-4)
        self.cluster_raw_scale.copy_((sigma + torch.log(-torch.expm1(-sigma))).to(like))   # softplus^-1

    def _init_mixture(self, step: int) -> None:
        if step == 0 and self._fit_rows:
            self.init_from_data(torch.cat(self._fit_rows)[-self.cfg.gmm_rows:])
            self._fit_rows = []

    def training_stages(self, steps: int, lr: float = 5e-3) -> list[TrainingStage]:
        """``"pretrain"`` (``Trace_ELBO``, ``round(pretrain_fraction * steps)`` steps, at most ``steps - 1``) then
        ``"vade"`` (``TraceEnum_ELBO(max_plate_nesting=1)``, the rest; the GMM fit runs before its first step;
        the config's ``kl_schedule`` applies to this stage only).
        A run resumed exactly at the start of ``"vade"`` has no kept rows: call :meth:`init_from_data` before it."""
        import pyro.infer

        first = min(int(round(self.cfg.pretrain_fraction * steps)), steps - 1)
        vade = self.elbo_stage("vade", pyro.infer.TraceEnum_ELBO(max_plate_nesting=1), steps - first, lr)
        anneal = vade.on_step                                  # the config's KL schedule, if any
        vade.on_step = lambda t: (self._init_mixture(t), anneal is not None and anneal(t))
        if first == 0:
            return [vade]
        return [TrainingStage("pretrain", self.pretrain_model, self.pretrain_guide, pyro.infer.Trace_ELBO(),
                              first, lr), vade]

    @torch.no_grad()
    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """``gamma(E_q[z | x])``: cluster posteriors at the posterior mean. Shapes: ``(N, x_dim) -> (N, K)``."""
        x = x.to(self.cluster_loc.device)
        return torch.cat([self.cluster_log_posterior(self.z_head(self.encoder(c))[0]).exp() for c in x.split(2048)])

    def cluster(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster of each row: ``argmax_c gamma_c`` (Jiang et al. eq. 16). Shapes: ``(N, x_dim) -> (N,)`` long."""
        return self.responsibilities(x).argmax(-1)

    @torch.no_grad()
    def sample(self, num_batches: int, batch_size: int, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
        """Ancestral mean images: ``c ~ Cat(pi)``, ``z ~ N(mu_c, sigma_c^2)``. Shapes: ``-> (num_batches,
        batch_size, x_dim)``."""
        device = device or self.cluster_loc.device
        log_pi, loc, scale = (p.to(device) for p in self.cluster_params())
        c = torch.multinomial(log_pi.exp(), num_batches * batch_size, True, generator=generator)
        eps = torch.randn(num_batches, batch_size, self.dim_z, generator=generator, device=device, dtype=loc.dtype)
        return self.generate(loc[c].reshape(eps.shape) + scale[c].reshape(eps.shape) * eps)

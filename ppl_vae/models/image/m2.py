"""M2, the semi-supervised VAE of Kingma, Rezende, Mohamed & Welling 2014 ("Semi-supervised learning with deep
generative models", NeurIPS, §2.2 "generative semi-supervised model").

Program (per datapoint; the class y is observed on the labelled rows ``batch.y_mask`` and latent elsewhere)::

    for i in plate("data", B):
        y_i ~ Cat(1/K)                         observed where labelled, summed out exactly where not
        z_i ~ N(0, I)
        x_i | y_i, z_i ~ Bernoulli(logits = f([z_i, onehot(y_i)]))     (or Gaussian)

Guide ``q(y_i | x_i) q(z_i | x_i, y_i)`` with ``q(y | x) = Cat(softmax(g(h(x))))`` (the classifier) and
``q(z | x, y) = N(mu, sigma)([h(x), onehot(y)])``. The label site is
``pyro.sample("y", ..., obs=y, obs_mask=labelled)``, which Pyro splits into ``y_observed`` (the labels) and
``y_unobserved`` (the latent class); the guide's ``y_unobserved`` is enumerated in parallel under q(y | x) on
unlabelled rows and is a point mass on the label on labelled rows (the guide never draws an observed label: log q = 0
there and the other K-1 values have probability 0, which :class:`pyro.infer.TraceEnum_ELBO` drops). So
``TraceEnum_ELBO(max_plate_nesting=1)`` gives exactly Kingma et al.'s ``-L(x, y)`` (eq. 6) on labelled rows and
``-U(x) = -sum_y q(y|x) L(x, y) - H(q(y|x))`` (eq. 7) on unlabelled ones.
:class:`SemiSupervisedELBO` adds the classification term of eq. 9 (``alpha``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from ppl_vae.errors import PplVaeError
from ppl_vae.models.base import Batch, TrainingStage
from ppl_vae.models.image.cvae import with_onehot
from ppl_vae.models.image.image import ImageModel, ImageModelConfig
from ppl_vae.nn import MLP, GaussianHead

__all__ = ["M2", "M2Config", "SemiSupervisedELBO"]


@dataclass
class M2Config(ImageModelConfig):
    """Options of :class:`M2`.

    Attributes:
        dim_z: latent size (10).
        num_classes: K classes (10).
        alpha: weight ``alpha / N`` of Kingma et al. eq. 9, ``J^a = J + a E_labelled[-log q(y|x)]`` with the data
            set's N rows: the paper's ``a = 0.1 N`` is ``alpha = 0.1``. Per minibatch of B rows of which B_l are
            labelled the term is ``alpha * B / B_l * sum_labelled -log q(y|x)`` (>= 0; 0 drops it).
        x_dim, arch, likelihood, hidden, pixel_scale, kl_schedule, kl_warmup, kl_cycles, kl_ratio: see
            :class:`~ppl_vae.models.image.image.ImageModelConfig`.
    """

    dim_z: int = 10
    num_classes: int = 10
    alpha: float = 0.1


class SemiSupervisedELBO(pyro.infer.ELBO):
    """Kingma et al. 2014 eq. 9 as one Pyro loss: ``TraceEnum_ELBO(max_plate_nesting=1)`` of the model/guide SVI
    passes plus ``Trace_ELBO`` of ``classification_model`` (observed sites only, empty guide), gradients of both
    accumulated by :meth:`loss_and_grads`.

    Attributes:
        last_stats: ``{"neg_elbo", "classification"}`` per row of the latest step (shown by the Trainer).
    """

    def __init__(self, classification_model):
        super().__init__(num_particles=1, max_plate_nesting=1)
        self.elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
        self.aux, self.classification_model = pyro.infer.Trace_ELBO(), classification_model
        self.last_stats: dict[str, float] = {}

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - not a trace-based estimator
        raise NotImplementedError("SemiSupervisedELBO combines two losses; use loss / loss_and_grads")

    def loss(self, model, guide, *args, **kwargs) -> float:
        """``-ELBO + alpha`` term (float, no gradients)."""
        return (self.elbo.loss(model, guide, *args, **kwargs)
                + self.aux.loss(self.classification_model, _no_latents, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Both terms with their gradients accumulated in ``.grad``; returns their sum (float)."""
        neg_elbo = self.elbo.loss_and_grads(model, guide, *args, **kwargs)
        cls = self.aux.loss_and_grads(self.classification_model, _no_latents, *args, **kwargs)
        rows = getattr(args[0], "size", 1) if args else 1
        self.last_stats = {"neg_elbo": neg_elbo / rows, "classification": cls / rows}
        return neg_elbo + cls


def _no_latents(*args, **kwargs) -> None:
    """The empty guide of a program whose sites are all observed."""


class M2(ImageModel):
    """Semi-supervised VAE M2 (Kingma et al. 2014, §2.2): p(y) = Cat(1/K), p(z) = N(0, I), p(x | y, z); guide
    q(y | x) q(z | x, y); the label is observed where ``batch.y_mask`` is True and enumerated where not.

    Args:
        config: an :class:`M2Config` (or a dict of its options), or ``None`` for the defaults.
        **options: fields of :class:`M2Config`, overriding ``config``: ``dim_z`` (10), ``num_classes`` (10),
            ``alpha`` (0.1, eq. 9 weight / N) and ``x_dim``, ``arch``, ``likelihood``, ``hidden``, ``pixel_scale``,
            ``kl_*`` (see :mod:`ppl_vae.models.image.image`).

    Networks: the shared pre-encoder ``h(x)``, classifier ``g = MLP(hidden, [hidden], K)`` on ``h(x)``,
    ``q(z | x, y)`` a Gaussian head on ``[h(x), onehot(y)]``, decoder on ``[z, onehot(y)]``.

    Pyro sites in ``plate("data", B)``: ``y_observed`` (labelled rows), ``y_unobserved`` (enumerated; a guide site
    for every row), ``y`` (deterministic merge), ``z`` (event ``(dim_z,)``), ``x`` (observed). A batch may have no
    labels at all (``batch.y`` None). Labels are ``batch.y (B, 1)`` float class codes.

    Raises:
        TypeError: an unknown option, named. ppl_vae.errors.UnknownNameError: unknown ``arch`` / ``likelihood``.
        ValueError: non-positive sizes, ``alpha < 0``. PplVaeError: a labelled code outside ``0..K-1`` or
            ``batch.y`` not ``(B, 1)`` (from ``model`` / ``guide``).
    """

    name = "m2"
    Config = M2Config
    enumerated = True

    def __init__(self, config: Optional[M2Config] = None, **options: Any):
        super().__init__(config, **options)
        self.dim_z, self.num_classes, self.alpha = self.cfg.dim_z, self.cfg.num_classes, float(self.cfg.alpha)
        self.classifier = MLP(self.cfg.hidden, [self.cfg.hidden], self.num_classes)  # q(y | x) on h(x)
        self.z_head = GaussianHead(self.cfg.hidden + self.num_classes, self.dim_z)   # q(z | x, y)
        self.decoder = self.build_decoder(self.dim_z + self.num_classes)              # p(x | y, z)

    def validate(self, cfg: M2Config) -> None:
        """Raises ValueError unless ``alpha >= 0``."""
        if not cfg.alpha >= 0:
            raise ValueError(f"M2: alpha must be >= 0, got {cfg.alpha}")

    def labels(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y (B,) long codes, 0 where unlabelled; labelled (B,) bool)`` of a batch.

        Raises:
            PplVaeError: ``batch.y`` not ``(B, 1)`` or a labelled code not an integer in ``0..K-1``.
        """
        if batch.y is None or batch.y_mask is None:
            return batch.x.new_zeros(batch.size, dtype=torch.long), batch.x.new_zeros(batch.size, dtype=torch.bool)
        if batch.y.dim() != 2 or batch.y.shape[-1] != 1:
            raise PplVaeError(f"M2: batch.y must be (B, 1) class codes, got {tuple(batch.y.shape)}")
        labelled = batch.y_mask[:, 0].bool()
        code = torch.where(labelled, batch.y[:, 0], torch.zeros_like(batch.y[:, 0]))
        y = code.round().long()
        if bool(((y < 0) | (y >= self.num_classes) | (y.to(code.dtype) != code)).any()):
            raise PplVaeError(f"M2: labelled batch.y must hold integer class codes in 0..{self.num_classes - 1}")
        return y, labelled

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(y | x). Shapes: ``(..., x_dim) -> (..., K)``."""
        return self.classifier(self.encoder(x))

    def model(self, batch: Batch) -> None:
        """p(x, y, z) = p(x | y, z) N(z; 0, I) Cat(y; 1/K), ``y`` observed on the labelled rows."""
        pyro.module(self.pyro_name, self)
        y_obs, labelled = self.labels(batch)
        with pyro.plate("data", batch.size, device=batch.x.device):
            y = pyro.sample("y", dist.Categorical(logits=batch.x.new_zeros(self.num_classes)), obs=y_obs,
                            obs_mask=labelled, infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(batch.x.new_zeros(self.dim_z), 1.0).to_event(1))
            out = self.decoder(with_onehot(z, y, self.num_classes))
            pyro.sample("x", self.pixel_distribution(out, batch.x_mask), obs=batch.x)

    def guide(self, batch: Batch) -> None:
        """q(y | x) on unlabelled rows (enumerated; a point mass on the label elsewhere), then q(z | x, y)."""
        pyro.module(self.pyro_name, self)
        y_obs, labelled = self.labels(batch)
        h = self.encoder(batch.x)
        point_mass = torch.nn.functional.one_hot(y_obs, self.num_classes).to(h.dtype).log()
        logits = torch.where(labelled[:, None], point_mass, self.classifier(h).log_softmax(-1))
        with pyro.plate("data", batch.size, device=batch.x.device):
            y = pyro.sample("y_unobserved", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
            loc, scale = self.z_head(with_onehot(h, torch.where(labelled, y_obs, y), self.num_classes))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def classification_model(self, batch: Batch) -> None:
        """The classification term of Kingma et al. eq. 9 as observed sites: ``alpha * B / B_l * log q(y|x)`` on
        the ``B_l`` labelled rows (nothing when there are none or ``alpha = 0``)."""
        pyro.module(self.pyro_name, self)
        y_obs, labelled = self.labels(batch)
        n = int(labelled.sum())
        if n == 0 or self.alpha == 0:
            return
        logits = self.class_logits(batch.x)
        with pyro.plate("data", batch.size, device=batch.x.device), poutine.mask(mask=labelled), \
                poutine.scale(scale=self.alpha * batch.size / n):
            pyro.sample("y_classify", dist.Categorical(logits=logits), obs=y_obs)

    def training_stages(self, steps: int, lr: float = 5e-3) -> list[TrainingStage]:
        """One stage: :class:`SemiSupervisedELBO` (enumerated ELBO + eq. 9 classification term), Adam ``lr``; the
        config's KL schedule (:meth:`~ppl_vae.models.image.image.ImageModel.kl_annealing`) applies to the ELBO."""
        return [self.elbo_stage("elbo", SemiSupervisedELBO(self.classification_model), steps, lr)]

    @torch.no_grad()
    def class_probs(self, x: torch.Tensor) -> torch.Tensor:
        """q(y | x). Shapes: ``(N, x_dim) -> (N, K)``, rows sum to 1."""
        return self.class_logits(x).softmax(-1)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes ``argmax_y q(y | x)``. Shapes: ``(N, x_dim) -> (N,)`` long."""
        return self.class_logits(x).argmax(-1)

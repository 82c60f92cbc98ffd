"""The shared contract every model family follows.

A *batch* is one :class:`Batch` on one device. A *model* is a :class:`LatentVariableModel`: a ``torch.nn.Module``
whose ``model(batch)`` and ``guide(batch)`` are Pyro programs (every latent is a ``pyro.sample`` site inside
``pyro.plate("data", ...)``; every observation is a masked likelihood), and whose :meth:`training_stages` lists
the Pyro SVI stages that train it (VAEM: marginal VAEs, then the dependency VAE; HMC models: ELBO pre-training,
then joint VAE + HMC). :class:`ppl_vae.infer.Trainer` runs any such model the same way.

Modules are plain ``torch.nn.Module`` s registered with ``pyro.module(name, submodule)`` inside the stage's program,
so each stage states exactly which parameters it trains (a frozen stage-1 network is simply not registered).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

__all__ = ["Batch", "TrainingStage", "LatentVariableModel"]


@dataclass
class Batch:
    """A minibatch of a (possibly partially observed) data set, all tensors on one device.

    Attributes:
        x: ``(batch, D)`` float features in the *normalised* domain (see ``ppl_vae.data``). Missing entries hold
            an arbitrary finite value (zero by convention); they are never read by a likelihood because
            ``x_mask`` masks them. Categorical columns hold the category code ``0..K-1`` as a float.
        x_mask: ``(batch, D)`` bool, ``True`` where the entry is observed.
        y: ``(batch, Dy)`` float target in the normalised domain (class code for classification), or ``None``.
        y_mask: ``(batch, Dy)`` bool, ``True`` where the target is observed, or ``None``.
        group: ``(batch,)`` long group label (ML-VAE group supervision, class of a structured batch), or ``None``.
        index: ``(batch,)`` long row index into the data set the batch came from, or ``None``.

    Raises:
        ValueError: from :meth:`validate` when shapes disagree or values are non-finite.
    """

    x: torch.Tensor
    x_mask: torch.Tensor
    y: Optional[torch.Tensor] = None
    y_mask: Optional[torch.Tensor] = None
    group: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    #: per-batch derived quantities a model computes once (e.g. VAEM's frozen marginal codes), keyed by name and
    #: valid only for the data it was computed from (see :meth:`cached`); not copied by :meth:`to`,
    #: :meth:`replace` or row selection.
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        """Number of datapoints (rows) in the batch."""
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        """The device of ``x`` (every tensor of a batch lives there)."""
        return self.x.device

    @property
    def has_target(self) -> bool:
        """Whether the batch carries a target ``y`` (possibly all missing)."""
        return self.y is not None

    def to(self, device: torch.device | str) -> "Batch":
        """Return a copy with every tensor moved to ``device``."""
        return Batch(**{name: (None if value is None else value.to(device)) for name, value in self._tensors()})

    def replace(self, **changes: Any) -> "Batch":
        """Return a copy with some fields replaced (``dataclasses.replace``)."""
        return replace(self, cache={}, **changes)

    def __getitem__(self, rows) -> "Batch":
        """Select rows (an index tensor, slice or boolean mask); returns a new :class:`Batch`."""
        return Batch(**{name: (None if value is None else value[rows]) for name, value in self._tensors()})

    def _tensors(self):
        return [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "cache"]

    def data_fingerprint(self) -> Optional[tuple]:
        """Identity of the data the cache was computed from: per field ``x, x_mask, y, y_mask`` the tensor object,
        its in-place version counter (bumped by every in-place torch write: ``mask[i, j] = True``, ``mask.fill_``,
        ``x.copy_``) and its storage pointer and shape. ``None`` when a tensor has no version counter (created under
        ``torch.inference_mode``): such a batch is never cached.

        Writes that bypass torch's version counter (through a NumPy view or ``tensor.data``) are not detected;
        edit masks with torch operations or build a new :class:`Batch`.
        """
        fp = []
        for value in (self.x, self.x_mask, self.y, self.y_mask):
            if value is None:
                fp.append(None)
                continue
            try:
                version = value._version
            except RuntimeError:  # inference tensors have no version counter
                return None
            fp.append((value, version, value.data_ptr(), tuple(value.shape)))
        return tuple(fp)

    @staticmethod
    def _same_fingerprint(a: Optional[tuple], b: Optional[tuple]) -> bool:
        if a is None or b is None or len(a) != len(b):
            return False
        for u, v in zip(a, b):
            if (u is None) != (v is None):
                return False
            if u is not None and (u[0] is not v[0] or u[1:] != v[1:]):
                return False
        return True

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """Return ``self.cache[key]``, computing and storing it with ``compute()`` on first use.

        Entries are tied to :meth:`data_fingerprint`: an in-place edit of ``x``/``x_mask``/``y``/``y_mask`` (e.g.
        revealing a feature, ``batch.x_mask[i, d] = True``) or assigning a new tensor to one of these fields drops
        every cached entry, so no mask-dependent value (feature masks, encoder features, VAEM codes, hence
        ``q(h | x_O)``) can go stale.
        """
        fp = self.data_fingerprint()
        if fp is None:
            self.cache.clear()
            return compute()
        if not self._same_fingerprint(self.cache.get("__fingerprint__"), fp):
            self.cache.clear()
            self.cache["__fingerprint__"] = fp
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def validate(self) -> "Batch":
        """Check shapes and finiteness; returns ``self``.

        Raises:
            ValueError: naming the field at fault (shape mismatch, non-finite observed value, wrong rank).
        """
        if self.x.dim() != 2:
            raise ValueError(f"Batch.x must be (batch, D), got shape {tuple(self.x.shape)}")
        if self.x_mask.shape != self.x.shape:
            raise ValueError(f"Batch.x_mask shape {tuple(self.x_mask.shape)} != x shape {tuple(self.x.shape)}")
        if not torch.isfinite(self.x[self.x_mask.bool()]).all():
            raise ValueError("Batch.x has non-finite observed entries (inf); NaN must be encoded in x_mask")
        if self.y is not None:
            if self.y.dim() != 2 or self.y.shape[0] != self.x.shape[0]:
                raise ValueError(f"Batch.y must be (batch, Dy) with batch={self.x.shape[0]}, got {tuple(self.y.shape)}")
            if self.y_mask is None or self.y_mask.shape != self.y.shape:
                raise ValueError("Batch.y_mask must be given with the shape of Batch.y")
        return self


@dataclass
class TrainingStage:
    """One stage of training: a Pyro model/guide pair optimised by ``pyro.infer.SVI`` for ``steps`` steps.

    Attributes:
        name: stage name shown in the progress bar and stored in checkpoints (e.g. ``"marginal"``, ``"elbo"``).
        model: Pyro model callable ``model(batch)``.
        guide: Pyro guide callable ``guide(batch)``.
        loss: a ``pyro.infer.ELBO`` (``Trace_ELBO``, ``TraceEnum_ELBO``, ...) or any object with Pyro's
            ``loss(model, guide, batch)`` / ``loss_and_grads(model, guide, batch)`` interface (the HMC objective).
        steps: number of SVI steps in this stage.
        lr: default Adam learning rate of the stage.
        param_lrs: optional ``{pyro param-name prefix: learning rate}``; parameters matching a prefix get their own
            learning rate (and, as ``PyroOptim`` keeps one optimiser per parameter, their own optimiser state).
        on_step: optional callback ``on_step(stage_step)`` run before each step (KL warm-up schedules).
    """

    name: str
    model: Callable
    guide: Callable
    loss: Any
    steps: int
    lr: float = 1e-3
    param_lrs: Optional[Mapping[str, float]] = None
    on_step: Optional[Callable[[int], None]] = None


class LatentVariableModel(nn.Module):
    """Base class of every ppl_vae model family.

    Subclasses define ``model(batch)`` and ``guide(batch)`` as Pyro programs and :meth:`training_stages`.
    ``self.config`` holds the constructor keyword arguments (JSON-serialisable) so that a checkpoint can rebuild the
    model: ``type(model)(**config)``.

    Table models (VAE, VAEM, hierarchical, HMC) additionally implement the evaluation contract used by
    :mod:`ppl_vae.infer.evaluation`:

    - ``posterior_latents(batch, num_samples) -> (num_samples, batch, latent_dim)`` samples of the latent the
      decoder reads (encoder samples, or HMC chains for HMC models);
    - ``decode(latent, batch) -> (x_log_prob_fn, y_dist)``, see :class:`ppl_vae.models.tabular.vae.VAE`.
    """

    #: CLI / registry name, set by subclasses (e.g. ``"vae"``).
    name: str = "model"

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config: dict = dict(config)

    def model(self, batch: Batch) -> None:  # pragma: no cover - abstract
        """The generative Pyro program p(x, latents) for ``batch``."""
        raise NotImplementedError

    def guide(self, batch: Batch) -> None:  # pragma: no cover - abstract
        """The amortised proposal q(latents | x) as a Pyro program."""
        raise NotImplementedError

    def training_stages(self, steps: int, lr: float = 1e-3) -> list[TrainingStage]:
        """Default: a single ``Trace_ELBO`` stage of ``steps`` steps on ``model``/``guide``."""
        import pyro.infer

        return [TrainingStage("elbo", self.model, self.guide, pyro.infer.Trace_ELBO(), steps, lr)]

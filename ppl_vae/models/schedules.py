"""KL schedules any model can use: linear and cyclical annealing of the KL weight, and KL balancing across layers.

A KL schedule is a callable ``schedule(step) -> weight`` (a float) evaluated before each optimisation step; a model
multiplies its latent sites' log densities by the weight with ``poutine.scale`` (the KL term of the ELBO, since the
guide's sites carry the same scale). Three schedules:

- :class:`ConstantKL`: ``β`` at every step (β-VAE, Higgins et al. 2017).
- :class:`LinearKL`: ``β · min(1, (step + 1) / warmup)`` (KL warm-up; Bowman et al. 2016, Sønderby et al. 2016;
  HH-VAEM, Peis et al. 2022 §4 uses it over the first ~1k steps).
- :class:`CyclicalKL`: the cyclical schedule of Fu et al. (2019), "Cyclical Annealing Schedule: A Simple Approach to
  Mitigating KL Vanishing", NAACL, eq. (4): ``total`` steps split into ``cycles`` cycles of length
  ``P = total / cycles``; within a cycle at position ``τ = (step mod P) / P`` the weight rises linearly from 0 to
  ``β`` over the first fraction ``ratio`` of the cycle (``β · τ / ratio``) and stays at ``β`` for the rest.

:class:`KLBalancer` gives the per-layer weights of KL balancing (Vahdat & Kautz 2020, "NVAE", NeurIPS, §3.3; used
during the KL warm-up of HH-VAEM, Peis et al. 2022): ``w_l ∝ dim_l · KL_l`` with the KLs detached, ``Σ_l w_l = 1``. A layer that carries a large KL is
penalised more, so no layer collapses while the others absorb the information. Unlike the HH-VAEM reference code,
the weights are computed from detached KLs, so no gradient flows through the weights themselves.

:func:`make_kl_schedule` builds one from a name (``"constant" | "linear" | "cyclical"``).

:class:`KLAnnealing` applies a schedule to *any* Pyro model/guide pair without touching the model's code: a
``poutine`` messenger that multiplies the log-density of every latent (unobserved, not enumerated) sample site by
the current weight, in the model and the guide alike, so ``Trace_ELBO`` estimates
``E_q[log p(x | z)] - w · KL(q(z | x) || p(z))`` (with the guide's entropy weighted too; Fu et al. 2019 §3).
Enumerated discrete sites and observations keep weight 1. The image models (:mod:`ppl_vae.models.image`) take it
from their ``kl_schedule`` option.
"""
from __future__ import annotations

from typing import Sequence

from dataclasses import dataclass
from typing import Optional

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ppl_vae.models.base import TrainingStage
from ppl_vae.models.config import ModelConfig

__all__ = ["KL_SCHEDULES", "KLAnnealing", "KLScheduleConfig", "annealed_stage", "ConstantKL", "LinearKL", "CyclicalKL", "KLBalancer", "make_kl_schedule",
           "gaussian_kl_to_standard_normal"]

KL_SCHEDULES = ("constant", "linear", "cyclical")


class ConstantKL:
    """``weight(step) = beta``."""

    def __init__(self, beta: float = 1.0):
        self.beta = float(beta)

    def __call__(self, step: int) -> float:
        return self.beta

    def annealing(self, step: int) -> bool:
        """Whether ``step`` lies in an annealing phase (never for a constant weight)."""
        return False


class LinearKL:
    """Linear warm-up: ``weight(step) = beta · min(1, (step + 1) / warmup)``; ``warmup = 0`` means ``beta``.

    Raises:
        ValueError: ``warmup < 0``.
    """

    def __init__(self, warmup: int, beta: float = 1.0):
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup, self.beta = int(warmup), float(beta)

    def __call__(self, step: int) -> float:
        if self.warmup == 0:
            return self.beta
        return self.beta * min(1.0, (int(step) + 1) / self.warmup)

    def annealing(self, step: int) -> bool:
        """Whether the weight is still rising at ``step``."""
        return int(step) + 1 < self.warmup


class CyclicalKL:
    """Cyclical annealing (Fu et al. 2019, eq. 4): ``cycles`` cycles over ``total`` steps, each rising linearly from
    0 to ``beta`` over the first ``ratio`` of the cycle, then flat at ``beta``. Steps past ``total`` get ``beta``.

    Example: ``CyclicalKL(total=100, cycles=2, ratio=0.5)`` gives 0 at step 0, 0.48 at step 12, 1.0 from step 25 to
    49, 0 again at step 50 and 1.0 from step 100 on.

    Raises:
        ValueError: ``total < 1``, ``cycles < 1`` or ``ratio`` outside ``(0, 1]``.
    """

    def __init__(self, total: int, cycles: int = 4, ratio: float = 0.5, beta: float = 1.0):
        if total < 1 or cycles < 1 or not 0.0 < ratio <= 1.0:
            raise ValueError(f"need total >= 1, cycles >= 1 and 0 < ratio <= 1; got {total}, {cycles}, {ratio}")
        self.total, self.cycles, self.ratio, self.beta = int(total), int(cycles), float(ratio), float(beta)
        self.period = self.total / self.cycles

    def _tau(self, step: int) -> float:
        return (int(step) % self.period) / self.period

    def __call__(self, step: int) -> float:
        if step >= self.total:
            return self.beta
        return self.beta * min(1.0, self._tau(step) / self.ratio)

    def annealing(self, step: int) -> bool:
        """Whether ``step`` lies in a rising phase of a cycle."""
        return step < self.total and self._tau(step) < self.ratio


def make_kl_schedule(kind: str, *, beta: float = 1.0, warmup: int = 0, total: int = 1, cycles: int = 4,
                     ratio: float = 0.5):
    """A KL schedule by name.

    Args:
        kind: ``"constant"`` (β), ``"linear"`` (warm-up over ``warmup`` steps), ``"cyclical"`` (``cycles`` cycles
            over ``total`` steps, rising over ``ratio`` of each).

    Raises:
        ValueError: unknown ``kind`` (lists the choices) or bad sizes.
    """
    if kind == "constant":
        return ConstantKL(beta)
    if kind == "linear":
        return LinearKL(warmup, beta)
    if kind == "cyclical":
        return CyclicalKL(max(1, int(total)), cycles, ratio, beta)
    raise ValueError(f"unknown KL schedule {kind!r}; choose one of {KL_SCHEDULES}")


def gaussian_kl_to_standard_normal(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``KL(N(loc, scale²) ‖ N(0, I))`` summed over the last dimension: ``(..., d) -> (...)``."""
    return 0.5 * (loc.pow(2) + scale.pow(2) - 1.0 - 2.0 * scale.log()).sum(-1)


class KLBalancer:
    """Per-layer KL weights ``w_l = dim_l · KL_l / Σ_j dim_j · KL_j`` (detached; they sum to 1).

    Vahdat & Kautz (2020, §3.3) balance the groups of a hierarchical VAE during KL warm-up so that no group is
    switched off; HH-VAEM (Peis et al. 2022) uses the same rule (its code without detaching the weights). Call :meth:`update` with the current
    per-layer KLs (any estimate; the mean over the batch), then read :meth:`weights`. Before the first update, and
    when every KL is 0, the weights are uniform.

    Args:
        dims: ``dim_l`` of each layer.

    Shapes: ``update(kl (L,))``; ``weights() -> (L,)``.

    Raises:
        ValueError: an empty ``dims`` or a non-positive dimension; ``update`` with the wrong number of layers.
    """

    def __init__(self, dims: Sequence[int]):
        dims = [int(d) for d in dims]
        if not dims or min(dims) < 1:
            raise ValueError(f"KLBalancer needs positive layer dims, got {dims}")
        self.dims = torch.tensor(dims, dtype=torch.float64)
        self._weights = torch.full((len(dims),), 1.0 / len(dims), dtype=torch.float64)

    @property
    def num_layers(self) -> int:
        return len(self.dims)

    def update(self, kl: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Recompute the weights from per-layer KLs ``(L,)`` (detached, clamped at 0); returns :meth:`weights`."""
        kl = torch.as_tensor(kl).detach().to(torch.float64).cpu().reshape(-1)
        if kl.numel() != self.num_layers:
            raise ValueError(f"expected {self.num_layers} per-layer KLs, got {kl.numel()}")
        raw = self.dims * kl.clamp_min(0.0)
        total = float(raw.sum())
        if total > 0 and torch.isfinite(raw).all():
            self._weights = raw / total
        return self.weights()

    def weights(self) -> torch.Tensor:
        """``(L,)`` float64 weights summing to 1."""
        return self._weights.clone()


class KLAnnealing(Messenger):
    """Weight every latent site's log-density by ``schedule(step)``: a ``poutine`` messenger, used as
    ``annealing(model)`` / ``annealing(guide)`` (the same instance on both, so model and guide carry one weight).

    Call :meth:`set_step` before each SVI step (a :class:`~ppl_vae.models.base.TrainingStage` ``on_step`` hook).
    Observed sites, ``pyro.plate`` subsample sites and enumerated sites (``infer={"enumerate": ...}``) are left at
    weight 1; a weight of 0 is replaced by 1e-8 (``poutine.scale`` needs a positive scale).

    Args:
        schedule: a callable ``step -> weight`` (:class:`LinearKL`, :class:`CyclicalKL`, ...).

    Attributes:
        weight: the weight in force (float).

    Source: KL annealing (Bowman et al. 2016 §3.1), cyclical annealing (Fu et al. 2019, eq. 4).
    """

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.weight = float(schedule(0))

    def set_step(self, step: int) -> None:
        """Set :attr:`weight` to ``schedule(step)``."""
        self.weight = float(self.schedule(step))

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or site_is_subsample(msg) or msg["infer"].get("enumerate"):
            return
        msg["scale"] = max(self.weight, 1e-8) * msg["scale"]


@dataclass
class KLScheduleConfig(ModelConfig):
    """The KL-schedule options any model config can inherit (the image models' and the sequential VAE's do).

    Attributes:
        kl_schedule: weight of the latent sites' log-densities during training (:class:`KLAnnealing`):
            ``"constant"`` (1, the plain ELBO), ``"linear"`` (warm-up over ``kl_warmup`` steps; Bowman et al. 2016)
            or ``"cyclical"`` (``kl_cycles`` cycles over the stage, rising over ``kl_ratio`` of each; Fu et al. 2019).
        kl_warmup, kl_cycles, kl_ratio: the schedule's sizes.
    """

    kl_schedule: str = "constant"
    kl_warmup: int = 0
    kl_cycles: int = 4
    kl_ratio: float = 0.5

    def check_kl_options(self) -> None:
        """Raises ValueError naming a bad KL-schedule option."""
        if self.kl_schedule not in KL_SCHEDULES:
            raise ValueError(f"unknown kl_schedule {self.kl_schedule!r}; choose one of {KL_SCHEDULES}")
        if self.kl_warmup < 0 or self.kl_cycles < 1 or not 0 < self.kl_ratio <= 1:
            raise ValueError(f"need kl_warmup >= 0, kl_cycles >= 1, 0 < kl_ratio <= 1; got {self.kl_warmup}, "
                             f"{self.kl_cycles}, {self.kl_ratio}")

    def kl_annealing(self, steps: int) -> Optional[KLAnnealing]:
        """The :class:`KLAnnealing` messenger of a stage of ``steps`` steps, or ``None`` for ``"constant"``."""
        if self.kl_schedule == "constant":
            return None
        return KLAnnealing(make_kl_schedule(self.kl_schedule, warmup=self.kl_warmup, total=steps,
                                            cycles=self.kl_cycles, ratio=self.kl_ratio))


def annealed_stage(cfg: KLScheduleConfig, name: str, model, guide, loss, steps: int, lr: float) -> TrainingStage:
    """A :class:`~ppl_vae.models.base.TrainingStage` on ``model`` / ``guide`` under ``cfg``'s KL schedule (the
    same :class:`KLAnnealing` wraps both, advanced by the stage's ``on_step``); the plain stage for ``"constant"``."""
    annealing = cfg.kl_annealing(steps)
    if annealing is None:
        return TrainingStage(name, model, guide, loss, steps, lr)
    return TrainingStage(name, annealing(model), annealing(guide), loss, steps, lr, on_step=annealing.set_step)

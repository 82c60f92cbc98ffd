"""Leapfrog integration of Hamiltonian dynamics and the detached log-density gradients it consumes.

Source: Neal, "MCMC using Hamiltonian dynamics" (Handbook of MCMC, 2011), §5.2; per-dimension step sizes as in
Campbell et al. (ICML 2021) and HH-VAEM (Peis et al. 2022, §3.5). Shapes: a state is ``(*chain_dims, dim)``; a log
density maps ``(*chain_dims, dim) -> (*chain_dims)``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

__all__ = ["LogProbFn", "GradFn", "value_and_grad_fn", "kinetic_energy", "leapfrog", "CompileWithFallback"]

LogProbFn = Callable[[torch.Tensor], torch.Tensor]
#: ``position (*chain_dims, dim) -> (log_prob (*chain_dims), grad (*chain_dims, dim))``, both detached.
GradFn = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def _eager_value_and_grad(log_prob_fn: LogProbFn) -> GradFn:
    def value_and_grad(position: torch.Tensor):
        with torch.enable_grad():
            x = position.detach().requires_grad_(True)
            lp = log_prob_fn(x)
            (g,) = torch.autograd.grad(lp.sum(), x)
        return lp.detach(), g

    return value_and_grad


class CompileWithFallback:
    """Call ``torch.compile(source)`` (``fullgraph=True``); on any failure of compilation or of a compiled call, warn
    once and use ``eager`` from then on. ``source`` and ``eager`` compute the same thing.

    Generated CPU kernels are single-threaded (``cpp.threads = 1``): HMC's work per element is tiny, an OpenMP
    fork/join per kernel costs more than it saves, and on a loaded machine a descheduled worker thread stalls every
    kernel (seen here: ~0.5 s instead of ~4 ms per 2-D tuning step with 2-thread kernels on a busy 2-core box).
    No effect on GPU kernels."""

    def __init__(self, source: Callable, eager: Callable, what: str):
        self._eager, self._what = eager, what
        try:
            self._compiled = torch.compile(source, fullgraph=True, options={"cpp.threads": 1})
        except Exception as err:  # pragma: no cover - platform dependent
            warnings.warn(f"torch.compile unavailable for {what} ({err!r}); using eager", RuntimeWarning)
            self._compiled = None

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def __call__(self, *args):
        if self._compiled is not None:
            try:
                return self._compiled(*args)
            except Exception as err:
                warnings.warn(f"torch.compile failed for {self._what} ({type(err).__name__}: {str(err)[:200]}); "
                              "falling back to eager", RuntimeWarning)
                self._compiled = None
        return self._eager(*args)


def _func_value_and_grad(log_prob_fn: LogProbFn) -> GradFn:
    """``torch.func`` version of the detached value-and-gradient (traceable by ``torch.compile``)."""

    def summed(x):
        lp = log_prob_fn(x)
        return lp.sum(), lp

    def value_and_grad(position):
        g, (_, lp) = torch.func.grad_and_value(summed, has_aux=True)(position.detach())
        return lp.detach(), g.detach()

    return value_and_grad


def _compiled_value_and_grad(log_prob_fn: LogProbFn) -> GradFn:
    return CompileWithFallback(_func_value_and_grad(log_prob_fn), _eager_value_and_grad(log_prob_fn),
                                "the log-density gradient")


def value_and_grad_fn(log_prob_fn: LogProbFn, compile: bool = False) -> GradFn:
    """Wrap a log density into ``position -> (log_prob, grad)``, both detached.

    The gradient is ``torch.autograd.grad`` of the summed log density w.r.t. a detached copy of the position
    (``create_graph=False``): parameters inside ``log_prob_fn`` (a decoder) receive no gradient from it, and
    elements are independent as long as the log density is (it must not mix chains or datapoints).

    Args:
        log_prob_fn: ``(*chain_dims, dim) -> (*chain_dims)``.
        compile: wrap a ``torch.func.grad_and_value`` version in ``torch.compile(fullgraph=True)``; falls back to
            eager (with a warning) if compilation fails. Worth it for cheap densities (per-op overhead dominates).

    Returns:
        a :data:`GradFn`.
    """
    return _compiled_value_and_grad(log_prob_fn) if compile else _eager_value_and_grad(log_prob_fn)


def kinetic_energy(momentum: torch.Tensor, inverse_mass: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``½ rᵀ M⁻¹ r`` for a diagonal mass matrix.

    Args:
        momentum: ``(*chain_dims, dim)``.
        inverse_mass: ``M⁻¹`` diagonal broadcastable to ``momentum`` (``(dim,)``), or ``None`` for ``M = I``.

    Returns:
        ``(*chain_dims)``.
    """
    sq = momentum * momentum
    if inverse_mass is not None:
        sq = sq * inverse_mass
    return 0.5 * sq.sum(-1)


def leapfrog(
    position: torch.Tensor,
    momentum: torch.Tensor,
    grad: torch.Tensor,
    step_size: torch.Tensor,
    num_leapfrog: int,
    grad_fn: GradFn,
    inverse_mass: Optional[torch.Tensor] = None,
    accumulate: bool = False,
):
    """``L`` leapfrog steps of Hamiltonian dynamics with a per-dimension step size (HH-VAEM §3.5, Campbell et al.
    2021 §2):

    ``r ← r + ½ φ ⊙ ∇log p*(ε)``; then ``L`` times ``ε ← ε + φ ⊙ M⁻¹ r``, ``r ← r + φ ⊙ ∇log p*(ε)`` with the
    last momentum update a half step.

    With ``accumulate=True`` it also returns ``A = Σ_{l=1..L} S_l`` where ``S_l = ½g_0 + g_1 + … + g_{l-1}`` is the
    (detached) gradient sum in the momentum of the ``l``-th position update. Because the gradients are detached,
    the end point is then exactly ``ε_L = ε_0 + L φ ⊙ M⁻¹ r_0 + φ² ⊙ M⁻¹ A``, a closed form in ``(φ, M⁻¹, ε_0)``
    that :func:`hmc_step` uses to rebuild the differentiable proposal without recording the loop in autograd.

    Args:
        position: ``(*chain_dims, dim)`` start ``ε``; may carry a graph (kept: positions depend linearly on
            ``step_size``).
        momentum: ``(*chain_dims, dim)`` start ``r``.
        grad: ``(*chain_dims, dim)`` detached ``∇log p*(position)``.
        step_size: ``φ`` broadcastable to ``position`` (``(dim,)``), positive; may require grad.
        num_leapfrog: ``L ≥ 1``.
        grad_fn: a :data:`GradFn` (detached log density and gradient).
        inverse_mass: diagonal ``M⁻¹`` broadcastable to ``position`` or ``None`` (identity).
        accumulate: also return ``A``.

    Returns:
        ``(position, momentum, log_prob, grad)`` at the end of the trajectory (``log_prob``/``grad`` detached),
        plus ``A`` if ``accumulate``. Non-finite values are not patched: they propagate to the returned momentum and
        log-prob, and :func:`hmc_step` rejects the whole proposal of that element.

    Raises:
        ValueError: ``num_leapfrog < 1``.
    """
    if num_leapfrog < 1:
        raise ValueError(f"num_leapfrog must be >= 1, got {num_leapfrog}")
    half = 0.5 * step_size
    momentum = momentum + half * grad
    grad_sum = 0.5 * grad if accumulate else None
    acc = None
    log_prob = None
    for l in range(num_leapfrog):
        if accumulate:
            acc = grad_sum if acc is None else acc + grad_sum
        velocity = momentum if inverse_mass is None else momentum * inverse_mass
        position = position + step_size * velocity
        log_prob, grad = grad_fn(position)
        if l < num_leapfrog - 1:
            momentum = momentum + step_size * grad
            if accumulate:
                grad_sum = grad_sum + grad
        else:
            momentum = momentum + half * grad
    if accumulate:
        return position, momentum, log_prob, grad, acc
    return position, momentum, log_prob, grad



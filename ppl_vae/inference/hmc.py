"""Hamiltonian Monte Carlo with gradient-tuned step sizes, as small pure tensor functions on a state record.

The pieces compose like BlackJAX / NumPyro kernels (integrator, kernel and adaptation kept apart):

- :func:`value_and_grad_fn` turns a log density into ``position -> (log_prob, grad)`` (detached), optionally through
  ``torch.compile``;
- :func:`leapfrog` is the integrator, :func:`hmc_step` one Metropolis-adjusted HMC transition (the kernel),
  :func:`run_hmc` ``T`` transitions with a ``(T, dim)`` schedule of step sizes;
- :class:`StepSizes` holds the learnable schedule and :class:`HMCSampler` tunes it (and the inflation of the initial
  proposal) for any unnormalised 2-D/N-D density, the "adaptation" part.

Gradient-based tuning follows Campbell, Chen, Shi, Wang & Hernández-Lobato, "A Gradient Based Strategy for
Hamiltonian Monte Carlo Hyperparameter Optimization", ICML 2021 (maximise ``E log p*(ε_T)`` over the chain's final
state, the entropy term dropped) with the choices of HH-VAEM (Peis et al. 2022, §3.5): ``∇ log p*`` inside the
integrator is *detached*, so the objective's gradient reaches the step sizes only through the positions' linear
dependence on them; the initial proposal is inflated by a scale tuned with SKSD (Gong et al. 2021).

Shapes: a state is ``(*chain_dims, dim)``, typically ``(num_chains, batch, dim)``; a log density maps
``(*chain_dims, dim) -> (*chain_dims)``. Every Metropolis-Hastings decision is taken per element of
``chain_dims`` (per chain and datapoint). No loop runs over chains or datapoints; the loops over the ``T``
transitions and ``L`` leapfrog steps are Python loops.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from ppl_vae.inference.sksd import sksd as _sksd

__all__ = [
    "HMCState",
    "HMCInfo",
    "HMCTrace",
    "GradFn",
    "value_and_grad_fn",
    "kinetic_energy",
    "leapfrog",
    "hmc_step",
    "run_hmc",
    "StepSizes",
    "HMCSampler",
]

LogProbFn = Callable[[torch.Tensor], torch.Tensor]
#: ``position (*chain_dims, dim) -> (log_prob (*chain_dims), grad (*chain_dims, dim))``, both detached.
GradFn = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


class HMCState(NamedTuple):
    """State of a batch of chains.

    Attributes:
        position: ``(*chain_dims, dim)``; may carry an autograd graph back to the step sizes / initial proposal.
        log_prob: ``(*chain_dims)`` ``log p*(position)``, detached.
        grad: ``(*chain_dims, dim)`` ``∇ log p*(position)``, detached.
    """

    position: torch.Tensor
    log_prob: torch.Tensor
    grad: torch.Tensor


class HMCInfo(NamedTuple):
    """Statistics of one transition, each ``(*chain_dims)`` and detached.

    Attributes:
        energy: Hamiltonian ``H = -log p*(ε) + ½ rᵀM⁻¹r`` at the returned state (the proposal's end point if accepted,
            the starting point with its fresh momentum otherwise), as Stan/ArviZ define ``energy``.
        accept_prob: ``min(1, exp(-ΔH))``, 0 for divergent transitions.
        diverging: bool, non-finite energy/gradient or energy error ``ΔH`` above the threshold.
        accepted: bool, the Metropolis-Hastings decision.
    """

    energy: torch.Tensor
    accept_prob: torch.Tensor
    diverging: torch.Tensor
    accepted: torch.Tensor


def _eager_value_and_grad(log_prob_fn: LogProbFn) -> GradFn:
    def value_and_grad(position: torch.Tensor):
        with torch.enable_grad():
            x = position.detach().requires_grad_(True)
            lp = log_prob_fn(x)
            (g,) = torch.autograd.grad(lp.sum(), x)
        return lp.detach(), g

    return value_and_grad


class _CompileWithFallback:
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
    return _CompileWithFallback(_func_value_and_grad(log_prob_fn), _eager_value_and_grad(log_prob_fn),
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


class _Transition(NamedTuple):
    """Detached outcome of one transition (see :class:`HMCKernel`); rejected elements have ``drift = disp = 0``."""

    position: torch.Tensor  # (*c, d) new position value
    log_prob: torch.Tensor  # (*c)
    grad: torch.Tensor  # (*c, d)
    drift: torch.Tensor  # (*c, d)  L * xi, zero where rejected
    curvature: torch.Tensor  # (*c, d)  A, zero where rejected
    correction: torch.Tensor  # (*c, d)  rounding gap between the integrator and the closed form, zero if rejected
    energy: torch.Tensor
    accept_prob: torch.Tensor
    diverging: torch.Tensor
    accepted: torch.Tensor


class HMCKernel:
    """The detached part of one HMC transition: momentum from given noise, :func:`leapfrog`, energy error,
    divergence test and Metropolis-Hastings decision, for all elements at once, run without autograd recording.

    It returns the new state and the two coefficient tensors of the closed form of the accepted proposal in the
    step size (see :func:`leapfrog`), from which :func:`hmc_step` rebuilds the differentiable position with a
    handful of recorded operations. With ``compile=True`` the whole transition (all ``L`` gradient evaluations and
    the decision) is one ``torch.compile`` graph; if compilation fails it falls back to eager with a warning.

    Args:
        log_prob_fn: ``(*chain_dims, dim) -> (*chain_dims)`` (needed for ``compile=True``).
        num_leapfrog: ``L ≥ 1``.
        divergence_threshold: energy error marking a divergence.
        compile: compile the transition.
        grad_fn: eager :data:`GradFn` to use instead of autograd on ``log_prob_fn``.

    Raises:
        ValueError: ``num_leapfrog < 1`` or neither ``log_prob_fn`` nor ``grad_fn``.
    """

    def __init__(self, log_prob_fn: Optional[LogProbFn] = None, num_leapfrog: int = 5,
                 divergence_threshold: float = 1000.0, compile: bool = False, grad_fn: Optional[GradFn] = None):
        if num_leapfrog < 1:
            raise ValueError(f"num_leapfrog must be >= 1, got {num_leapfrog}")
        if log_prob_fn is None and grad_fn is None:
            raise ValueError("HMCKernel needs log_prob_fn or grad_fn")
        self.num_leapfrog = int(num_leapfrog)
        self.divergence_threshold = float(divergence_threshold)
        self.grad_fn = grad_fn if grad_fn is not None else _eager_value_and_grad(log_prob_fn)
        #: GradFn for the initial state (compiled too when ``compile``).
        self.value_and_grad = self.grad_fn
        self._compiled = None
        if compile and log_prob_fn is not None and grad_fn is None:
            self.value_and_grad = _compiled_value_and_grad(log_prob_fn)
            func_grad = _func_value_and_grad(log_prob_fn)
            self._compiled = _CompileWithFallback(lambda *a: self._core(func_grad, *a),
                                                  lambda *a: self._core(self.grad_fn, *a), "the HMC transition")

    @property
    def compiled(self) -> bool:
        """Whether transitions currently run through ``torch.compile``."""
        return self._compiled is not None and self._compiled.compiled

    def _core(self, grad_fn, position, log_prob, grad, xi, u, step_size, inverse_mass):
        num_leapfrog = self.num_leapfrog
        momentum = xi if inverse_mass is None else xi * torch.rsqrt(inverse_mass)
        h0 = kinetic_energy(momentum, inverse_mass) - log_prob
        prop, mom, lp1, g1, acc_sum = leapfrog(position, momentum, grad, step_size, num_leapfrog, grad_fn,
                                               inverse_mass, accumulate=True)
        h1 = kinetic_energy(mom, inverse_mass) - lp1
        delta = h1 - h0
        finite = torch.isfinite(delta) & torch.isfinite(g1).all(-1) & torch.isfinite(prop).all(-1)
        diverging = ~finite | (delta > self.divergence_threshold)
        accepted = (torch.log(u) < -delta) & ~diverging
        accept_prob = torch.where(diverging, torch.zeros_like(delta), torch.exp(torch.clamp(-delta, max=0.0)))
        a = accepted.unsqueeze(-1)
        drift = num_leapfrog * xi
        lin = drift if inverse_mass is None else drift * torch.sqrt(inverse_mass)
        curv = acc_sum if inverse_mass is None else acc_sum * inverse_mass
        closed = position + step_size * (lin + step_size * curv)
        zero = torch.zeros_like(position)
        return _Transition(
            torch.where(a, prop, position),
            torch.where(accepted, lp1, log_prob),
            torch.where(a, g1, grad),
            torch.where(a, drift, zero),
            torch.where(a, acc_sum, zero),
            torch.where(a, prop - closed, zero),
            torch.where(accepted, h1, h0),
            accept_prob,
            diverging,
            accepted,
        )

    def __call__(self, position, log_prob, grad, xi, u, step_size, inverse_mass=None) -> _Transition:
        """Run one detached transition. All inputs are detached tensors; ``xi`` is standard normal noise shaped like
        ``position`` and ``u`` uniform noise shaped like ``log_prob``."""
        with torch.no_grad():
            if self._compiled is not None:
                return _Transition(*self._compiled(position, log_prob, grad, xi, u, step_size, inverse_mass))
            return self._core(self.grad_fn, position, log_prob, grad, xi, u, step_size, inverse_mass)


def hmc_step(
    state: HMCState,
    step_size: torch.Tensor,
    num_leapfrog: int,
    grad_fn: Optional[GradFn] = None,
    inverse_mass: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    divergence_threshold: float = 1000.0,
    noise: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    kernel: Optional[HMCKernel] = None,
) -> tuple[HMCState, HMCInfo]:
    """One Metropolis-adjusted HMC transition, decided independently for every element of ``chain_dims``.

    Fresh momentum ``r ~ N(0, M)``, :func:`leapfrog`, then accept with probability ``min(1, exp(-ΔH))``,
    ``ΔH = H(ε', r') - H(ε, r)``, ``H = -log p*(ε) + ½ rᵀM⁻¹r`` (Neal 2011, "MCMC using Hamiltonian dynamics", §5.2).
    A proposal with non-finite energy, position or gradient, or ``ΔH > divergence_threshold``, is *divergent*:
    rejected as a whole and counted (never patched coordinate by coordinate).

    Gradients: ``∇log p*`` is detached inside the integrator (HH-VAEM §3.5), so the accepted proposal equals
    ``ε + L φ ⊙ M^{-1/2} ξ + φ² ⊙ M⁻¹ A`` (:func:`leapfrog`) with detached ``ξ, A``. The simulation runs without
    autograd (:class:`HMCKernel`) and the new position is rebuilt from this closed form:
    ``ε_new = ε + [accepted] (φ ⊙ (L M^{-1/2} ξ + φ ⊙ M⁻¹ A) + rounding gap)``. Its value is the integrator's end
    point (or ``ε`` if rejected) and its gradient w.r.t. ``φ``, ``M⁻¹`` and ``ε`` is exactly that of the recorded
    integrator with detached ``∇log p*``; rejected or divergent elements contribute exactly zero (no ``0·nan``).
    The accept decision itself is not differentiated.

    Args:
        state: current :class:`HMCState`.
        step_size: ``(dim,)`` (or broadcastable) positive step sizes; may require grad.
        num_leapfrog: ``L ≥ 1``.
        grad_fn: see :func:`value_and_grad_fn` (ignored when ``kernel`` is given).
        inverse_mass: diagonal ``M⁻¹`` broadcastable to the position, or ``None``; may require grad.
        generator: ``torch.Generator`` for the momentum and the uniform draws (default: global RNG).
        divergence_threshold: energy error above which a transition is divergent (Stan's default 1000).
        noise: optional pre-drawn ``(standard normal (*chain_dims, dim), uniform (*chain_dims))``.
        kernel: a prebuilt :class:`HMCKernel` (e.g. compiled); built from ``grad_fn`` otherwise.

    Returns:
        ``(new_state, info)`` with :class:`HMCInfo` statistics.

    Raises:
        ValueError: ``num_leapfrog`` disagrees with the kernel's, or no ``grad_fn``/``kernel``.
    """
    if kernel is None:
        if grad_fn is None:
            raise ValueError("hmc_step needs grad_fn or kernel")
        kernel = HMCKernel(num_leapfrog=num_leapfrog, divergence_threshold=divergence_threshold, grad_fn=grad_fn)
    elif kernel.num_leapfrog != num_leapfrog:
        raise ValueError(f"num_leapfrog={num_leapfrog} but the kernel has {kernel.num_leapfrog}")
    position = state.position
    shape = position.shape
    if noise is None:
        xi = torch.randn(shape, generator=generator, dtype=position.dtype, device=position.device)
        u = torch.rand(shape[:-1], generator=generator, dtype=position.dtype, device=position.device)
    else:
        xi, u = noise
    out = kernel(position.detach(), state.log_prob, state.grad, xi, u, step_size.detach(),
                 None if inverse_mass is None else inverse_mass.detach())
    live = torch.is_grad_enabled() and (position.requires_grad or step_size.requires_grad
                                        or (inverse_mass is not None and inverse_mass.requires_grad))
    if live:
        lin = out.drift if inverse_mass is None else out.drift * torch.sqrt(inverse_mass)
        curv = out.curvature if inverse_mass is None else out.curvature * inverse_mass
        new_position = position + step_size * (lin + step_size * curv) + out.correction
    else:
        new_position = out.position
    return (HMCState(new_position, out.log_prob, out.grad),
            HMCInfo(out.energy, out.accept_prob, out.diverging, out.accepted))


@dataclass
class HMCTrace:
    """Result of :func:`run_hmc`.

    Attributes:
        position: ``(*chain_dims, dim)`` final state ``ε_T``, differentiable w.r.t. the step sizes, the inverse mass
            and the initial position.
        log_prob: ``(*chain_dims)`` ``log p*(ε_T)``, detached.
        grad: ``(*chain_dims, dim)`` ``∇ log p*(ε_T)``, detached.
        energy, accept_prob, diverging: ``(T, *chain_dims)`` per-transition statistics (see :class:`HMCInfo`).
        step_size: ``(T, dim)`` step sizes used (detached).
        positions: ``(T+1, *chain_dims, dim)`` detached chain including the start, or ``None`` unless
            ``keep_chain=True``.
        initial_position: ``(*chain_dims, dim)`` ``ε_0`` (with its graph).
    """

    position: torch.Tensor
    log_prob: torch.Tensor
    grad: torch.Tensor
    energy: torch.Tensor
    accept_prob: torch.Tensor
    diverging: torch.Tensor
    step_size: torch.Tensor
    positions: Optional[torch.Tensor] = None
    initial_position: Optional[torch.Tensor] = None

    @property
    def num_divergent(self) -> int:
        """Number of divergent transitions over all chains, datapoints and steps."""
        return int(self.diverging.sum())

    @property
    def accept_rate(self) -> float:
        """Mean Metropolis-Hastings acceptance probability."""
        return float(self.accept_prob.mean()) if self.accept_prob.numel() else float("nan")

    def surrogate_log_prob(self) -> torch.Tensor:
        """``(*chain_dims)`` tensor equal to ``log p*(ε_T)`` in value whose gradient w.r.t. anything upstream of
        ``ε_T`` (step sizes, inflation) equals ``∇log p*(ε_T) · ∂ε_T/∂(·)``: a first-order surrogate that saves the
        extra evaluation of ``log p*`` at ``ε_T``. It carries no gradient to parameters *inside* ``log p*`` (for a
        decoder, evaluate the log density at :attr:`position` instead)."""
        return self.log_prob + (self.grad * (self.position - self.position.detach())).sum(-1)


def run_hmc(
    log_prob_fn: Optional[LogProbFn],
    init_position: torch.Tensor,
    step_sizes: torch.Tensor,
    num_leapfrog: int,
    inverse_mass: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    divergence_threshold: float = 1000.0,
    keep_chain: bool = False,
    grad_fn: Optional[GradFn] = None,
    kernel: Optional[HMCKernel] = None,
) -> HMCTrace:
    """Run ``T`` HMC transitions, transition ``t`` with step sizes ``step_sizes[t]``.

    Args:
        log_prob_fn: unnormalised log density ``(*chain_dims, dim) -> (*chain_dims)``; may be ``None`` if
            ``grad_fn`` is given.
        init_position: ``(*chain_dims, dim)`` ``ε_0``; may carry a graph (e.g. to the proposal inflation).
        step_sizes: ``(T, dim)`` positive step sizes (the learnable schedule); may require grad.
        num_leapfrog: ``L ≥ 1`` leapfrog steps per transition.
        inverse_mass: diagonal ``M⁻¹``, ``(dim,)`` shared or ``(T, dim)`` per transition, or ``None`` (identity).
        generator: ``torch.Generator`` for momenta and MH uniforms (default: global RNG, seeded by
            ``pyro.set_rng_seed``/``torch.manual_seed``).
        divergence_threshold: energy error that marks a transition divergent.
        keep_chain: also return the detached ``(T+1, *chain_dims, dim)`` chain.
        grad_fn: pre-built :data:`GradFn` (e.g. from :func:`value_and_grad_fn` with ``compile=True``).
        kernel: pre-built :class:`HMCKernel` (e.g. compiled); its ``num_leapfrog`` must match.

    Returns:
        an :class:`HMCTrace`.

    Raises:
        ValueError: ``step_sizes`` is not ``(T, dim)`` matching the position, or ``num_leapfrog < 1``, or neither
            ``log_prob_fn`` nor ``grad_fn`` is given.

    Source: Campbell et al., ICML 2021 (§3, tuned per-step step sizes); HH-VAEM (Peis et al. 2022, §3.5).
    """
    if kernel is None:
        if grad_fn is None:
            if log_prob_fn is None:
                raise ValueError("run_hmc needs log_prob_fn, grad_fn or kernel")
            grad_fn = value_and_grad_fn(log_prob_fn)
        kernel = HMCKernel(num_leapfrog=num_leapfrog, divergence_threshold=divergence_threshold, grad_fn=grad_fn)
    grad_fn = kernel.value_and_grad
    dim = init_position.shape[-1]
    if step_sizes.dim() != 2 or step_sizes.shape[-1] != dim:
        raise ValueError(f"step_sizes must be (T, {dim}), got shape {tuple(step_sizes.shape)}")
    if num_leapfrog < 1:
        raise ValueError(f"num_leapfrog must be >= 1, got {num_leapfrog}")
    num_steps = step_sizes.shape[0]
    per_step_mass = inverse_mass is not None and inverse_mass.dim() == 2
    if per_step_mass and inverse_mass.shape != step_sizes.shape:
        raise ValueError(f"inverse_mass must be ({dim},) or {tuple(step_sizes.shape)}, got {tuple(inverse_mass.shape)}")

    lp0, g0 = grad_fn(init_position.detach())
    state = HMCState(init_position, lp0, g0)
    chain = [init_position.detach()] if keep_chain else None
    energies, probs, divs = [], [], []
    for t in range(num_steps):
        inv_m = inverse_mass[t] if per_step_mass else inverse_mass
        state, info = hmc_step(state, step_sizes[t], num_leapfrog, None, inv_m, generator, divergence_threshold,
                               kernel=kernel)
        energies.append(info.energy)
        probs.append(info.accept_prob)
        divs.append(info.diverging)
        if keep_chain:
            chain.append(state.position.detach())
    empty = init_position.new_zeros((0,) + init_position.shape[:-1])
    return HMCTrace(
        position=state.position,
        log_prob=state.log_prob,
        grad=state.grad,
        energy=torch.stack(energies) if energies else empty,
        accept_prob=torch.stack(probs) if probs else empty,
        diverging=torch.stack(divs) if divs else empty.bool(),
        step_size=step_sizes.detach(),
        positions=torch.stack(chain) if keep_chain else None,
        initial_position=init_position,
    )


class StepSizes(nn.Module):
    """Learnable schedule of per-transition, per-dimension step sizes ``φ ∈ R_+^{T×dim}``.

    Log-parameterised (``φ = exp(θ)``), initialised at ``log U(low, high)`` (HH-VAEM: ``U(0.02, 0.05)``) from a
    seeded generator, so construction is reproducible and does not touch the global RNG.

    Args:
        num_steps: ``T``.
        dim: latent dimension.
        init_range: ``(low, high)`` with ``0 < low <= high``.
        seed: seed of the initialisation.

    Raises:
        ValueError: non-positive sizes or range.
    """

    def __init__(self, num_steps: int, dim: int, init_range: tuple[float, float] = (0.02, 0.05), seed: int = 0):
        super().__init__()
        low, high = init_range
        if num_steps < 1 or dim < 1 or not (0 < low <= high):
            raise ValueError(f"need num_steps, dim >= 1 and 0 < low <= high; got {num_steps}, {dim}, {init_range}")
        gen = torch.Generator().manual_seed(int(seed))
        init = low + (high - low) * torch.rand(num_steps, dim, generator=gen)
        self.log_step_size = nn.Parameter(init.log())

    @property
    def num_steps(self) -> int:
        return self.log_step_size.shape[0]

    def forward(self) -> torch.Tensor:
        """``(T, dim)`` positive step sizes."""
        return self.log_step_size.exp()


class HMCSampler(nn.Module):
    """Gradient-tuned HMC for an arbitrary unnormalised log density (the 2-D experiments of Campbell et al. 2021
    and of the HH-VAEM HMC-tuning code), with the SKSD-tuned inflation of HH-VAEM §3.5.

    Chains start from ``ε_0 ~ N(init_loc, (s ⊙ init_scale)²)`` and run ``T`` transitions of ``L`` leapfrog steps
    with the learnable schedule ``φ`` (:class:`StepSizes`). One :meth:`fit` step

    1. maximises ``E log p*(ε_T)`` over ``num_chains`` chains w.r.t. ``φ`` (and the diagonal mass if
       ``learn_mass``), with ``∇log p*`` detached inside the integrator;
    2. minimises the SKSD (:func:`ppl_vae.inference.sksd.sksd`) of ``sksd_chains`` further chains w.r.t. the
       inflation ``s`` only (``φ`` detached from this objective);

    each group with its own ``torch.optim.Adam``. Both groups of chains are simulated in one batched run (they are
    independent chains; each objective is differentiated only w.r.t. its own parameters, which is the same as
    detaching the others).

    Args:
        log_prob: ``(..., dim) -> (...)`` unnormalised log density (a :class:`ppl_vae.targets.Target` works).
        dim: dimension.
        num_steps: ``T`` transitions.
        num_leapfrog: ``L`` leapfrog steps per transition.
        num_chains: chains for the step-size objective.
        sksd_chains: chains for the SKSD objective (``0`` disables inflation tuning).
        init_loc, init_scale: initial proposal mean and standard deviation (scalars or ``(dim,)``).
        inflation: ``"dim"`` (one scale per dimension) or ``"scalar"``.
        lr: Adam learning rate of the step sizes (and mass); ``inflation_lr`` that of the inflation (default ``lr``).
        learn_mass: also learn a per-transition diagonal mass ``(T, dim)`` (log-parameterised, init identity).
        seed: seeds the step-size initialisation and the sampler's own ``torch.Generator``.
        compile: ``torch.compile`` each whole transition (its ``L`` gradient evaluations and the MH decision, one
            graph), the initial gradient and the SKSD loss; falls back to eager (with a warning) if that fails. On
            cheap 2-D targets it is ~3x faster per tuning step (eager time is per-op overhead); the first call
            compiles for a few seconds. ``torch.set_num_threads(1)`` is also fastest at these sizes.
        divergence_threshold: energy error marking a divergence.
        differentiable_scores: differentiate the SKSD through the score's dependence on the samples
            (``create_graph=True``, a Hessian-vector product); ``False`` detaches the scores (the reference code).
        grad_fn: optional hand-written :data:`GradFn` replacing autograd for ``log_prob``.
        device, dtype: where the chains live.

    Raises:
        ValueError: bad sizes or an unknown ``inflation``.
    """

    def __init__(
        self,
        log_prob: LogProbFn,
        dim: int,
        num_steps: int = 5,
        num_leapfrog: int = 5,
        num_chains: int = 1000,
        sksd_chains: int = 30,
        init_loc: float | Sequence[float] | torch.Tensor = 0.0,
        init_scale: float | Sequence[float] | torch.Tensor = 1.0,
        inflation: str = "dim",
        lr: float = 0.01,
        inflation_lr: Optional[float] = None,
        learn_mass: bool = False,
        seed: int = 0,
        compile: bool = False,
        divergence_threshold: float = 1000.0,
        differentiable_scores: bool = True,
        grad_fn: Optional[GradFn] = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if inflation not in ("dim", "scalar"):
            raise ValueError(f"inflation must be 'dim' or 'scalar', got {inflation!r}")
        if num_chains < 1 or sksd_chains < 0 or sksd_chains == 1:
            raise ValueError("num_chains must be >= 1 and sksd_chains 0 or >= 2")
        self.log_prob = log_prob
        self.dim, self.num_leapfrog = int(dim), int(num_leapfrog)
        self.num_chains, self.sksd_chains = int(num_chains), int(sksd_chains)
        self.divergence_threshold = float(divergence_threshold)
        self.differentiable_scores = differentiable_scores
        self.step_sizes = StepSizes(num_steps, dim, seed=seed)
        self.log_inflation = nn.Parameter(torch.zeros(dim if inflation == "dim" else 1))
        self.log_mass = nn.Parameter(torch.zeros(num_steps, dim)) if learn_mass else None
        self.register_buffer("init_loc", torch.as_tensor(init_loc, dtype=dtype).expand(dim).clone())
        self.register_buffer("init_scale", torch.as_tensor(init_scale, dtype=dtype).expand(dim).clone())
        self.to(device=device, dtype=dtype)
        self.generator = torch.Generator(device=device).manual_seed(int(seed))
        self.kernel = HMCKernel(log_prob, num_leapfrog, divergence_threshold, compile=compile, grad_fn=grad_fn)
        self._sksd_loss = self._build_sksd_loss(compile)
        phi = list(self.step_sizes.parameters()) + ([self.log_mass] if learn_mass else [])
        self.optimizer = torch.optim.Adam(phi, lr=lr)
        self.inflation_optimizer = torch.optim.Adam([self.log_inflation], lr=lr if inflation_lr is None else inflation_lr)
        self.history: dict[str, list[float]] = {k: [] for k in
                                                ("objective", "sksd", "accept_rate", "divergences", "ms_per_step")}

    # ------------------------------------------------------------------ helpers
    @property
    def num_steps(self) -> int:
        return self.step_sizes.num_steps

    @property
    def inflation(self) -> torch.Tensor:
        """``(dim,)`` or ``(1,)`` current inflation ``s`` (detached)."""
        return self.log_inflation.detach().exp()

    def inverse_mass(self) -> Optional[torch.Tensor]:
        """``(T, dim)`` inverse mass ``exp(-log_mass)`` or ``None`` (identity)."""
        return None if self.log_mass is None else torch.exp(-self.log_mass)

    def _initial(self, n: int) -> torch.Tensor:
        xi = torch.randn((n, 1, self.dim), generator=self.generator, dtype=self.init_loc.dtype,
                         device=self.init_loc.device)
        return self.init_loc + self.log_inflation.exp() * self.init_scale * xi

    def _run(self, init: torch.Tensor, step_sizes: torch.Tensor, inverse_mass, keep_chain: bool = False) -> HMCTrace:
        return run_hmc(None, init, step_sizes, self.num_leapfrog, inverse_mass, self.generator,
                       self.divergence_threshold, keep_chain, kernel=self.kernel)

    def _build_sksd_loss(self, compile: bool):
        """``(samples (N, 1, dim), detached scores) -> mean SKSD``, with the score recomputed differentiably when
        ``differentiable_scores`` (autograd ``create_graph`` eagerly, ``torch.func.grad`` when compiled)."""
        log_prob, differentiable = self.log_prob, self.differentiable_scores

        def eager(xs, scores):
            if differentiable:
                with torch.enable_grad():
                    (scores,) = torch.autograd.grad(log_prob(xs).sum(), xs, create_graph=True)
            return _sksd(xs, scores).mean()

        def traced(xs, scores):
            if differentiable:
                scores = torch.func.grad(lambda y: log_prob(y).sum())(xs)
            return _sksd(xs, scores).mean()

        return _CompileWithFallback(traced, eager, "the SKSD loss") if compile else eager

    # ------------------------------------------------------------------ training
    def fit_step(self) -> dict[str, float]:
        """One optimisation step of both objectives; returns this step's statistics (floats)."""
        c, cs = self.num_chains, self.sksd_chains
        self.optimizer.zero_grad(set_to_none=True)
        self.inflation_optimizer.zero_grad(set_to_none=True)
        trace = self._run(self._initial(c + cs), self.step_sizes(), self.inverse_mass())
        objective = trace.surrogate_log_prob()[:c].mean()
        phi = self.optimizer.param_groups[0]["params"]
        grads = torch.autograd.grad(-objective, phi, retain_graph=cs > 0)
        for p, g in zip(phi, grads):
            p.grad = g
        sksd_value = float("nan")
        if cs > 0:
            disc = self._sksd_loss(trace.position[c:], trace.grad[c:])
            (self.log_inflation.grad,) = torch.autograd.grad(disc, [self.log_inflation])
            self.inflation_optimizer.step()
            sksd_value = float(disc.detach())
        self.optimizer.step()
        return {
            "objective": float(objective.detach()),
            "sksd": sksd_value,
            "accept_rate": float(trace.accept_prob[:, :c].mean()),
            "divergences": float(trace.diverging[:, :c].sum()),
        }

    def fit(self, steps: int, progress: bool = True):
        """Run ``steps`` optimisation steps (see the class docstring).

        Args:
            steps: number of steps.
            progress: show a ``tqdm`` progress bar with the current objective.

        Returns:
            ``xarray.Dataset`` with dimension ``step`` and variables ``objective`` (mean ``log p*(ε_T)``), ``sksd``,
            ``accept_rate``, ``divergences`` (count over the step-size chains and transitions), ``ms_per_step``.
            The same values accumulate in ``self.history`` across calls.
        """
        import xarray as xr

        start = len(self.history["objective"])
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="HMC tuning", mininterval=0.5)
        for i in range(steps):
            t0 = time.perf_counter()
            stats = self.fit_step()
            stats["ms_per_step"] = 1e3 * (time.perf_counter() - t0)
            for k, v in stats.items():
                self.history[k].append(v)
            if bar is not None:
                bar.update(1)
                if i % 10 == 0 or i == steps - 1:
                    bar.set_postfix(objective=f"{stats['objective']:.3f}", sksd=f"{stats['sksd']:.3f}",
                                    accept=f"{stats['accept_rate']:.2f}", refresh=False)
        if bar is not None:
            bar.close()
        return xr.Dataset({k: ("step", v[start:]) for k, v in self.history.items()},
                          coords={"step": range(start, start + steps)})

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``(n, dim)`` refined samples: ``n`` independent chains from the inflated proposal, ``T`` tuned
        transitions each, final states returned (no gradient)."""
        trace = self._run(self._initial(n), self.step_sizes(), self.inverse_mass())
        return trace.position[:, 0]

    @torch.no_grad()
    def sample_chains(self, num_chains: int, num_draws: int, warmup: int = 0,
                      step_sizes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Long chains for diagnostics: the tuned schedule ``φ_1..φ_T`` is applied cyclically.

        Args:
            num_chains: chains (independent starts from the inflated proposal).
            num_draws: kept transitions per chain.
            warmup: transitions discarded first.
            step_sizes: optional ``(T', dim)`` schedule to use instead of the tuned one (e.g. the initial one).

        Returns:
            ``(chains, stats)``: chains ``(num_chains, num_draws, dim)``; stats ``energy``, ``accept_prob``,
            ``diverging`` each ``(num_chains, num_draws)`` and ``step_size`` ``(num_draws, dim)``, ready for
            :func:`ppl_vae.diagnostics.to_arviz`.
        """
        sched = self.step_sizes() if step_sizes is None else step_sizes
        total = warmup + num_draws
        idx = torch.arange(total, device=sched.device) % sched.shape[0]
        inv_m = self.inverse_mass()
        trace = self._run(self._initial(num_chains), sched[idx], None if inv_m is None else inv_m[idx % inv_m.shape[0]],
                          keep_chain=True)
        chains = trace.positions[warmup + 1:, :, 0].transpose(0, 1)
        stats = {k: getattr(trace, k)[warmup:, :, 0].transpose(0, 1) for k in ("energy", "accept_prob", "diverging")}
        stats["step_size"] = trace.step_size[warmup:]
        return chains, stats

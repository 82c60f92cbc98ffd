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

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ppl_vae.infer.mcmc.integrators import (CompileWithFallback, GradFn, LogProbFn, _compiled_value_and_grad,
                                            _eager_value_and_grad, _func_value_and_grad, kinetic_energy, leapfrog,
                                            value_and_grad_fn)

__all__ = ["HMCState", "HMCInfo", "HMCTrace", "HMCKernel", "hmc_step", "run_hmc"]


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
        metropolis: take the Metropolis-Hastings decision (default). ``False`` accepts every non-divergent
            proposal (unadjusted HMC): for tests that show the correction matters, never for inference.

    Non-finite values anywhere in a trajectory (log density, gradient, position, energy) never raise: they mark
    the transition divergent and the whole proposal is rejected. The log density itself must not raise on such
    input (switch off argument validation inside it).

    Raises:
        ValueError: ``num_leapfrog < 1`` or neither ``log_prob_fn`` nor ``grad_fn``.
    """

    def __init__(self, log_prob_fn: Optional[LogProbFn] = None, num_leapfrog: int = 5,
                 divergence_threshold: float = 1000.0, compile: bool = False, grad_fn: Optional[GradFn] = None,
                 metropolis: bool = True):
        if num_leapfrog < 1:
            raise ValueError(f"num_leapfrog must be >= 1, got {num_leapfrog}")
        if log_prob_fn is None and grad_fn is None:
            raise ValueError("HMCKernel needs log_prob_fn or grad_fn")
        self.num_leapfrog = int(num_leapfrog)
        self.divergence_threshold = float(divergence_threshold)
        self.metropolis = bool(metropolis)
        self.grad_fn = grad_fn if grad_fn is not None else _eager_value_and_grad(log_prob_fn)
        #: GradFn for the initial state (compiled too when ``compile``).
        self.value_and_grad = self.grad_fn
        self._compiled = None
        if compile and log_prob_fn is not None and grad_fn is None:
            self.value_and_grad = _compiled_value_and_grad(log_prob_fn)
            func_grad = _func_value_and_grad(log_prob_fn)
            self._compiled = CompileWithFallback(lambda *a: self._core(func_grad, *a),
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
        accepted = ((torch.log(u) < -delta) & ~diverging) if self.metropolis else ~diverging
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
        position: ``(*chain_dims, dim)`` final state ``ε_T``, differentiable w.r.t. the step sizes, the inverse mass,
            the scale and the initial position.
        log_prob: ``(*chain_dims)`` ``log p*(ε_T)``, detached.
        grad: ``(*chain_dims, dim)`` ``∇ log p*(ε_T)``, detached.
        energy, accept_prob, diverging: ``(T, *chain_dims)`` per-transition statistics (see :class:`HMCInfo`).
        step_size: ``(T, dim)`` step-size schedule used (detached); relative to :attr:`scale` when one was given.
        positions: ``(T+1, *chain_dims, dim)`` detached chain including the start, or ``None`` unless
            ``keep_chain=True``.
        initial_position: ``(*chain_dims, dim)`` ``ε_0`` (with its graph).
        states: ``(T+1, *chain_dims, dim)`` the chain ``ε_0 … ε_T`` *with* its graph (each state differentiable
            w.r.t. the step sizes like :attr:`position`); what mixing objectives such as
            :func:`ppl_vae.infer.mcmc.tuning.expected_squared_change` differentiate.
        accepted: ``(T, *chain_dims)`` bool Metropolis-Hastings decisions (the fraction of accepted proposals is
            ``accepted.float().mean()``; :attr:`accept_prob` holds the acceptance probabilities).
        scale: the per-dimension scale the step sizes were multiplied by (broadcastable to the position), or
            ``None``.
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
    states: Optional[torch.Tensor] = None
    accepted: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None

    @property
    def num_divergent(self) -> int:
        """Number of divergent transitions over all chains, datapoints and steps."""
        return int(self.diverging.sum())

    @property
    def accept_rate(self) -> float:
        """Mean Metropolis-Hastings acceptance probability."""
        return float(self.accept_prob.mean()) if self.accept_prob.numel() else float("nan")

    def select_chains(self, index) -> "HMCTrace":
        """The trace restricted to some chains: ``index`` (a slice or an index tensor) applies to the
        first chain dimension of every field (``position[index]``, ``accept_prob[:, index]``, ...). Graphs are kept.
        A ``scale`` shaped like the position (``(*chain_dims, dim)``) is selected too; a broadcast one is kept."""

        def per_chain(x):
            return None if x is None else x[index]

        def per_step(x):
            return None if x is None else x[:, index]

        scale = self.scale
        if scale is not None and scale.shape == self.position.shape:
            scale = scale[index]
        return HMCTrace(per_chain(self.position), per_chain(self.log_prob), per_chain(self.grad), per_step(self.energy),
                        per_step(self.accept_prob), per_step(self.diverging), self.step_size,
                        per_step(self.positions), per_chain(self.initial_position), per_step(self.states),
                        per_step(self.accepted), scale)

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
    scale: Optional[torch.Tensor] = None,
) -> HMCTrace:
    """Run ``T`` HMC transitions, transition ``t`` with step sizes ``step_sizes[t]`` (times ``scale`` if given).

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
        scale: optional positive per-dimension scale ``s`` broadcastable to the position, e.g. ``(dim,)`` or, for a
            per-datapoint scale such as an encoder's σ, ``(batch, dim)``; transition ``t`` then uses the absolute step
            sizes ``step_sizes[t] ⊙ s``. This is exactly leapfrog with the diagonal mass matrix ``M = diag(s)^-2``
            (Neal 2011, §4.1: a diagonal mass is a per-coordinate rescaling; with ``r = p / s`` the two integrators
            coincide step by step and have the same energy), i.e. HMC in the whitened coordinates ``ε / s`` with the
            dimensionless step sizes ``step_sizes[t]``. May carry a graph (the closed form differentiates it).

    Returns:
        an :class:`HMCTrace`; ``trace.states`` keeps every state's graph.

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
    # Detached simulation: the kernel runs every transition without autograd; the differentiable chain is rebuilt
    # afterwards from the closed form of each accepted jump (see hmc_step), all T transitions in a few batched ops:
    # ε_t = ε_0 + Σ_{k≤t} [accepted_k] (φ_k ⊙ (L M_k^{-1/2} ξ_k + φ_k ⊙ M_k⁻¹ A_k) + rounding gap_k).
    per_step_view = (num_steps,) + (1,) * (init_position.dim() - 1) + (dim,)
    abs_steps = step_sizes.reshape(per_step_view)
    if scale is not None:
        abs_steps = abs_steps * scale
    abs_detached = abs_steps.detach()
    inv_m_detached = None if inverse_mass is None else inverse_mass.detach()
    position, log_prob, grad = init_position.detach(), lp0, g0
    shape, dtype, device = init_position.shape, init_position.dtype, init_position.device
    outs = []
    for t in range(num_steps):
        inv_m = None if inv_m_detached is None else (inv_m_detached[t] if per_step_mass else inv_m_detached)
        xi = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        u = torch.rand(shape[:-1], generator=generator, dtype=dtype, device=device)
        out = kernel(position, log_prob, grad, xi, u, abs_detached[t], inv_m)
        position, log_prob, grad = out.position, out.log_prob, out.grad
        outs.append(out)
    if num_steps == 0:
        empty = init_position.new_zeros((0,) + init_position.shape[:-1])
        return HMCTrace(init_position, lp0, g0, empty, empty, empty.bool(), step_sizes.detach(),
                        init_position.detach().unsqueeze(0) if keep_chain else None, init_position,
                        init_position.unsqueeze(0), empty.bool(), scale)
    detached_chain = torch.stack([init_position.detach()] + [o.position for o in outs])
    live = torch.is_grad_enabled() and (init_position.requires_grad or abs_steps.requires_grad
                                        or (inverse_mass is not None and inverse_mass.requires_grad))
    if live:
        drift = torch.stack([o.drift for o in outs])
        curv = torch.stack([o.curvature for o in outs])
        corr = torch.stack([o.correction for o in outs])
        if inverse_mass is not None:
            inv_m = inverse_mass.reshape(per_step_view) if per_step_mass else inverse_mass
            drift, curv = drift * torch.sqrt(inv_m), curv * inv_m
        jumps = abs_steps * (drift + abs_steps * curv) + corr
        states = torch.cat([init_position.unsqueeze(0), init_position + torch.cumsum(jumps, 0)])
    else:
        states = detached_chain
    return HMCTrace(
        position=states[-1],
        log_prob=log_prob,
        grad=grad,
        energy=torch.stack([o.energy for o in outs]),
        accept_prob=torch.stack([o.accept_prob for o in outs]),
        diverging=torch.stack([o.diverging for o in outs]),
        step_size=step_sizes.detach(),
        positions=detached_chain if keep_chain else None,
        initial_position=init_position,
        states=states,
        accepted=torch.stack([o.accepted for o in outs]),
        scale=scale,
    )



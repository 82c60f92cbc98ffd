"""Gradient-based tuning of HMC step sizes and of the initial proposal's inflation (the "adaptation" part).

Campbell, Chen, Shi, Wang & Hernández-Lobato, "A Gradient Based Strategy for Hamiltonian Monte Carlo
Hyperparameter Optimization", ICML 2021; the SKSD-tuned inflation of HH-VAEM (Peis et al. 2022, §3.5) with the SKSD
of Gong et al. (ICLR 2021).

Two step-size schemes (:func:`step_size_loss`):

- ``"absolute"`` (the reference): step sizes in the target's own units, tuned by maximising ``E log p*(ε_T)``
  (Campbell et al. 2021, eq. 5 with the entropy of ``q^(T)`` dropped). This objective is mode-seeking: it rewards
  chains that stay concentrated, so on targets wider than the initial proposal the step sizes shrink.
- ``"relative"``: step sizes relative to a per-dimension scale ``s`` (a diagonal mass matrix ``M = diag(s)^-2``,
  i.e. leapfrog in the whitened coordinates ``ε / s``; Neal 2011 §4.1; Stan adapts ``s²`` from sample variances,
  Carpenter et al. 2017 / Stan Reference Manual "HMC algorithm parameters"), tuned by maximising a mixing
  criterion instead: the coordinate-wise, acceptance-weighted *change in the estimator of the expected square*
  (ChEES, Hoffman, Radul & Sountsov, AISTATS 2021, eq. 4) of every transition, in whitened coordinates
  (:func:`expected_squared_change`). For a Gaussian, ChEES of one transition is ``sin²Θ`` per coordinate for the
  rotation angle ``Θ`` of the trajectory, so it is maximal at the quarter period, where one transition gives an
  independent draw, and, unlike the expected squared jump distance (Pasarica & Gelman 2010), it does not reward the
  half period (``ε' = -ε``, which never forgets the start). It cannot collapse: shrinking steps shrink the criterion.
  ``s`` is the proposal's per-datapoint scale (an encoder's σ) or, in :class:`HMCSampler`, adapted from the
  cross-chain variance of the chains (:func:`adapt_scale`).

Both schemes add :func:`acceptance_floor_loss`, a Robbins-Monro term (Robbins & Monro 1951; Andrieu & Thoms 2008,
§3) that lowers the step sizes of a transition whose acceptance rate is below a floor: it is the only gradient when
every proposal is rejected or divergent, where the other terms have none.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from ppl_vae.infer.mcmc.integrators import CompileWithFallback, GradFn, LogProbFn
from ppl_vae.infer.mcmc.kernel import HMCKernel, HMCTrace, run_hmc
from ppl_vae.infer.mcmc.sksd import sksd as _sksd

__all__ = ["StepSizes", "HMCSampler", "SCHEMES", "expected_squared_change", "acceptance_floor_loss", "step_size_loss",
           "adapt_scale", "backoff_step_sizes"]

#: step-size schemes of :func:`step_size_loss` and :class:`HMCSampler`.
SCHEMES = ("absolute", "relative")


def expected_squared_change(states: torch.Tensor, scale: Optional[torch.Tensor] = None,
                            center: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Coordinate-wise ChEES of every transition of a chain, in whitened coordinates (to maximise).

    ``ChEES_{t,d} = ¼ E[((ε_{t,d} - c_d)² - (ε_{t-1,d} - c_d)²)² / s_d⁴]``: the expected squared change of the
    estimator of the second moment that transition ``t`` makes (Hoffman, Radul & Sountsov, "An Adaptive-MCMC Scheme
    for Setting Trajectory Lengths in Hamiltonian Monte Carlo", AISTATS 2021, eq. 4), evaluated per coordinate
    (per-dimension step sizes each get their own criterion) and averaged over chains and datapoints. Rejected
    transitions contribute 0, so its expectation is the acceptance-weighted ChEES of the proposal.

    Only the jump ``ε_t - ε_{t-1}`` is differentiated: with ``∇log p*`` detached in the integrator the jump depends
    on the step sizes of transition ``t`` alone (:func:`ppl_vae.infer.mcmc.hmc_step`), so each transition's term
    trains its own step sizes; the incoming state, the centre and the scale are detached.

    Args:
        states: ``(T+1, *chain_dims, dim)`` chain with its graph (:attr:`HMCTrace.states`).
        scale: positive whitening scale ``s`` broadcastable to ``(*chain_dims, dim)`` (``(dim,)``, an encoder's σ
            ``(batch, dim)``), or ``None`` (``s = 1``).
        center: ``c`` broadcastable to ``(*chain_dims, dim)``, e.g. the proposal mean ``(batch, dim)`` when there is
            one chain per datapoint; ``None``: the cross-chain means of ``ε_{t-1}`` and ``ε_t`` over the first chain
            dimension (Hoffman et al.'s estimator; needs at least 2 chains).

    Returns:
        ``(T, dim)`` ChEES per transition and coordinate (≈ ``sin²Θ_t`` for a whitened Gaussian at stationarity).

    Raises:
        ValueError: ``states`` has no transition or chain dimension, or ``center`` is ``None`` with one chain.
    """
    if states.dim() < 3 or states.shape[0] < 2:
        raise ValueError(f"states must be (T+1, *chain_dims, dim) with T >= 1, got {tuple(states.shape)}")
    prev = states[:-1].detach()
    new = prev + (states[1:] - states[:-1])
    if center is None:
        if states.shape[1] < 2:
            raise ValueError("expected_squared_change needs a center with a single chain")
        c_prev, c_new = prev.mean(1, keepdim=True), new.detach().mean(1, keepdim=True)
    else:
        c_prev = c_new = center.detach()
    a, b = new - c_new, prev - c_prev
    if scale is not None:
        inv = 1.0 / scale.detach()
        a, b = a * inv, b * inv
    change = a * a - b * b
    return 0.25 * (change * change).flatten(1, -2).mean(1)


def acceptance_floor_loss(accept_prob: torch.Tensor, step_sizes: torch.Tensor, target: float = 0.6) -> torch.Tensor:
    """Robbins-Monro term that lowers the step sizes of transitions accepting less than ``target`` (to minimise).

    ``Σ_t (target - ā_t)₊ Σ_d log φ_{t,d}`` with the mean acceptance probability ``ā_t`` of transition ``t``
    detached: its gradient w.r.t. ``log φ_{t,d}`` is ``(target - ā_t)₊``, the stochastic-approximation update of
    Robbins & Monro (1951) / Andrieu & Thoms ("A tutorial on adaptive MCMC", 2008, §3, eq. 11) restricted to
    lowering, written as a loss so one optimiser handles it with the other terms. It is zero while the chains accept
    at least ``target``, and still a gradient when every proposal is rejected or divergent (``ā_t = 0``), where
    objectives through the accepted positions have none.

    Args:
        accept_prob: ``(T, *chain_dims)`` acceptance probabilities (0 for divergent transitions); detached here.
        step_sizes: ``(T, dim)`` positive step sizes with their graph (or ``(T, *chain_dims, dim)``).
        target: acceptance floor in ``[0, 1]``; ``0`` switches the term off.

    Returns:
        scalar loss.

    Raises:
        ValueError: ``accept_prob`` and ``step_sizes`` disagree on ``T`` or ``target`` is outside ``[0, 1]``.
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target must be in [0, 1], got {target}")
    if accept_prob.shape[0] != step_sizes.shape[0]:
        raise ValueError(f"{accept_prob.shape[0]} transitions of accept_prob but {step_sizes.shape[0]} of step_sizes")
    rate = accept_prob.detach().reshape(accept_prob.shape[0], -1).mean(1)
    deficit = (target - rate).clamp_min(0.0)
    return (deficit * step_sizes.log().reshape(step_sizes.shape[0], -1).sum(1)).sum()


def step_size_loss(trace: HMCTrace, step_sizes: torch.Tensor, scheme: str = "relative",
                   scale: Optional[torch.Tensor] = None, center: Optional[torch.Tensor] = None,
                   target_accept: float = 0.6, log_prob_weight: float = 0.0) -> torch.Tensor:
    """The loss the step sizes minimise, for either scheme (see the module docstring).

    - ``"absolute"``: ``-mean log p*(ε_T)`` through :meth:`HMCTrace.surrogate_log_prob` (Campbell et al. 2021,
      eq. 5 without the entropy; HH-VAEM §3.5) ``+`` :func:`acceptance_floor_loss`.
    - ``"relative"``: ``-Σ_{t,d} ChEES_{t,d}`` (:func:`expected_squared_change` in coordinates whitened by
      ``scale``) ``+`` :func:`acceptance_floor_loss`. Run the chain with ``run_hmc(..., scale=s)`` so that
      ``step_sizes`` are the relative (dimensionless) ones.

    Args:
        trace: :class:`HMCTrace` of the chains this loss is about (use :meth:`HMCTrace.select_chains` to drop others).
        step_sizes: ``(T, dim)`` step sizes with their graph (the ones ``run_hmc`` received).
        scheme: ``"absolute"`` or ``"relative"``.
        scale: whitening scale for ``"relative"`` (default ``trace.scale``); ignored by ``"absolute"``.
        center: see :func:`expected_squared_change` (the proposal mean with one chain per datapoint).
        target_accept: floor of :func:`acceptance_floor_loss` (``0`` disables it).
        log_prob_weight: ``"relative"`` only: also subtract ``log_prob_weight × mean log p*(ε_T)`` (the reference
            objective, which pulls chains started far from the target into its high-density region by ``T``).

    Returns:
        scalar loss (its value is only meaningful up to constants; report ``trace.log_prob`` etc. instead).

    Raises:
        ValueError: unknown ``scheme``, or the errors of the terms.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"step_size_scheme must be one of {SCHEMES}, got {scheme!r}")
    floor = acceptance_floor_loss(trace.accept_prob, step_sizes, target_accept)
    if scheme == "absolute":
        return -trace.surrogate_log_prob().mean() + floor
    scale = trace.scale if scale is None else scale
    loss = -expected_squared_change(trace.states, scale, center).sum() + floor
    if log_prob_weight:
        loss = loss - log_prob_weight * trace.surrogate_log_prob().mean()
    return loss


@torch.no_grad()
def backoff_step_sizes(log_step_size: torch.Tensor, accept_prob: torch.Tensor, threshold: float = 0.05,
                       factor: float = 0.5) -> torch.Tensor:
    """Multiply (in place) the step sizes of every transition whose mean acceptance probability is below
    ``threshold`` by ``factor``: the halving rule of Hoffman & Gelman's step-size initialisation (JMLR 2014,
    Algorithm 4) applied to a learned schedule. Unlike a gradient step of an Adam-type optimiser, whose size is
    bounded by its learning rate, it escapes a schedule where (nearly) every proposal diverges in a few steps
    whatever the learning rate.

    Args:
        log_step_size: ``(T, dim)`` log step sizes (a parameter's data; modified in place, no autograd).
        accept_prob: ``(T, *chain_dims)`` acceptance probabilities of the last run.
        threshold: mean acceptance probability below which a transition backs off.
        factor: multiplier in ``(0, 1]``.

    Returns:
        ``(T,)`` bool, which transitions backed off.

    Raises:
        ValueError: ``factor`` outside ``(0, 1]`` or mismatched ``T``.
    """
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"factor must be in (0, 1], got {factor}")
    if accept_prob.shape[0] != log_step_size.shape[0]:
        raise ValueError(f"{accept_prob.shape[0]} transitions of accept_prob but {log_step_size.shape[0]} step sizes")
    low = accept_prob.reshape(accept_prob.shape[0], -1).mean(1) < threshold
    log_step_size.add_(low.to(log_step_size.dtype).unsqueeze(-1) * math.log(factor))
    return low


def adapt_scale(scale: torch.Tensor, samples: torch.Tensor, rate: float = 0.05, min_scale: float = 1e-4) -> torch.Tensor:
    """Exponential moving average of the per-dimension variance across chains: the diagonal metric adaptation of
    Stan (mass matrix ``M⁻¹ = diag(Var ε)``, Stan Reference Manual "HMC algorithm parameters"; Carpenter et al.,
    J. Stat. Softw. 2017), with the variance taken across many parallel chains instead of along one chain's
    warm-up window.

    ``s_new = sqrt((1 - rate) s² + rate Var_n(ε_n))``, ``Var`` over the first dimension of ``samples``; non-finite
    samples are ignored; the result is floored at ``min_scale`` and detached.

    Args:
        scale: ``(..., dim)`` current positive scale.
        samples: ``(N, ..., dim)`` states of ``N ≥ 2`` chains (e.g. :attr:`HMCTrace.position`).
        rate: EMA weight in ``(0, 1]`` of the new variance.
        min_scale: floor of the returned scale.

    Returns:
        new scale, shaped like ``scale`` (broadcast with ``samples.shape[1:]``), detached.

    Raises:
        ValueError: fewer than 2 chains or ``rate`` outside ``(0, 1]``.
    """
    if samples.shape[0] < 2:
        raise ValueError("adapt_scale needs at least 2 chains")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    x = samples.detach()
    finite = torch.isfinite(x)
    n = finite.sum(0).clamp_min(2)
    x0 = torch.where(finite, x, torch.zeros_like(x))
    mean = x0.sum(0) / n
    var = (torch.where(finite, x - mean, torch.zeros_like(x)) ** 2).sum(0) / (n - 1)
    new = ((1.0 - rate) * scale.detach() ** 2 + rate * var).sqrt()
    return new.clamp_min(min_scale)


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


def _adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where available (one kernel per step instead of a dozen ops; same update)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):  # pragma: no cover - device/dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr)


class HMCSampler(nn.Module):
    """Gradient-tuned HMC for an arbitrary unnormalised log density (the 2-D experiments of Campbell et al. 2021
    and of the HH-VAEM HMC-tuning code), with the SKSD-tuned inflation of HH-VAEM §3.5.

    Chains start from ``ε_0 ~ N(init_loc, (s ⊙ init_scale)²)`` and run ``T`` transitions of ``L`` leapfrog steps
    with the learnable schedule ``φ`` (:class:`StepSizes`). One :meth:`fit` step

    1. minimises :func:`step_size_loss` over ``num_chains`` chains w.r.t. ``φ`` (and the diagonal mass if
       ``learn_mass``), with ``∇log p*`` detached inside the integrator: with ``step_size_scheme="relative"``
       (default) ``φ`` is relative to the scale :attr:`scale` (absolute steps ``φ ⊙ scale``, a diagonal mass
       matrix) and maximises the whitened ChEES of every transition; ``scale`` starts at ``init_scale`` and follows
       the cross-chain standard deviation of ``ε_T`` (:func:`adapt_scale`). ``"absolute"`` is the reference:
       ``φ`` in the target's units maximising ``E log p*(ε_T)``. Both lower the steps of transitions accepting
       less than ``target_accept`` (:func:`acceptance_floor_loss`);
    2. minimises the SKSD (:func:`ppl_vae.infer.mcmc.sksd.sksd`) of ``sksd_chains`` further chains w.r.t. the
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
        step_size_scheme: ``"absolute"`` (default: the reference objective, with the acceptance floor) or
            ``"relative"`` (preconditioned by an adapted scale, ChEES-based step-size objective), see above. Measured
            (``benchmarks/hmc_gaussian20.py``, ``benchmarks/hmc_2d.py``): ``"relative"`` recovers an anisotropic
            20-D Gaussian's variances within 3% where ``"absolute"`` under-disperses 10 of 20 dimensions, and beats
            it on the dual moon at the reference learning rates (KSD 0.09 vs 0.20); at lr 0.01 / 100 steps it is
            worse on all three 2-D targets (ring 2.25 vs 0.31: the adapted global scale spans the modes), hence
            not the default for arbitrary densities.
        target_accept: acceptance floor of :func:`acceptance_floor_loss` (``0`` disables the term).
        scale_adaptation_rate: EMA rate of :func:`adapt_scale` per fit step (``"relative"`` only; ``0`` keeps
            ``scale = init_scale``, the proposal's scale).
        step_size_init: ``(low, high)`` of the log-uniform initial step sizes; default ``(0.02, 0.05)`` for
            ``"absolute"`` (HH-VAEM) and ``(0.1, 0.2)`` for ``"relative"`` (dimensionless: ``L φ`` of about one
            radian on a whitened Gaussian).
        divergence_backoff: factor of :func:`backoff_step_sizes` applied after every fit step to transitions whose
            acceptance rate is below 0.05 (``1`` disables it; the gradient of :func:`acceptance_floor_loss` then
            recovers alone, at a speed bounded by ``lr`` per step).
        log_prob_weight: ``"relative"`` only: weight of the reference ``E log p*(ε_T)`` added to the ChEES
            objective (see :func:`step_size_loss`; ``0``: pure ChEES).
        low_accept_warning: ``(threshold, steps)``: warn (once, ``RuntimeWarning``) when the acceptance rate of the
            step-size chains stays below ``threshold`` for ``steps`` consecutive fit steps; ``None`` never warns.
        compile: ``torch.compile`` each whole transition (its ``L`` gradient evaluations and the MH decision, one
            graph), the initial gradient and the SKSD loss (default); falls back to eager (with a warning) if that
            fails. On cheap 2-D targets it is ~3x faster per tuning step (eager time is per-op overhead); the first
            call compiles for a few seconds. ``torch.set_num_threads(1)`` is also fastest at these sizes.
        divergence_threshold: energy error marking a divergence.
        differentiable_scores: differentiate the SKSD through the score's dependence on the samples
            (``create_graph=True``, a Hessian-vector product); ``False`` detaches the scores (the reference code).
        grad_fn: optional hand-written :data:`GradFn` replacing autograd for ``log_prob``.
        device, dtype: where the chains live.

    Raises:
        ValueError: bad sizes, an unknown ``inflation`` or ``step_size_scheme``.
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
        compile: bool = True,
        divergence_threshold: float = 1000.0,
        differentiable_scores: bool = True,
        grad_fn: Optional[GradFn] = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        step_size_scheme: str = "absolute",
        target_accept: float = 0.6,
        scale_adaptation_rate: float = 0.05,
        step_size_init: Optional[tuple[float, float]] = None,
        low_accept_warning: Optional[tuple[float, int]] = (0.05, 50),
        divergence_backoff: float = 0.5,
        log_prob_weight: float = 0.0,
    ):
        super().__init__()
        if inflation not in ("dim", "scalar"):
            raise ValueError(f"inflation must be 'dim' or 'scalar', got {inflation!r}")
        if step_size_scheme not in SCHEMES:
            raise ValueError(f"step_size_scheme must be one of {SCHEMES}, got {step_size_scheme!r}")
        if not 0.0 <= scale_adaptation_rate <= 1.0:
            raise ValueError(f"scale_adaptation_rate must be in [0, 1], got {scale_adaptation_rate}")
        self.step_size_scheme = step_size_scheme
        self.target_accept = float(target_accept)
        self.scale_adaptation_rate = float(scale_adaptation_rate)
        self.low_accept_warning = low_accept_warning
        self.divergence_backoff = float(divergence_backoff)
        self.log_prob_weight = float(log_prob_weight)
        self._low_accept_steps, self._warned = 0, False
        if step_size_init is None:
            step_size_init = (0.1, 0.2) if step_size_scheme == "relative" else (0.02, 0.05)
        if num_chains < 1 or sksd_chains < 0 or sksd_chains == 1:
            raise ValueError("num_chains must be >= 1 and sksd_chains 0 or >= 2")
        self.log_prob = log_prob
        self.dim, self.num_leapfrog = int(dim), int(num_leapfrog)
        self.num_chains, self.sksd_chains = int(num_chains), int(sksd_chains)
        self.divergence_threshold = float(divergence_threshold)
        self.differentiable_scores = differentiable_scores
        self.step_sizes = StepSizes(num_steps, dim, init_range=tuple(step_size_init), seed=seed)
        self.log_inflation = nn.Parameter(torch.zeros(dim if inflation == "dim" else 1))
        self.log_mass = nn.Parameter(torch.zeros(num_steps, dim)) if learn_mass else None
        self.register_buffer("init_loc", torch.as_tensor(init_loc, dtype=dtype).expand(dim).clone())
        self.register_buffer("init_scale", torch.as_tensor(init_scale, dtype=dtype).expand(dim).clone())
        #: ``(dim,)`` whitening scale of the ``"relative"`` scheme (absolute steps ``φ ⊙ scale``).
        self.register_buffer("scale", self.init_scale.clone())
        self.to(device=device, dtype=dtype)
        self.generator = torch.Generator(device=device).manual_seed(int(seed))
        self.kernel = HMCKernel(log_prob, num_leapfrog, divergence_threshold, compile=compile, grad_fn=grad_fn)
        self._sksd_loss = self._build_sksd_loss(compile)
        phi = list(self.step_sizes.parameters()) + ([self.log_mass] if learn_mass else [])
        self.optimizer = _adam(phi, lr)
        self.inflation_optimizer = _adam([self.log_inflation], lr if inflation_lr is None else inflation_lr)
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

    def absolute_step_sizes(self) -> torch.Tensor:
        """``(T, dim)`` step sizes in the target's units (``φ ⊙ scale`` for ``"relative"``), detached."""
        phi = self.step_sizes().detach()
        return phi * self.scale if self.step_size_scheme == "relative" else phi

    def _run(self, init: torch.Tensor, step_sizes: torch.Tensor, inverse_mass, keep_chain: bool = False) -> HMCTrace:
        scale = self.scale if self.step_size_scheme == "relative" else None
        return run_hmc(None, init, step_sizes, self.num_leapfrog, inverse_mass, self.generator,
                       self.divergence_threshold, keep_chain, kernel=self.kernel, scale=scale)

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

        return CompileWithFallback(traced, eager, "the SKSD loss") if compile else eager

    # ------------------------------------------------------------------ training
    def fit_step(self) -> dict[str, float]:
        """One optimisation step of both objectives; returns this step's statistics (floats)."""
        c, cs = self.num_chains, self.sksd_chains
        self.optimizer.zero_grad(set_to_none=True)
        self.inflation_optimizer.zero_grad(set_to_none=True)
        step_sizes = self.step_sizes()
        trace = self._run(self._initial(c + cs), step_sizes, self.inverse_mass())
        own = trace.select_chains(slice(0, c))
        loss = step_size_loss(own, step_sizes, self.step_size_scheme, target_accept=self.target_accept,
                              log_prob_weight=self.log_prob_weight)
        phi = self.optimizer.param_groups[0]["params"]
        grads = torch.autograd.grad(loss, phi, retain_graph=cs > 0, allow_unused=True)
        for p, g in zip(phi, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        sksd_value = float("nan")
        if cs > 0:
            disc = self._sksd_loss(trace.position[c:], trace.grad[c:])
            (self.log_inflation.grad,) = torch.autograd.grad(disc, [self.log_inflation])
            self.inflation_optimizer.step()
            sksd_value = float(disc.detach())
        self.optimizer.step()
        if self.divergence_backoff < 1.0:
            backoff_step_sizes(self.step_sizes.log_step_size.data, own.accept_prob, 0.05, self.divergence_backoff)
        if self.step_size_scheme == "relative" and self.scale_adaptation_rate > 0 and c >= 2:
            self.scale = adapt_scale(self.scale, own.position.reshape(-1, self.dim), self.scale_adaptation_rate)
        accept_rate = float(own.accept_prob.mean())
        self._check_acceptance(accept_rate)
        return {
            "objective": float(own.log_prob.mean()),
            "sksd": sksd_value,
            "accept_rate": accept_rate,
            "divergences": float(own.diverging.sum()),
        }

    def _check_acceptance(self, accept_rate: float) -> None:
        if self.low_accept_warning is None:
            return
        threshold, steps = self.low_accept_warning
        self._low_accept_steps = self._low_accept_steps + 1 if not accept_rate >= threshold else 0
        if self._low_accept_steps >= steps and not self._warned:
            self._warned = True
            warnings.warn(f"HMC acceptance rate below {threshold} for {self._low_accept_steps} consecutive tuning "
                          f"steps (last {accept_rate:.3f}); the step sizes are too large for this target (lower "
                          "the initial step sizes or raise target_accept)", RuntimeWarning, stacklevel=3)

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
        sched = self.step_sizes() if step_sizes is None else step_sizes  # relative to ``scale`` if "relative"
        total = warmup + num_draws
        idx = torch.arange(total, device=sched.device) % sched.shape[0]
        inv_m = self.inverse_mass()
        trace = self._run(self._initial(num_chains), sched[idx], None if inv_m is None else inv_m[idx % inv_m.shape[0]],
                          keep_chain=True)
        chains = trace.positions[warmup + 1:, :, 0].transpose(0, 1)
        stats = {k: getattr(trace, k)[warmup:, :, 0].transpose(0, 1) for k in ("energy", "accept_prob", "diverging")}
        stats["step_size"] = trace.step_size[warmup:]
        return chains, stats

"""A guide refined by ``T`` HMC transitions with learned step sizes, for any Pyro model/guide pair.

The inference scheme of HH-VAEM (Peis, Ma & Hernández-Lobato, NeurIPS 2022, §3.5), built on the gradient-based HMC
tuning of Campbell et al. (ICML 2021) and the SKSD of Gong et al. (ICLR 2021): the guide's diagonal Gaussian
``q(z | x)`` (an amortised encoder, ``AutoNormal``, ``AutoDiagonalNormal``...) is inflated by a learnable scale
``s`` and then moved by ``T`` HMC transitions with learnable ``(T, latent_dim)`` step sizes on the model's
per-datapoint log joint. Everything is derived from the two Pyro programs (:mod:`ppl_vae.infer.potential`): the
latent sites, their unconstrained bijections, the target density and the proposal. The user writes nothing else::

    refined = HMCRefinedGuide(model, guide, num_transitions=5, num_leapfrog=5)
    svi = pyro.infer.SVI(model, refined, pyro.optim.Adam({"lr": 1e-3}), HMCObjective())
    Predictive(model, guide=refined, num_samples=100, parallel=True)(x)

Step-size schemes: ``"absolute"`` is the reference (``ε ← ε + φ ⊙ r``); ``"relative"`` (default) preconditions the
dynamics by the proposal's per-datapoint scale σ — HMC in whitened coordinates ``w = ε / σ``, i.e. a diagonal
mass matrix ``M = diag(σ)⁻²`` (Neal 2011, §4.1) — so the learned step sizes are dimensionless and the absolute
steps ``φ ⊙ σ`` follow the posterior's scale per datapoint.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterable, Optional

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.runtime import get_plates
from torch import nn

from ppl_vae.infer.mcmc import HMCTrace, StepSizes, run_hmc
from ppl_vae.infer.mcmc.sksd import sksd as _sksd
from ppl_vae.infer.mcmc.tuning import acceptance_floor_loss
from ppl_vae.infer.potential import BoundPotential, PotentialError, TracePotential

__all__ = ["HMCRefinedGuide", "HMCObjective", "INFLATIONS", "STEP_SIZE_SCHEMES"]

INFLATIONS = ("scalar", "layer", "dim")
STEP_SIZE_SCHEMES = ("relative", "absolute")
#: initial step sizes of the relative scheme, in units of the proposal's per-datapoint σ
RELATIVE_STEP_SIZE_RANGE = (0.1, 0.3)


@contextlib.contextmanager
def _frozen(params: Iterable[torch.Tensor]):
    """Temporarily set ``requires_grad=False`` on ``params`` (so a ``create_graph`` score does not reach them)."""
    changed = [p for p in params if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def _bound_self(fn) -> Optional[nn.Module]:
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    return fn if isinstance(fn, nn.Module) else None


class HMCRefinedGuide(nn.Module):
    """A Pyro guide: the guide's Gaussian, inflated, then ``T`` HMC transitions on the model's log joint.

    ``z_0 = μ + s ⊙ σ ⊙ ξ`` with ``(μ, σ)`` read from ``guide``'s trace (detached from the guide's parameters by
    default: the guide is trained by the ELBO, see :class:`HMCObjective`), ``ξ ~ N(0, I)``, then
    :func:`ppl_vae.infer.mcmc.run_hmc` on the potential of ``model`` (:class:`ppl_vae.infer.potential.
    TracePotential`). The refined ``z_T`` is differentiable w.r.t. the step sizes (``∇log p*`` detached inside the
    integrator, HH-VAEM §3.5) and the inflation.

    Its own parameters (step sizes, inflation) are created on the first call (the latent width comes from the
    prototype trace) unless ``latent_dim`` is given; they are registered as ``pyro.module(name, self)``
    (``<name>$$$step_sizes.log_step_size``, ``<name>$$$log_inflation``). The model and guide are held by
    reference, not as submodules, so the refined guide can itself be a submodule of a model.

    Args:
        model: the Pyro model; local latents inside ``pyro.plate(data_plate, N)``.
        guide: a Pyro guide with a diagonal Gaussian for every latent of the model.
        num_transitions: ``T`` HMC transitions.
        num_leapfrog: ``L`` leapfrog steps per transition.
        inflation: ``"scalar"`` (one ``s``), ``"layer"`` (one per latent site), or ``"dim"`` (one per latent dim);
            log-parameterised, initialised at ``s = 1``.
        step_size_scheme: ``"relative"`` (steps relative to the proposal's σ; default) or ``"absolute"``
            (the reference scheme).
        num_chains: chains per datapoint for :class:`HMCObjective`'s ``L_HMC`` (reference: 1 in training).
        latent_dim: width of the flat latent vector, to create the parameters at construction (checked later).
        num_sites: number of latent sites (``inflation="layer"`` with ``latent_dim``).
        data_plate: name of the model's data plate.
        fast_log_joint: optional hand-written ``(z (C, N, latent_dim), *args) -> (C, N)`` log joint, verified
            against the trace on first use (:class:`~ppl_vae.infer.potential.TracePotential`).
        divergence_threshold: energy error marking a divergence (rejected as a whole and counted).
        seed: seed of the step-size initialisation ``log U(step_size_range)``.
        step_size_range: initial step sizes ``U(low, high)``; default ``(0.02, 0.05)`` under ``"absolute"``
            (HH-VAEM) and :data:`RELATIVE_STEP_SIZE_RANGE` under ``"relative"`` (in units of the proposal's σ, where
            a calibrated guide makes the posterior's scale ≈ 1).
        sksd_chains: chains per datapoint for the SKSD objective of the inflation (reference 30).
        differentiable_scores: differentiate the SKSD through the score (a Hessian-vector product of the log joint,
            model parameters frozen meanwhile); ``False`` detaches the scores like the reference code.
        name: the ``pyro.module`` name of the guide's own parameters.
        compile: run the leapfrog gradients of a trace-derived potential through a recorded, verified graph
            (``TracePotential(compile=True)``): several times faster per evaluation for user-written programs,
            about a second of recording per new batch shape; ignored when ``fast_log_joint`` is given.

    Shapes: chains ``(num_chains, N, latent_dim)`` (flat, unconstrained); ``step_sizes()`` ``(T, latent_dim)``;
    :meth:`inflation` ``(latent_dim,)``.

    Raises:
        ValueError: unknown ``inflation``/``step_size_scheme`` or bad sizes.
        PotentialError: on the first call, a model/guide pair whose potential cannot be derived (names the site).
    """

    def __init__(self, model: Callable, guide: Callable, num_transitions: int = 5, num_leapfrog: int = 5, *,
                 inflation: str = "scalar", step_size_scheme: str = "relative", num_chains: int = 1,
                 latent_dim: Optional[int] = None, num_sites: Optional[int] = None, data_plate: str = "data",
                 fast_log_joint: Optional[Callable] = None, divergence_threshold: float = 1000.0, seed: int = 0,
                 step_size_range: Optional[tuple[float, float]] = None, sksd_chains: int = 30,
                 differentiable_scores: bool = True, name: str = "hmc_guide", compile: bool = False):
        super().__init__()
        if inflation not in INFLATIONS:
            raise ValueError(f"unknown inflation {inflation!r}; choose one of {INFLATIONS}")
        if step_size_scheme not in STEP_SIZE_SCHEMES:
            raise ValueError(f"unknown step_size_scheme {step_size_scheme!r}; choose one of {STEP_SIZE_SCHEMES}")
        if num_transitions < 1 or num_chains < 1 or sksd_chains < 2 or num_leapfrog < 1:
            raise ValueError("need num_transitions, num_chains, num_leapfrog >= 1 and sksd_chains >= 2")
        if not callable(model) or not callable(guide):
            raise TypeError("HMCRefinedGuide(model, guide, ...) takes the Pyro model and guide callables")
        object.__setattr__(self, "_model", model)  # not submodules: their parameters are not ours
        object.__setattr__(self, "_guide", guide)
        self.potential = TracePotential(model, guide, data_plate=data_plate, fast_log_joint=fast_log_joint,
                                        compile=compile)
        self.num_transitions, self.num_leapfrog = int(num_transitions), int(num_leapfrog)
        self.num_chains, self.sksd_chains = int(num_chains), int(sksd_chains)
        self.inflation_kind, self.step_size_scheme = inflation, step_size_scheme
        self.divergence_threshold = float(divergence_threshold)
        self.differentiable_scores = differentiable_scores
        if step_size_range is None:
            step_size_range = RELATIVE_STEP_SIZE_RANGE if step_size_scheme == "relative" else (0.02, 0.05)
        self.seed, self.step_size_range = int(seed), tuple(step_size_range)
        self.pyro_name = name
        self.step_sizes: Optional[StepSizes] = None
        self.log_inflation: Optional[nn.Parameter] = None
        self.last_trace: Optional[HMCTrace] = None
        self.last_potential: Optional[BoundPotential] = None
        if latent_dim is not None:
            self._create_parameters(int(latent_dim), [int(latent_dim)] if num_sites is None else None, num_sites)

    # ------------------------------------------------------------------ parameters
    def _create_parameters(self, latent_dim: int, site_sizes: Optional[list[int]], num_sites: Optional[int]) -> None:
        self.latent_dim = latent_dim
        self.step_sizes = StepSizes(self.num_transitions, latent_dim, self.step_size_range, self.seed)
        if self.inflation_kind == "layer":
            n = len(site_sizes) if site_sizes is not None else int(num_sites)
        else:
            n = {"scalar": 1, "dim": latent_dim}[self.inflation_kind]
        self.log_inflation = nn.Parameter(torch.zeros(n))
        self._site_sizes = site_sizes

    def _setup(self, bound: BoundPotential) -> None:
        sizes = [s.size for s in bound.sites]
        if self.step_sizes is None:
            self._create_parameters(bound.latent_dim, sizes, None)
            self.to(bound.proposal()[0].device)
        if bound.latent_dim != self.latent_dim:
            raise PotentialError(f"the model's latents {[s.name for s in bound.sites]} have {bound.latent_dim} "
                                 f"unconstrained values per datapoint but this guide was built for {self.latent_dim}")
        if self.inflation_kind == "layer" and self.log_inflation.numel() != len(sizes):
            raise PotentialError(f"inflation='layer' has {self.log_inflation.numel()} scales but the model has "
                                 f"{len(sizes)} latent sites {[s.name for s in bound.sites]}")
        self._site_sizes = sizes

    @property
    def model(self) -> Callable:
        """The Pyro model (not a registered submodule)."""
        return self._model

    @property
    def guide(self) -> Callable:
        """The base Pyro guide whose Gaussian starts the chains (not a registered submodule)."""
        return self._guide

    @property
    def num_steps(self) -> int:
        """``T`` (alias of ``num_transitions``)."""
        return self.num_transitions

    def inflation(self) -> torch.Tensor:
        """``(latent_dim,)`` positive inflation ``s`` (differentiable)."""
        s = self.log_inflation.exp()
        if self.inflation_kind == "layer":
            sizes = torch.as_tensor(self._site_sizes, device=s.device)
            return s.repeat_interleave(sizes)
        return s.expand(self.latent_dim)

    def bind(self, *args, model: Optional[Callable] = None, **kwargs) -> BoundPotential:
        """The potential of ``model(*args, **kwargs)`` (one prototype run of guide and model), parameters set up."""
        bound = self.potential.bind(*args, model=model, **kwargs)
        self._setup(bound)
        return bound

    # ------------------------------------------------------------------ refinement
    def refine(self, *args, num_chains: Optional[int] = None, model: Optional[Callable] = None,
               detach_proposal: bool = True, detach_step_sizes: bool = False, keep_chain: bool = False,
               step_sizes: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
               potential: Optional[BoundPotential] = None, **kwargs) -> HMCTrace:
        """Draw ``z_0`` from the inflated proposal and run ``T`` HMC transitions (no loop over chains/datapoints).

        Args:
            *args, **kwargs: the program's arguments.
            num_chains: chains per datapoint ``C`` (default ``self.num_chains``).
            model: the model to target (default the one given at construction; ``HMCObjective`` passes SVI's).
            detach_proposal: detach ``(μ, σ)`` from the guide's parameters (default).
            detach_step_sizes: detach the step sizes (the SKSD objective's chains).
            keep_chain: keep the ``(T+1, C, N, latent_dim)`` chain in the trace (diagnostics).
            step_sizes: ``(T', latent_dim)`` schedule to use instead of ``self.step_sizes()``.
            generator: ``torch.Generator`` (default: global RNG, seeded by ``pyro.set_rng_seed``).
            potential: the :meth:`bind` result for these same arguments, to skip a second prototype run.

        Returns:
            :class:`ppl_vae.infer.mcmc.HMCTrace` in the flat unconstrained coordinates of the model's latents:
            ``position`` ``(C, N, latent_dim)`` keeps its graph to the step sizes and the inflation (when grad is
            enabled); ``grad`` is ``∇ log p*`` there; statistics ``(T, C, N)``; ``step_size`` the (relative, under
            ``"relative"``) schedule. The bound potential is kept in ``self.last_potential``.
        """
        if torch.jit.is_tracing():
            raise NotImplementedError("HMCRefinedGuide cannot be JIT-traced (its Metropolis-Hastings decisions are "
                                      "data-dependent); use Trace_ELBO / HMCObjective without JIT")
        bound = potential if potential is not None else self.bind(*args, model=model, **kwargs)
        c = self.num_chains if num_chains is None else int(num_chains)
        loc, scale = bound.proposal()
        if detach_proposal:
            loc, scale = loc.detach(), scale.detach()
        xi = torch.randn((c,) + tuple(loc.shape), generator=generator, dtype=loc.dtype, device=loc.device)
        phi = self.step_sizes() if step_sizes is None else step_sizes
        if detach_step_sizes:
            phi = phi.detach()
        z0 = loc + self.inflation() * scale * xi
        # "relative": absolute steps φ ⊙ σ, i.e. leapfrog with the diagonal mass matrix diag(σ)^-2 (Neal 2011, §4.1)
        sigma = scale.detach() if self.step_size_scheme == "relative" else None
        trace = run_hmc(bound, z0, phi, self.num_leapfrog, None, generator, self.divergence_threshold, keep_chain,
                        grad_fn=bound.value_and_grad, scale=sigma)
        self.last_trace, self.last_potential = trace, bound
        return trace

    @torch.no_grad()
    def sample_chains(self, *args, num_chains: int = 4, num_draws: int = 200, warmup: int = 0,
                      init_scale: Optional[float] = None, seed: int = 0, **kwargs):
        """Long chains for diagnostics: the tuned schedule of ``T`` transitions applied ``warmup + num_draws``
        times, one draw kept per sweep, ready for :func:`ppl_vae.diagnostics.to_arviz`.

        Args:
            *args, **kwargs: the program's arguments (the rows to diagnose).
            num_chains: chains per datapoint, started from the inflated proposal (or ``init_scale`` × σ).
            num_draws, warmup: kept and discarded sweeps.
            init_scale: over-dispersion of the starts relative to the guide's σ (default: the learned inflation).
            seed: seeds the starts, momenta and accept/reject draws.

        Returns:
            ``(chains, stats)``: chains ``(num_chains, num_draws, N, latent_dim)`` (flat unconstrained latents);
            stats ``energy`` (after each sweep), ``accept_prob`` (mean over the sweep), ``accepted`` (fraction of
            accepted proposals in the sweep), ``diverging`` (any divergence in the sweep), each
            ``(num_chains, num_draws, N)``, and ``step_size`` ``(num_draws, latent_dim)`` (mean over the sweep,
            relative to σ under ``"relative"``); all on the CPU.
        """
        bound = self.bind(*args, **kwargs)
        gen = torch.Generator(device=bound.proposal()[0].device).manual_seed(int(seed))
        schedule = self.step_sizes().detach()
        T, sweeps = schedule.shape[0], int(warmup) + int(num_draws)
        saved = None
        if init_scale is not None:
            saved = self.log_inflation.detach().clone()
            self.log_inflation.data.fill_(math.log(float(init_scale)))
        try:
            with torch.enable_grad():
                trace = self.refine(*args, num_chains=num_chains, keep_chain=True, generator=gen,
                                    step_sizes=schedule.repeat(sweeps, 1), potential=bound, **kwargs)
        finally:
            if saved is not None:
                self.log_inflation.data.copy_(saved)
        keep = slice(int(warmup) * T + T, None, T)
        chains = trace.positions[keep].movedim(0, 1)

        def per_draw(x):  # (sweeps*T, C, N) -> (draws, T, C, N)
            return x.reshape(sweeps, T, *x.shape[1:])[int(warmup):]

        stats = {"energy": per_draw(trace.energy)[:, -1].movedim(0, 1),
                 "accept_prob": per_draw(trace.accept_prob).mean(1).movedim(0, 1),
                 "diverging": per_draw(trace.diverging).any(1).movedim(0, 1),
                 "step_size": schedule.mean(0).expand(int(num_draws), schedule.shape[-1])}
        accepted = getattr(trace, "accepted", None)
        if accepted is not None:
            stats["accepted"] = per_draw(accepted.to(schedule.dtype)).mean(1).movedim(0, 1)
        return chains.detach().cpu(), {k: v.detach().cpu() for k, v in stats.items()}

    def forward(self, *args, **kwargs) -> dict:
        """Pyro guide: refine and emit every latent site as ``pyro.sample(site, Delta(value))`` (constrained value,
        inside the data plate). Under ``Trace_ELBO`` the loss is then ``-Σ log p(x, z_T)``: the entropy of
        ``q^(T)`` is dropped (Campbell et al. 2021; HH-VAEM §3.5).

        Enclosing vectorised plates (``Predictive(parallel=True)``'s, ``Trace_ELBO(vectorize_particles=True)``'s)
        set the number of chains per datapoint, one chain per particle.

        Returns:
            ``{site: value}`` of the emitted values.

        Raises:
            NotImplementedError: under ``torch.jit`` tracing, or more than one enclosing vectorised plate.
        """
        outer = [f for f in get_plates() if f.vectorized and f.name != self.potential.data_plate]
        if len(outer) > 1:
            raise NotImplementedError(f"HMCRefinedGuide supports one enclosing vectorised plate, got "
                                      f"{[f.name for f in outer]}")
        num_chains, chain_dim = (outer[0].size, outer[0].dim) if outer else (1, None)
        bound = self.bind(*args, **kwargs)
        pyro.module(self.pyro_name, self)
        trace = self.refine(*args, num_chains=num_chains, potential=bound, **kwargs)
        values = bound.unpack(trace.position if outer else trace.position[0], chain_dim)
        out = {}
        with pyro.plate(bound.data_plate, bound.batch_size, dim=bound.data_dim):
            for s in bound.sites:
                value = values[s.name]
                event_dim = len(s.shape) - s.data_pos - 1
                out[s.name] = pyro.sample(s.name, dist.Delta(value, event_dim=event_dim))
        return out

    # ------------------------------------------------------------------ SKSD
    def _model_parameters(self, model: Optional[Callable] = None) -> list[torch.Tensor]:
        owner = _bound_self(self.model if model is None else model)
        if owner is None:
            return []
        own = {id(p) for p in self.parameters()}
        return [p for p in owner.parameters() if id(p) not in own]

    def sksd_from_chains(self, samples: torch.Tensor, scores: torch.Tensor, bound: BoundPotential) -> torch.Tensor:
        """Mean over datapoints of the SKSD of ``samples`` ``(C, N, latent_dim)`` (axis slices, U-statistic).

        ``scores`` are the detached ``∇log p*`` at the samples; with ``differentiable_scores`` they are recomputed
        with ``create_graph=True`` (model parameters frozen meanwhile, so the gradient reaches only what produced
        the samples). Datapoints with a non-finite score on any chain are left out of the mean.

        Returns:
            scalar tensor (0 with a graph if no datapoint is usable).
        """
        if self.differentiable_scores and samples.requires_grad and torch.is_grad_enabled():
            with _frozen(self._model_parameters(bound.model)), torch.enable_grad():
                (scores,) = torch.autograd.grad(bound(samples).sum(), samples, create_graph=True)
        ok = torch.isfinite(scores).all(-1).all(0)
        if not bool(ok.all()):
            samples, scores = samples[:, ok], scores[:, ok]
        if samples.shape[1] == 0:
            return samples.sum() * 0.0
        return _sksd(samples, scores).mean()

    def sksd_loss(self, *args, num_chains: Optional[int] = None, **kwargs) -> torch.Tensor:
        """Mean SKSD (Gong et al. 2021) of ``num_chains`` separate refined chains per datapoint (default
        ``sksd_chains``), step sizes and proposal detached: its gradient reaches only the inflation ``s``
        (HH-VAEM §3.5). Returns a scalar tensor."""
        c = self.sksd_chains if num_chains is None else int(num_chains)
        trace = self.refine(*args, num_chains=c, detach_proposal=True, detach_step_sizes=True, **kwargs)
        return self.sksd_from_chains(trace.position, trace.grad, self.last_potential)


def _param_leaves(trace) -> list[torch.Tensor]:
    """The unconstrained leaf tensors of the param sites of a ``param_only`` trace, in order, without repeats."""
    out, seen = [], set()
    for site in trace.nodes.values():
        if site["type"] != "param":
            continue
        value = site["value"]
        p = value.unconstrained() if hasattr(value, "unconstrained") else value
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            out.append(p)
    return out


def _capture_params(fn: Callable, sink: list) -> Callable:
    """``fn`` wrapped so that the param sites it touches are recorded (a ``param_only`` trace) into ``sink``."""
    def wrapped(*args, **kwargs):
        with poutine.trace(param_only=True) as tracer:
            out = fn(*args, **kwargs)
        sink.append(tracer.trace)
        return out
    return wrapped


def _first_rows(args: tuple, kwargs: dict, rows: int):
    """Arguments restricted to their first ``rows`` rows when they are :class:`~ppl_vae.models.base.Batch` es
    (other programs' arguments have no known row axis: returned unchanged, with ``False``)."""
    from ppl_vae.models.base import Batch

    if args and isinstance(args[0], Batch) and args[0].size > rows:
        return (args[0][:rows],) + tuple(args[1:]), kwargs, True
    return args, kwargs, False


class HMCObjective(pyro.infer.ELBO):
    """The three objectives of HH-VAEM §3.5 in one Pyro loss, for an :class:`HMCRefinedGuide` around any
    model/guide pair: ``pyro.infer.SVI(model, refined_guide, optim, HMCObjective())``.

    Each parameter group receives the gradient of its own objective only (``torch.autograd.grad`` per group):

    1. guide parameters ψ (every param site the base guide touches: encoder weights, ``AutoNormal`` locs/scales,
       ``pyro.param`` s): the ELBO of the base guide, ``elbo.differentiable_loss(model, refined.guide, ...)``;
    2. model parameters θ (every param site the model touches and the guide does not: decoder, predictor,
       ``pyro.param`` s) and the step sizes φ: ``L_HMC = -mean_{chains, datapoints} log p*(z_T)`` over
       ``refined.num_chains`` chains per datapoint (Campbell et al. 2021; the entropy of ``q^(T)`` is dropped);
    3. the inflation s: mean SKSD over ``sksd_chains`` separate chains per datapoint, step sizes detached
       (Gong et al. 2021), on the first ``sksd_rows`` rows when the data is a :class:`~ppl_vae.models.base.Batch`.

    The model is the one SVI passes. Because ``pyro.optim.PyroOptim`` keeps one optimiser per parameter, groups can
    have their own learning rates through per-name ``optim_args`` (the refined guide's are ``<name>$$$...``).

    Args:
        sksd_chains: chains per datapoint for (3) (default ``guide.sksd_chains``; 0 disables inflation tuning).
        elbo: the ELBO used for (1) (default ``pyro.infer.Trace_ELBO()``).
        sksd_rows: rows of a :class:`Batch` used by (3).
        target_accept: acceptance floor of :func:`ppl_vae.infer.mcmc.tuning.acceptance_floor_loss` added to φ's
            objective (Andrieu & Thoms 2008, §3): zero while the chains accept at least this often, a gradient that
            lowers the step sizes when they do not, also when every proposal is rejected (0 disables it).
        low_accept: acceptance-rate threshold of the warning below.
        low_accept_steps: warn (once) when the mean acceptance probability stays below ``low_accept`` for this many
            consecutive steps.

    Attributes:
        last_stats: floats of the latest step: ``elbo``, ``log_p_T`` (mean ``log p*(z_T)`` per datapoint), ``sksd``,
            ``accept`` (mean acceptance probability), ``accept_rate`` (fraction accepted), ``divergent`` (count),
            ``inflation`` (mean s), ``step_size`` (mean φ).
    """

    def __init__(self, sksd_chains: Optional[int] = None, elbo=None, sksd_rows: int = 16,
                 target_accept: float = 0.6, low_accept: float = 0.05, low_accept_steps: int = 50):
        super().__init__(num_particles=1, max_plate_nesting=2)
        self.sksd_chains = sksd_chains
        self.sksd_rows = int(sksd_rows)
        self.elbo = elbo if elbo is not None else pyro.infer.Trace_ELBO()
        self.target_accept = float(target_accept)
        self.low_accept, self.low_accept_steps = float(low_accept), int(low_accept_steps)
        self._low_streak, self._warned = 0, False
        self.last_stats: dict[str, float] = {}

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - not a trace-based estimator
        raise NotImplementedError("HMCObjective does not sample traces; use loss / loss_and_grads")

    @staticmethod
    def _check(guide) -> "HMCRefinedGuide":
        if not isinstance(guide, HMCRefinedGuide):
            raise TypeError(f"HMCObjective needs an HMCRefinedGuide as guide, got {type(guide).__name__}")
        return guide

    def loss(self, model, guide, *args, **kwargs) -> float:
        """Negative ELBO of the base guide (no gradients)."""
        guide = self._check(guide)
        with torch.no_grad():
            return float(self.elbo.differentiable_loss(model, guide.guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """One step of the three objectives; fills ``.grad`` of every parameter from its own objective (adding to an
        existing ``.grad``) and returns the negative ELBO of the base guide (float).

        Raises:
            TypeError: the guide is not an :class:`HMCRefinedGuide`.
            PotentialError: the model/guide pair has no derivable potential (names the site).
        """
        refined = self._check(guide)
        model_params, guide_params = [], []
        elbo_loss = self.elbo.differentiable_loss(_capture_params(model, model_params),
                                                  _capture_params(refined.guide, guide_params), *args, **kwargs)
        psi = [p for t in guide_params for p in _param_leaves(t)]
        psi = list({id(p): p for p in psi}.values())
        psi_ids = {id(p) for p in psi}
        own_ids = {id(p) for p in refined.parameters()}
        theta = [p for t in model_params for p in _param_leaves(t) if id(p) not in psi_ids and id(p) not in own_ids]
        theta = list({id(p): p for p in theta}.values())

        grads: list = []
        if psi:
            grads += zip(psi, torch.autograd.grad(elbo_loss, psi, allow_unused=True))
        # (2) L_HMC on C chains per datapoint (the refined guide's parameters are created on its first bind)
        trace = refined.refine(*args, num_chains=refined.num_chains, model=model, **kwargs)
        pyro.module(refined.pyro_name, refined)
        bound = refined.last_potential
        log_p = bound(trace.position)  # (C, N), graph to θ and, through z_T, to φ
        finite = torch.isfinite(log_p)
        hmc_loss = -log_p[finite].mean() if bool(finite.any()) else log_p.sum() * 0.0
        phi = [refined.step_sizes.log_step_size]
        grads += zip(theta + phi, torch.autograd.grad(hmc_loss, theta + phi, allow_unused=True))
        if self.target_accept > 0:  # a gradient for φ even when every proposal is rejected (L_HMC has none then)
            floor = acceptance_floor_loss(trace.accept_prob, refined.step_sizes(), self.target_accept)
            grads += zip(phi, torch.autograd.grad(floor, phi, allow_unused=True))
        # (3) SKSD -> inflation, on separate chains (of the first `sksd_rows` rows of a Batch)
        cs = refined.sksd_chains if self.sksd_chains is None else int(self.sksd_chains)
        disc = None
        if cs > 0:
            sargs, skwargs, _ = _first_rows(args, kwargs, self.sksd_rows)
            strace = refined.refine(*sargs, num_chains=cs, model=model, detach_proposal=True, detach_step_sizes=True,
                                    **skwargs)
            disc = refined.sksd_from_chains(strace.position, strace.grad, refined.last_potential)
            grads += zip([refined.log_inflation],
                         torch.autograd.grad(disc, [refined.log_inflation], allow_unused=True))
        for p, g in grads:
            if g is None:
                continue
            p.grad = g.detach() if p.grad is None else p.grad + g.detach()

        accept = float(trace.accept_prob.mean())
        self._watch_acceptance(accept)
        loss = float(elbo_loss.detach())
        self.last_stats = {
            "elbo": -loss,
            "log_p_T": float(log_p.detach()[finite].mean()) if bool(finite.any()) else float("nan"),
            "sksd": float(disc.detach()) if disc is not None else float("nan"),
            "accept": accept,
            "accept_rate": float(trace.accepted.float().mean()) if trace.accepted is not None else float("nan"),
            "divergent": float(trace.diverging.sum()),
            "inflation": float(refined.inflation().detach().mean()),
            "step_size": float(refined.step_sizes().detach().mean()),
        }
        return loss

    def _watch_acceptance(self, accept: float) -> None:
        self._low_streak = self._low_streak + 1 if accept < self.low_accept else 0
        if self._low_streak >= self.low_accept_steps and not self._warned:
            self._warned = True
            warnings.warn(f"HMC acceptance probability has stayed below {self.low_accept} for {self._low_streak} "
                          "steps: the chains barely move (step sizes too large, or a target with non-finite regions); "
                          "lower the step-size learning rate or initial step sizes", RuntimeWarning)

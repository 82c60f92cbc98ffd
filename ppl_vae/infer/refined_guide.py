"""An amortised Gaussian guide refined by ``T`` HMC steps with learned step sizes, usable as a Pyro guide.

The inference scheme of HH-VAEM (Peis, Ma & Hernández-Lobato, NeurIPS 2022, §3.5; METHODS §5–6), built on the
gradient-based HMC tuning of Campbell et al. (ICML 2021) and the SKSD of Gong et al. (ICLR 2021): the encoder's
Gaussian ``q(ε | x_O, y_O)`` is inflated by a learnable scale ``s`` and then moved by ``T`` HMC transitions whose
``(T, latent_dim)`` step sizes are learned by maximising ``E log p*(ε_T)``.

It works with any *refinable* model (e.g. every :class:`~ppl_vae.models.tabular.table.TableVAE`) exposing

- ``latent_sites() -> [(site_name, size)]``: continuous latent sites, in the order of the flat latent vector;
- ``proposal(batch) -> (loc, scale)``, each ``(batch, latent_dim)``: the encoder's Gaussian over the flat latent;
- ``log_joint(latent, batch) -> (..., batch)``: plain-torch ``log p(x_O, y_O, latent)`` per datapoint for
  ``latent`` ``(..., batch, latent_dim)`` (the fast path; a test proves it equals :func:`pyro_log_joint`);
- ``model(batch)``: the Pyro program, latents inside ``pyro.plate("data", batch.size, dim=-1)`` with event dim 1;
- ``guide(batch)`` and ``encoder_parameters()`` for the ELBO part of :class:`HMCObjective`.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch import nn

from ppl_vae.infer.mcmc import HMCTrace, StepSizes, run_hmc
from ppl_vae.infer.mcmc.sksd import sksd as _sksd

__all__ = ["pyro_log_joint", "HMCRefinedGuide", "HMCObjective"]

INFLATIONS = ("scalar", "layer", "dim")


def _split_latent(model, latent: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    sites = list(model.latent_sites())
    sizes = [int(n) for _, n in sites]
    if latent.shape[-1] != sum(sizes):
        raise ValueError(f"latent has trailing size {latent.shape[-1]} but the model's latent sites sum to "
                         f"{sum(sizes)}: {sites}")
    return [(name, v) for (name, _), v in zip(sites, torch.split(latent, sizes, dim=-1))]


@contextlib.contextmanager
def _unit_kl_weight(model):
    """Models that anneal their KL term scale the prior site by ``model.kl_weight``; the log joint is the
    unscaled one, so the weight is set to 1 meanwhile (and restored)."""
    if not hasattr(model, "kl_weight"):
        yield
        return
    old = model.kl_weight
    model.kl_weight = 1.0
    try:
        yield
    finally:
        model.kl_weight = old


def pyro_log_joint(model, latent: torch.Tensor, batch) -> torch.Tensor:
    """Per-datapoint log joint ``log p(x_O, y_O, ε)`` computed from the model's Pyro program.

    The latent sites of ``model.model`` are conditioned on slices of ``latent`` (see ``model.latent_sites()``), the
    program is traced under an outer ``pyro.plate("chains", C, dim=-2)`` so that its ``data`` plate (dim -1) keeps
    the datapoints apart, and every sample site's ``log_prob`` (mask and scale applied, as
    ``Trace.compute_log_prob`` does; plate subsample sites skipped) is summed, keeping the ``(C, batch)`` dims. A
    site with fewer batch dims (a global latent) is broadcast, i.e. added to every datapoint. A ``kl_weight``
    attribute of the model is set to 1 meanwhile. The program runs inside ``poutine.block`` so that outer handlers
    (an SVI trace or param capture, a guide's trace) see none of its sites. This is the reference the models'
    fast ``log_joint`` must equal.

    Args:
        model: a refinable model (``latent_sites()``, ``model(batch)``).
        latent: ``(C, batch, latent_dim)`` (or ``(batch, latent_dim)``).
        batch: the :class:`ppl_vae.models.base.Batch`.

    Returns:
        ``(C, batch)`` (or ``(batch,)``) log joint, differentiable w.r.t. ``latent`` and the model parameters.

    Raises:
        ValueError: ``latent`` does not match ``latent_sites()`` or is not 2-/3-D.
    """
    squeeze = latent.dim() == 2
    if squeeze:
        latent = latent.unsqueeze(0)
    if latent.dim() != 3:
        raise ValueError(f"latent must be (C, batch, dim) or (batch, dim), got shape {tuple(latent.shape)}")
    data = dict(_split_latent(model, latent))
    with _unit_kl_weight(model), poutine.block():
        with poutine.trace() as tracer, pyro.plate("chains", latent.shape[0], dim=-2):
            poutine.condition(model.model, data=data)(batch)
    trace = tracer.trace
    trace.compute_log_prob()
    total = latent.new_zeros(latent.shape[:-1])
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            total = total + site["log_prob"]
    return total[0] if squeeze else total


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


class HMCRefinedGuide(nn.Module):
    """Encoder proposal + ``T`` HMC transitions with learned step sizes, as a Pyro guide (HH-VAEM §3.5).

    ``ε_0 = μ + s ⊙ σ ⊙ ξ`` with ``(μ, σ) = model.proposal(batch)`` (detached from the encoder by default: the
    encoder is trained by the ELBO only), ``ξ ~ N(0, I)``, then :func:`ppl_vae.infer.mcmc.run_hmc` on the
    model's log joint with the learnable ``(T, latent_dim)`` step sizes. The refined sample ``ε_T`` is
    differentiable w.r.t. the step sizes (``∇log p*`` detached in the integrator) and the inflation.

    The model is held by reference, not registered as a submodule (so the guide can itself be a submodule of the
    model): ``guide.parameters()`` are only the step sizes and the inflation, and ``pyro.module("hmc_guide",
    guide)`` registers just those (as ``hmc_guide$$$step_sizes.log_step_size`` and ``hmc_guide$$$log_inflation``).

    Args:
        model: a refinable model (see the module docstring).
        num_steps: ``T`` transitions.
        num_leapfrog: ``L`` leapfrog steps per transition.
        inflation: ``"scalar"`` (one ``s``), ``"layer"`` (one per latent site), or ``"dim"`` (one per latent dim);
            log-parameterised, initialised at ``s = 1``.
        num_chains: chains per datapoint used by ``__call__`` (must be 1 there) and by :class:`HMCObjective`'s
            ``L_HMC`` (reference: 1 in training).
        use_pyro_log_joint: target :func:`pyro_log_joint` instead of ``model.log_joint`` (slow; for checking).
        divergence_threshold: energy error marking a divergence (rejected as a whole and counted).
        seed: seed of the step-size initialisation ``log U(step_size_range)``.
        step_size_range: initial step sizes ``U(low, high)`` (HH-VAEM: ``(0.02, 0.05)``).
        sksd_chains: default chains per datapoint for the SKSD objective (reference 30).
        differentiable_scores: differentiate the SKSD through the score (a Hessian-vector product of the log joint,
            model parameters frozen meanwhile); ``False`` detaches the scores like the reference code.

    Shapes: chains ``(num_chains, batch, latent_dim)``; ``step_sizes()`` ``(T, latent_dim)``; :meth:`inflation`
    ``(latent_dim,)``.

    Raises:
        ValueError: unknown ``inflation`` or bad sizes.
    """

    def __init__(
        self,
        model,
        num_steps: int = 5,
        num_leapfrog: int = 5,
        inflation: str = "scalar",
        num_chains: int = 1,
        use_pyro_log_joint: bool = False,
        divergence_threshold: float = 1000.0,
        seed: int = 0,
        step_size_range: tuple[float, float] = (0.02, 0.05),
        sksd_chains: int = 30,
        differentiable_scores: bool = True,
    ):
        super().__init__()
        if inflation not in INFLATIONS:
            raise ValueError(f"unknown inflation {inflation!r}; choose one of {INFLATIONS}")
        if num_chains < 1 or sksd_chains < 2 or num_leapfrog < 1:
            raise ValueError("need num_chains >= 1, sksd_chains >= 2 and num_leapfrog >= 1")
        object.__setattr__(self, "_model", model)  # not a submodule: its parameters are not ours
        sites = list(model.latent_sites())
        self.site_names = [name for name, _ in sites]
        self.site_sizes = [int(n) for _, n in sites]
        self.latent_dim = sum(self.site_sizes)
        self.num_leapfrog, self.num_chains, self.sksd_chains = int(num_leapfrog), int(num_chains), int(sksd_chains)
        self.inflation_kind = inflation
        self.use_pyro_log_joint = use_pyro_log_joint
        self.divergence_threshold = float(divergence_threshold)
        self.differentiable_scores = differentiable_scores
        self.step_sizes = StepSizes(num_steps, self.latent_dim, step_size_range, seed)
        n_infl = {"scalar": 1, "layer": len(sites), "dim": self.latent_dim}[inflation]
        self.log_inflation = nn.Parameter(torch.zeros(n_infl))
        layer = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(self.site_sizes)])
        self.register_buffer("_layer_of_dim", layer, persistent=False)
        self.last_trace: Optional[HMCTrace] = None

    @property
    def model(self):
        """The refinable model (not a registered submodule)."""
        return self._model

    @property
    def num_steps(self) -> int:
        return self.step_sizes.num_steps

    def inflation(self) -> torch.Tensor:
        """``(latent_dim,)`` positive inflation ``s`` (differentiable)."""
        s = self.log_inflation.exp()
        if self.inflation_kind == "layer":
            return s[self._layer_of_dim]
        return s.expand(self.latent_dim)

    def log_joint(self, latent: torch.Tensor, batch) -> torch.Tensor:
        """``(..., batch, latent_dim) -> (..., batch)`` target log density (fast path or :func:`pyro_log_joint`)."""
        if self.use_pyro_log_joint:
            return pyro_log_joint(self.model, latent, batch)
        return self.model.log_joint(latent, batch)

    def log_prob_fn(self, batch):
        """``latent (..., batch, latent_dim) -> (..., batch)``: the HMC target for ``batch``."""
        return lambda latent: self.log_joint(latent, batch)

    def initial(self, batch, num_chains: int, detach_proposal: bool = True,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``ε_0 = μ + s ⊙ σ ⊙ ξ``, ``(num_chains, batch, latent_dim)``; the proposal is detached from the encoder
        by default, the inflation keeps its graph."""
        loc, scale = self.model.proposal(batch)
        if detach_proposal:
            loc, scale = loc.detach(), scale.detach()
        xi = torch.randn((int(num_chains),) + tuple(loc.shape), generator=generator, dtype=loc.dtype,
                         device=loc.device)
        return loc + self.inflation() * scale * xi

    def refine(
        self,
        batch,
        num_chains: Optional[int] = None,
        detach_proposal: bool = True,
        detach_step_sizes: bool = False,
        keep_chain: bool = False,
        step_sizes: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> HMCTrace:
        """Draw ``ε_0`` from the inflated proposal and run ``T`` HMC transitions (no loop over chains/datapoints).

        Args:
            batch: the :class:`ppl_vae.models.base.Batch`.
            num_chains: chains per datapoint ``C`` (default ``self.num_chains``).
            detach_proposal: detach ``(μ, σ)`` from the encoder (default; the encoder learns from the ELBO only).
            detach_step_sizes: detach the step sizes (the SKSD objective's chains).
            keep_chain: keep the ``(T+1, C, batch, latent_dim)`` chain in the trace (diagnostics).
            step_sizes: ``(T', latent_dim)`` schedule to use instead of ``self.step_sizes()``.
            generator: ``torch.Generator`` (default: global RNG, seeded by ``pyro.set_rng_seed``).

        Returns:
            :class:`ppl_vae.infer.mcmc.HMCTrace`: ``position`` ``(C, batch, latent_dim)`` keeps its graph to the
            step sizes and the inflation (when grad is enabled); statistics ``(T, C, batch)``.
        """
        c = self.num_chains if num_chains is None else int(num_chains)
        eps0 = self.initial(batch, c, detach_proposal, generator)
        phi = self.step_sizes() if step_sizes is None else step_sizes
        if detach_step_sizes:
            phi = phi.detach()
        trace = run_hmc(self.log_prob_fn(batch), eps0, phi, self.num_leapfrog, None, generator,
                        self.divergence_threshold, keep_chain)
        self.last_trace = trace
        return trace

    def forward(self, batch) -> torch.Tensor:
        """Pyro guide: refine (one chain per datapoint) and emit ``pyro.sample(site, Delta(ε_T).to_event(1))`` for
        each latent site inside ``pyro.plate("data", batch.size, dim=-1)``. Under ``Trace_ELBO`` the loss is then
        ``-Σ_b log p(x_b, ε_T,b)``: the entropy of ``q^(T)`` is dropped (Campbell et al. 2021; HH-VAEM §3.5).

        Returns:
            ``(batch, latent_dim)`` refined latent.

        Raises:
            ValueError: ``num_chains != 1`` (the model's sites hold one value per datapoint; use
                :class:`HMCObjective` or :meth:`refine` for several chains).
        """
        if self.num_chains != 1:
            raise ValueError("as a Pyro guide HMCRefinedGuide draws one chain per datapoint; set num_chains=1 or use "
                             "HMCObjective / refine() for several chains")
        pyro.module("hmc_guide", self)
        trace = self.refine(batch, 1)
        latent = trace.position[0]
        with pyro.plate("data", batch.size, dim=-1):
            for name, value in _split_latent(self.model, latent):
                pyro.sample(name, dist.Delta(value).to_event(1))
        return latent

    def _model_parameters(self) -> list[torch.Tensor]:
        """The model's parameters except this guide's own (the guide may be a submodule of the model)."""
        if not isinstance(self.model, nn.Module):
            return []
        own = {id(p) for p in self.parameters()}
        return [p for p in self.model.parameters() if id(p) not in own]

    def sksd_from_chains(self, samples: torch.Tensor, scores: torch.Tensor, batch) -> torch.Tensor:
        """Mean over datapoints of the SKSD of ``samples`` ``(C, batch, latent_dim)`` (axis slices, U-statistic).

        ``scores`` are the detached ``∇log p*`` at the samples; with ``differentiable_scores`` they are recomputed
        with ``create_graph=True`` (model parameters frozen meanwhile, so the gradient reaches only what produced
        the samples). Datapoints with a non-finite score on any chain are left out of the mean.

        Returns:
            scalar tensor (0 with a graph if no datapoint is usable).
        """
        if self.differentiable_scores and samples.requires_grad and torch.is_grad_enabled():
            with _frozen(self._model_parameters()), torch.enable_grad():
                (scores,) = torch.autograd.grad(self.log_joint(samples, batch).sum(), samples, create_graph=True)
        ok = torch.isfinite(scores).all(-1).all(0)
        if not bool(ok.all()):
            samples, scores = samples[:, ok], scores[:, ok]
        if samples.shape[1] == 0:
            return samples.sum() * 0.0
        return _sksd(samples, scores).mean()

    def sksd_loss(self, batch, num_chains: Optional[int] = None) -> torch.Tensor:
        """Mean SKSD (Gong et al. 2021) of ``num_chains`` separate refined chains per datapoint (default
        ``sksd_chains``), with the step sizes and the proposal detached: its gradient reaches only the inflation
        ``s`` (HH-VAEM §3.5).

        Returns:
            scalar tensor.
        """
        c = self.sksd_chains if num_chains is None else int(num_chains)
        trace = self.refine(batch, c, detach_proposal=True, detach_step_sizes=True)
        return self.sksd_from_chains(trace.position, trace.grad, batch)


def _as_param_list(params) -> list[torch.Tensor]:
    if params is None:
        return []
    if callable(params) and not isinstance(params, torch.Tensor):
        params = params()
    out: list[torch.Tensor] = []
    for p in params:
        if isinstance(p, dict):
            out.extend(p["params"])
        else:
            out.append(p)
    return out


class HMCObjective(pyro.infer.ELBO):
    """The three objectives of HH-VAEM §3.5 (METHODS §5) in one Pyro loss (``loss`` / ``loss_and_grads``, the
    interface ``pyro.infer.SVI`` calls), for an :class:`HMCRefinedGuide` around a refinable model.

    Each parameter group receives the gradient of its own objective only (``torch.autograd.grad`` per group):

    1. encoder ψ (``encoder_parameters``): the ELBO with the Gaussian proposal,
       ``Trace_ELBO().differentiable_loss(model.model, model.guide, batch)``;
    2. decoder/predictor/prior θ (every other model parameter registered in Pyro's param store during the step,
       the guide's own excluded) and step sizes φ: ``L_HMC = -mean_{chains, datapoints} log p*(ε_T)`` over
       ``guide.num_chains`` chains per datapoint (Campbell et al. 2021; the entropy of ``q^(T)`` is dropped);
    3. inflation s: mean SKSD over ``sksd_chains`` separate chains per datapoint on the first ``sksd_rows`` rows
       of the (shuffled) batch, step sizes detached (Gong et al. 2021).

    Because ``pyro.optim.PyroOptim`` keeps one optimiser per parameter, the groups can have their own learning
    rates through per-name-prefix ``optim_args`` (the guide's parameters are ``hmc_guide$$$...``).

    Args:
        model: the refinable model (optional: default ``guide.model`` of the guide SVI passes).
        guide: its :class:`HMCRefinedGuide` (optional: SVI passes it).
        sksd_chains: chains per datapoint for (3) (default ``guide.sksd_chains``; 0 disables inflation tuning).
        encoder_parameters: the encoder's parameters (iterable, or a callable returning them); default
            ``model.encoder_parameters()``.
        elbo: the ELBO used for (1) (default ``pyro.infer.Trace_ELBO()``).
        sksd_rows: rows of the batch used by (3) (the inflation is one shared scale; 30 chains over the whole
            batch would cost 30 times (2)).

    Attributes:
        last_stats: floats of the latest step: ``elbo`` (per batch, as Pyro sums over datapoints),
            ``log_p_T`` (mean ``log p*(ε_T)`` per datapoint), ``sksd``, ``accept`` (mean acceptance probability),
            ``divergent`` (count over transitions and chains), ``inflation`` (mean s), ``step_size`` (mean φ).
    """

    def __init__(self, model=None, guide: Optional[HMCRefinedGuide] = None, sksd_chains: Optional[int] = None,
                 encoder_parameters=None, elbo=None, sksd_rows: int = 16):
        super().__init__(num_particles=1, max_plate_nesting=2)
        self.model, self.guide = model, guide
        self.sksd_chains = sksd_chains
        self.sksd_rows = int(sksd_rows)
        self._encoder_parameters = encoder_parameters
        self.elbo = elbo if elbo is not None else pyro.infer.Trace_ELBO()
        self.last_stats: dict[str, float] = {}

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - not a trace-based estimator
        raise NotImplementedError("HMCObjective does not sample traces; use loss / loss_and_grads")

    def _resolve(self, guide):
        guide = self.guide if self.guide is not None else guide
        if not isinstance(guide, HMCRefinedGuide):
            raise TypeError(f"HMCObjective needs an HMCRefinedGuide as guide, got {type(guide).__name__}")
        lvm = self.model if self.model is not None else guide.model
        return lvm, guide

    def loss(self, model, guide, batch) -> float:
        """Negative ELBO of the Gaussian proposal (no gradients)."""
        lvm, guide = self._resolve(guide)
        with torch.no_grad():
            return float(self.elbo.differentiable_loss(lvm.model, lvm.guide, batch))

    def loss_and_grads(self, model, guide, batch) -> float:
        """One step of the three objectives; fills ``.grad`` of every parameter from its own objective (adding to
        an existing ``.grad``) and returns the negative ELBO (float).

        Raises:
            TypeError: the guide is not an :class:`HMCRefinedGuide`.
        """
        lvm, guide = self._resolve(guide)
        enc_src = self._encoder_parameters if self._encoder_parameters is not None else \
            getattr(lvm, "encoder_parameters", None)
        enc_ids = {id(p) for p in _as_param_list(enc_src)}
        guide_ids = {id(p) for p in guide.parameters()}
        model_ids = {id(p) for p in lvm.parameters()} if isinstance(lvm, nn.Module) else set()

        # (1) ELBO -> encoder. Tracing the params also tells which model parameters this stage trains.
        with poutine.trace(param_only=True) as capture:
            elbo_loss = self.elbo.differentiable_loss(lvm.model, lvm.guide, batch)
            pyro.module("hmc_guide", guide)
        registered, seen = [], set()
        for site in capture.trace.nodes.values():
            p = site["value"].unconstrained()
            if id(p) not in seen:
                seen.add(id(p))
                registered.append(p)
        enc = [p for p in registered if id(p) in enc_ids and p.requires_grad]
        theta = [p for p in registered if id(p) in model_ids and id(p) not in enc_ids and id(p) not in guide_ids
                 and p.requires_grad]
        phi = [guide.step_sizes.log_step_size]

        grads: list = []
        if enc:
            grads += zip(enc, torch.autograd.grad(elbo_loss, enc, allow_unused=True))

        # (2) L_HMC: C chains per datapoint on the whole batch.
        c = guide.num_chains
        cs = guide.sksd_chains if self.sksd_chains is None else int(self.sksd_chains)
        trace = guide.refine(batch, c, detach_proposal=True)
        log_p = guide.log_joint(trace.position, batch)  # (C, B), graph to θ and φ
        finite = torch.isfinite(log_p)
        hmc_loss = -log_p[finite].mean() if bool(finite.any()) else log_p.sum() * 0.0
        grads += zip(theta + phi, torch.autograd.grad(hmc_loss, theta + phi, allow_unused=True))
        # (3) SKSD -> inflation, on C_sksd separate chains of the first `sksd_rows` rows (the batch is shuffled):
        # the inflation is one shared scale, and C_sksd chains over the whole batch would cost C_sksd x (2).
        disc = None
        if cs > 0:
            rows = batch if batch.size <= self.sksd_rows else batch[: self.sksd_rows]
            strace = guide.refine(rows, cs, detach_proposal=True, detach_step_sizes=True)
            disc = guide.sksd_from_chains(strace.position, strace.grad, rows)
            grads += zip([guide.log_inflation], torch.autograd.grad(disc, [guide.log_inflation], allow_unused=True))

        for p, g in grads:
            if g is None:
                continue
            p.grad = g.detach() if p.grad is None else p.grad + g.detach()

        loss = float(elbo_loss.detach())
        self.last_stats = {
            "elbo": -loss,
            "log_p_T": float(log_p.detach()[finite].mean()) if bool(finite.any()) else float("nan"),
            "sksd": float(disc.detach()) if disc is not None else float("nan"),
            "accept": float(trace.accept_prob.mean()),
            "divergent": float(trace.diverging.sum()),
            "inflation": float(guide.inflation().detach().mean()),
            "step_size": float(guide.step_sizes().detach().mean()),
        }
        return loss

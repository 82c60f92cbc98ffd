"""The per-datapoint log joint of any Pyro program, derived from its trace: the HMC target of a refined guide.

Given a model ``model(*args, **kwargs)`` whose local latents live in a data plate (``pyro.plate("data", N)``),
:class:`TracePotential` binds the program to one call's arguments and returns a :class:`BoundPotential`, a function

    z (num_chains, N, latent_dim)  ->  log p(observed, latents = T(z)) + log |det ∂T/∂z|   (num_chains, N)

of one *flat unconstrained* latent vector per chain and datapoint, the way Pyro's ``initialize_model`` /
NumPyro's ``potential_fn`` derive an HMC potential from any model (Neal 2011, "MCMC using Hamiltonian dynamics",
§5.4.1 on transformations to unconstrained space; Stan Reference Manual, "Constraint transforms"):

1. **Sites from a prototype trace.** The guide is run once and the model replayed against it; every model sample
   site that is not observed is a latent. A latent that is discrete, or that does not live in the data plate (a
   global latent: it would couple all datapoints' chains), raises :class:`PotentialError` naming the site.
2. **Conditioning from the flat vector.** Each latent takes ``size`` consecutive entries of ``z`` (in trace order),
   reshaped to the site's per-datapoint unconstrained shape and mapped through ``T = biject_to(support)``.
   A latent met during evaluation that was not conditioned is an error, never a fresh draw from its prior.
3. **Chains without plate collisions.** The program runs inside an outer ``pyro.plate`` of size ``num_chains`` at
   a dimension left of every plate of the model (and of any plate enclosing the call, e.g. ``Predictive``'s), so
   the data plate keeps the datapoints apart and nothing is summed across chains or datapoints.
4. **Log density.** Every sample site contributes ``fn.log_prob(value)`` with its mask; Pyro *scales* (plate
   subsampling, KL annealing with ``poutine.scale``) are training devices, not part of the density, and are not
   applied. Terms of a site are summed over every dimension except the chain and data dimensions; a site outside
   the data plate (an observed global term) is shared equally among the ``N`` datapoints. Argument validation of
   distributions is switched off meanwhile: a non-finite leapfrog position gives a non-finite density (which the
   HMC kernel counts as a divergence), never an exception.

A model may also supply a hand-written log joint (``fast_log_joint``) for speed; :class:`TracePotential` checks it
against the trace-derived one on first use, in float64, and raises :class:`PotentialError` on disagreement.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import get_plates
from pyro.poutine.util import site_is_subsample
from torch import nn

from ppl_vae.errors import PplVaeError

__all__ = ["PotentialError", "LatentSite", "TracePotential", "BoundPotential", "FAST_PATH_RTOL"]

#: relative tolerance of the float64 check of a hand-written log joint against the trace-derived one
FAST_PATH_RTOL = 1e-5


class PotentialError(PplVaeError):
    """A model/guide pair whose HMC potential cannot be derived; the message names the site at fault."""


@dataclass(frozen=True)
class LatentSite:
    """One continuous latent site of the model, as laid out in the flat latent vector.

    Attributes:
        name: the Pyro site name.
        shape: the site's value shape in the prototype trace, ``batch_shape + event_shape`` (``N`` at ``data_pos``).
        event_dim: number of event dimensions of the site's distribution.
        data_pos: index of the data-plate dimension in ``shape``.
        data_dim: the data plate's (negative) plate dimension.
        unconstrained_shape: per-datapoint shape of the unconstrained value (``shape`` without the data dimension,
            event dims mapped by the bijection).
        size: ``prod(unconstrained_shape)``, the site's width in the flat latent vector.
        offset: first index of the site in the flat latent vector.
        transform: ``biject_to(support)``, unconstrained -> constrained.
    """

    name: str
    shape: tuple
    event_dim: int
    data_pos: int
    data_dim: int
    unconstrained_shape: tuple
    size: int
    offset: int
    transform: Any

    @property
    def per_datapoint_shape(self) -> tuple:
        """The constrained per-datapoint shape (``shape`` without the data dimension)."""
        return self.shape[:self.data_pos] + self.shape[self.data_pos + 1:]


class _LogJointMessenger(Messenger):
    """Conditions the latent sites on given values and accumulates per-(chain, datapoint) log densities.

    A lighter equivalent of ``poutine.trace(poutine.condition(model, data))`` + ``Trace.compute_log_prob`` (no trace
    graph is built; the same ``fn.log_prob(value)`` and mask are used), which keeps the trace-derived potential
    within a small factor of a hand-written one.
    """

    def __init__(self, values: dict, data_plate: str, chain_dim: int, batch_size: int, total: torch.Tensor):
        super().__init__()
        self.values, self.data_plate, self.chain_dim = values, data_plate, chain_dim
        self.batch_size = batch_size
        self.total = total  # (C, N)
        self.seen: set = set()

    def _pyro_param(self, msg) -> None:
        # ``pyro.module`` registering a module weight: the weight itself is the value (the param store holds the
        # same tensor), so the store lookup is skipped. Plain ``pyro.param`` s go through the store as usual.
        args = msg["args"]
        if len(args) > 1 and isinstance(args[1], nn.Parameter):
            msg["value"] = args[1]
            msg["done"] = True

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if name in self.values:
            msg["value"] = self.values[name]
            msg["is_observed"] = True
            msg["done"] = True
            self.seen.add(name)
        elif not msg["is_observed"] and not site_is_subsample(msg) and not msg["infer"].get("_do_not_score"):
            raise PotentialError(
                f"latent site {name!r} is not conditioned by the potential: it did not appear as a latent in the "
                "prototype trace (a data-dependent program structure?). Every latent must be a site of the guide.")

    def _pyro_post_sample(self, msg) -> None:
        if site_is_subsample(msg) or msg["infer"].get("_do_not_score"):
            return
        lp = msg["fn"].log_prob(msg["value"])
        mask = msg["mask"]
        if mask is not None and mask is not True:
            lp = torch.where(torch.as_tensor(mask, device=lp.device), lp, lp.new_zeros(()))
        self.total = self.total + self._reduce(lp, msg)

    def _reduce(self, lp: torch.Tensor, msg) -> torch.Tensor:
        """``lp`` over the site's batch dims -> ``(C, N)``: sum every dim but the chain and data dims."""
        C, N = self.total.shape
        data_frames = [f for f in msg["cond_indep_stack"] if f.name == self.data_plate]
        nd = -self.chain_dim
        lp = lp.reshape((1,) * max(0, nd - lp.dim()) + tuple(lp.shape))
        lp = lp.expand(lp.shape[:lp.dim() - nd] + tuple(lp.shape[lp.dim() - nd:]))
        chain_axis = lp.dim() - nd
        if chain_axis > 0:  # extra leading dims (should not happen): sum them
            lp = lp.sum(tuple(range(chain_axis)))
            chain_axis = 0
        if data_frames:
            data_axis = lp.dim() + data_frames[0].dim
            lp = lp.movedim((chain_axis, data_axis), (0, 1))
            lp = lp.reshape(lp.shape[0], lp.shape[1], -1).sum(-1)
            return lp.expand(C, N)
        lp = lp.reshape(lp.shape[0], -1).sum(-1, keepdim=True)  # a global term, shared by the N datapoints
        return (lp / N).expand(C, N)


def _site_dist_name(fn) -> str:
    return type(fn).__name__


def _gaussian_loc_scale(name: str, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)`` of a guide site with a diagonal Gaussian in unconstrained space, value-shaped.

    Raises:
        PotentialError: any other distribution (naming the site and the distribution).
    """
    shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
    base = fn
    while isinstance(base, (dist.Independent, torch.distributions.Independent)):
        base = base.base_dist
    if isinstance(base, (dist.TransformedDistribution, torch.distributions.TransformedDistribution)):
        inner = base.base_dist
        while isinstance(inner, (dist.Independent, torch.distributions.Independent)):
            inner = inner.base_dist
        base = inner
        shape = tuple(base.batch_shape) + tuple(base.event_shape)
    if isinstance(base, (dist.Normal, torch.distributions.Normal)):
        return base.loc.expand(shape), base.scale.expand(shape)
    if isinstance(base, (dist.MultivariateNormal, torch.distributions.MultivariateNormal)):
        tril = base.scale_tril
        diag = torch.diagonal(tril, dim1=-2, dim2=-1)
        if not torch.equal(tril, torch.diag_embed(diag)):
            raise PotentialError(f"guide site {name!r} is a MultivariateNormal with correlations; the HMC-refined "
                                 "guide needs a diagonal Gaussian proposal (Normal, Independent Normal, AutoNormal, "
                                 "AutoDiagonalNormal or a diagonal MultivariateNormal)")
        return base.loc.expand(shape), diag.expand(shape)
    raise PotentialError(f"guide site {name!r} has a {_site_dist_name(fn)} distribution; the HMC-refined guide needs "
                         "a diagonal Gaussian proposal (Normal, Independent Normal, AutoNormal, AutoDiagonalNormal "
                         "or a diagonal MultivariateNormal)")


class BoundPotential:
    """The potential of one call ``model(*args, **kwargs)``: a log density of flat unconstrained latents.

    Attributes:
        sites: the :class:`LatentSite` s in flat-vector order.
        batch_size: ``N``, the size of the data plate.
        latent_dim: width of the flat latent vector.
        data_plate: the data plate's name; ``data_dim`` its plate dimension.
    """

    def __init__(self, owner: "TracePotential", model: Callable, args: tuple, kwargs: dict, sites: list[LatentSite],
                 batch_size: int, max_plate_nesting: int, guide_trace=None):
        self.owner, self.model, self.args, self.kwargs = owner, model, args, kwargs
        #: the verified hand-written log joint, when the bound model is the one it was written for
        self.fast_log_joint = owner.fast_log_joint if model == owner.model else None
        self.sites, self.batch_size = sites, batch_size
        self.latent_dim = sum(s.size for s in sites)
        self.data_plate = owner.data_plate
        self.data_dim = sites[0].data_dim if sites else -1
        self.max_plate_nesting = max_plate_nesting
        self.guide_trace = guide_trace

    # ------------------------------------------------------------------ flat <-> site values
    def unpack(self, z: torch.Tensor, chain_dim: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Constrained site values from flat latents.

        Args:
            z: ``(C, N, latent_dim)`` or ``(N, latent_dim)`` unconstrained latents.
            chain_dim: plate dimension to put the chains at (default: left of every model plate); ignored for 2-D
                ``z``.

        Returns:
            ``{site: value}`` with value shape ``(C, 1, ..., *site.shape)`` (chains at ``chain_dim``) or
            ``site.shape`` for 2-D ``z``.
        """
        squeeze = z.dim() == 2
        if squeeze:
            z = z.unsqueeze(0)
        C, N = z.shape[:2]
        nest = self.max_plate_nesting if chain_dim is None else -chain_dim - 1
        out = {}
        for s in self.sites:
            u = z[..., s.offset:s.offset + s.size].reshape((C, N) + s.unconstrained_shape)
            v = s.transform(u)                                         # (C, N, *per_datapoint_shape)
            v = v.movedim(1, 1 + s.data_pos)                           # (C, *shape)
            if squeeze:
                out[s.name] = v[0]
                continue
            batch_rank = len(s.shape) - s.event_dim
            pad = nest - batch_rank
            if pad < 0:
                raise PotentialError(f"site {s.name!r} has more batch dims than the chain dimension allows")
            out[s.name] = v.reshape((C,) + (1,) * pad + tuple(v.shape[1:]))
        return out

    def log_abs_det_jacobian(self, z: torch.Tensor) -> torch.Tensor:
        """``(C, N)`` log |det ∂T/∂z| of the bijections of the constrained sites (0 for real sites)."""
        C, N = z.shape[:2]
        total = z.new_zeros(C, N)
        for s in self.sites:
            if not _is_identity(s.transform):
                u = z[..., s.offset:s.offset + s.size].reshape((C, N) + s.unconstrained_shape)
                ladj = s.transform.log_abs_det_jacobian(u, s.transform(u))
                total = total + ladj.reshape(C, N, -1).sum(-1)
        return total

    # ------------------------------------------------------------------ the density
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """``(C, N, latent_dim) -> (C, N)`` (or ``(N, latent_dim) -> (N,)``) unnormalised log posterior in
        unconstrained coordinates, differentiable w.r.t. ``z`` and the model's parameters.

        Raises:
            ValueError: ``z`` is not ``(C, N, latent_dim)``/``(N, latent_dim)`` for this call.
        """
        squeeze = z.dim() == 2
        if squeeze:
            z = z.unsqueeze(0)
        if z.dim() != 3 or z.shape[1:] != (self.batch_size, self.latent_dim):
            raise ValueError(f"latent must be (num_chains, {self.batch_size}, {self.latent_dim}) or "
                             f"({self.batch_size}, {self.latent_dim}), got shape {tuple(z.shape)}")
        if self.fast_log_joint is not None:
            self.owner._check_fast_path(self)
            out = self.fast_log_joint(z, *self.args, **self.kwargs)
        else:
            out = self.trace_log_prob(z)
        out = out + self.log_abs_det_jacobian(z)
        return out[0] if squeeze else out

    def value_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z (C, N, latent_dim) -> (log p (C, N), ∇_z log p (C, N, latent_dim))``, both detached: the gradient the
        leapfrog integrator needs (model parameters receive nothing). With ``TracePotential(compile=True)`` this
        runs a cached graph of the program (see :class:`TracePotential`); otherwise autograd on :meth:`__call__`.
        """
        if self.owner.compile and self.fast_log_joint is None:
            out = self.owner._compiled_value_and_grad(self, z)
            if out is not None:
                return out
        with torch.enable_grad():
            x = z.detach().requires_grad_(True)
            lp = self(x)
            (g,) = torch.autograd.grad(lp.sum(), x)
        return lp.detach(), g

    def trace_log_prob(self, z: torch.Tensor, model: Optional[Callable] = None) -> torch.Tensor:
        """``(C, N, latent_dim) -> (C, N)`` log joint of the constrained values (no Jacobian), from the trace.

        Args:
            z: flat unconstrained latents.
            model: the program to evaluate (default: the bound one; the float64 check passes a copy).
        """
        return self._trace_log_prob(z, self.model if model is None else model, self.args, self.kwargs)

    def _trace_log_prob(self, z, model, args, kwargs) -> torch.Tensor:
        C, N = z.shape[:2]
        chain_dim = -(self.max_plate_nesting + 1)
        values = self.unpack(z, chain_dim)
        handler = _LogJointMessenger(values, self.data_plate, chain_dim, N, z.new_zeros(C, N))
        with pyro.validation_enabled(False), poutine.block(), handler:
            with pyro.plate("_hmc_chains", C, dim=chain_dim):
                model(*args, **kwargs)
        missing = set(values) - handler.seen
        if missing:
            raise PotentialError(f"latent site(s) {sorted(missing)} of the prototype trace did not appear when the "
                                 "model was run again (a data-dependent program structure?)")
        return handler.total

    # ------------------------------------------------------------------ the guide's Gaussian
    def proposal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The guide's diagonal Gaussian over the flat unconstrained latent: ``(loc, scale)`` each ``(N, latent_dim)``.

        Read from the guide trace of :meth:`TracePotential.bind` (an amortised encoder, ``AutoNormal``; an
        ``AutoDiagonalNormal``'s posterior is unpacked per site).

        Raises:
            PotentialError: the guide has no Gaussian for a latent site, or its shape differs from the model's.
        """
        locs, scales = [], []
        for s in self.sites:
            loc, scale = self.owner._site_loc_scale(self, s)
            loc = loc.movedim(s.data_pos, 0).reshape(self.batch_size, -1)
            scale = scale.movedim(s.data_pos, 0).reshape(self.batch_size, -1)
            if loc.shape[-1] != s.size:
                raise PotentialError(f"guide site {s.name!r} has {loc.shape[-1]} unconstrained values per datapoint "
                                     f"but the model's site needs {s.size}")
            locs.append(loc)
            scales.append(scale)
        return torch.cat(locs, -1), torch.cat(scales, -1)


def _unwrapped_support(support):
    """The constraint to biject to: a mixture's support is its components' (``MixtureSameFamilyConstraint`` has no
    registered bijection; e.g. a VampPrior, Tomczak & Welling 2018, or a Gaussian-mixture prior)."""
    while hasattr(support, "base_constraint") and type(support).__name__ == "MixtureSameFamilyConstraint":
        support = support.base_constraint
    return support


def _is_identity(t) -> bool:
    """Whether ``t`` is the identity (``biject_to(real)``, possibly wrapped in ``IndependentTransform``)."""
    T = torch.distributions.transforms
    if isinstance(t, T.IndependentTransform):
        return _is_identity(t.base_transform)
    return isinstance(t, T.ComposeTransform) and not t.parts


def _as_float64(obj, memo: dict):
    """A float64 copy of an argument: tensors, dataclasses and containers of them (other objects unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _as_float64(getattr(obj, f.name), memo) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes) if not hasattr(obj, "cache") else \
            type(obj)(**{k: v for k, v in changes.items() if k != "cache"})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_float64(v, memo) for v in obj)
    if isinstance(obj, dict):
        return {k: _as_float64(v, memo) for k, v in obj.items()}
    return obj


def _float64_callable(fn: Callable, memo: dict) -> Callable:
    """``fn`` rebound to a float64 deep copy of its ``nn.Module`` owner (shared through ``memo``)."""
    owner = getattr(fn, "__self__", None)
    if inspect.ismethod(fn) and isinstance(owner, nn.Module):
        key = id(owner)
        if key not in memo:
            memo[key] = copy.deepcopy(owner).double()
        return getattr(memo[key], fn.__name__)
    if isinstance(fn, nn.Module):
        key = id(fn)
        if key not in memo:
            memo[key] = copy.deepcopy(fn).double()
        return memo[key]
    return fn


class TracePotential:
    """Derive the per-datapoint HMC potential of a Pyro model from its trace (see the module docstring).

    Args:
        model: a Pyro model ``model(*args, **kwargs)``; local latents inside ``pyro.plate(data_plate, N)``.
        guide: a Pyro guide with a diagonal Gaussian for every latent (used for the prototype trace and the
            proposal); ``None`` runs the model alone (latents drawn from the prior) for the prototype.
        data_plate: name of the plate whose dimension indexes datapoints (default ``"data"``).
        fast_log_joint: optional hand-written ``(z (C, N, latent_dim), *args, **kwargs) -> (C, N)`` log joint of
            the constrained values (no Jacobian) that must equal the trace; checked on first use in float64
            (relative error ≤ :data:`FAST_PATH_RTOL`), :class:`PotentialError` on disagreement.
        compile: run the leapfrog's value-and-gradient through a graph of the program recorded once per input
            signature (``torch.fx``), verified against the eager trace; see :meth:`_compiled_value_and_grad`. The
            recording costs about a second per new signature (batch size, number of chains), then each call costs
            about what a hand-written log joint costs.
        verify_every: with ``compile``, compare the graph with the eager trace every this many calls (0: only on
            recording).

    Raises:
        PotentialError: from :meth:`bind`: no data plate, a discrete latent, a global latent, a guide site that is
            not a diagonal Gaussian; from the fast-path check: disagreement.
    """

    def __init__(self, model: Callable, guide: Optional[Callable] = None, data_plate: str = "data",
                 fast_log_joint: Optional[Callable] = None, compile: bool = False, verify_every: int = 200):
        self.model, self.guide, self.data_plate = model, guide, data_plate
        self.fast_log_joint = fast_log_joint
        self.compile, self.verify_every = bool(compile), int(verify_every)
        self._checked = False
        self.check_report: Optional[dict] = None
        self._graphs: dict = {}
        self._calls = 0

    # ------------------------------------------------------------------ cached graphs (compile=True)
    def clear_cache(self) -> None:
        """Drop the cached graphs (needed after replacing parameter tensors, e.g. moving the model to a device)."""
        self._graphs.clear()

    def _compiled_value_and_grad(self, bound: BoundPotential, z: torch.Tensor):
        """The leapfrog's value and gradient from a graph of the program recorded once per input signature with
        ``torch.fx`` (``make_fx``): the Pyro effect handlers, distribution objects and plates are replayed as plain
        tensor operations. Inputs of the graph are ``z`` and every tensor of the program's arguments, so a new batch
        of the same shapes reuses it; module weights are captured by reference (in-place optimiser updates are
        seen). Each new graph, and every ``verify_every``-th call, is compared with the eager trace (relative error
        ≤ :data:`FAST_PATH_RTOL`); a mismatch (e.g. Python control flow on data values, which a graph freezes)
        raises :class:`PotentialError`. Returns ``None`` when the arguments cannot be flattened (eager fallback)."""
        flat = _flatten((bound.args, bound.kwargs))
        if flat is None:
            return None
        tensors, rebuild, spec = flat
        key = (tuple(z.shape), z.dtype, str(z.device), spec,
               tuple((tuple(a.shape), a.dtype, str(a.device)) for a in tensors), id(bound.model))
        graph = self._graphs.get(key)
        model = bound.model
        fresh = graph is None
        if fresh:
            from torch.fx.experimental.proxy_tensor import make_fx

            def value_and_grad(zz, *arg_tensors):
                args, kwargs = rebuild(list(arg_tensors))

                def summed(w):
                    lp = bound._trace_log_prob(w, model, args, kwargs) + bound.log_abs_det_jacobian(w)
                    return lp.sum(), lp

                g, (_, lp) = torch.func.grad_and_value(summed, has_aux=True)(zz)
                return lp, g

            try:
                with torch.no_grad():
                    graph = make_fx(value_and_grad)(z.detach(), *tensors)
            except RuntimeError as err:  # the program reads data values in Python (e.g. float(x.sum())): no graph
                warnings.warn(f"compile=True: the model cannot be recorded as a graph ({str(err)[:120]}...); "
                              "using the eager trace", RuntimeWarning)
                self.compile = False
                return None
            self._graphs[key] = graph
        self._calls += 1
        with torch.no_grad():
            lp, g = graph(z.detach(), *tensors)
        if fresh or (self.verify_every > 0 and self._calls % self.verify_every == 0):
            with torch.enable_grad():
                x = z.detach().requires_grad_(True)
                ref = bound._trace_log_prob(x, model, bound.args, bound.kwargs) + bound.log_abs_det_jacobian(x)
                (gref,) = torch.autograd.grad(ref.sum(), x)
            err = float(((lp - ref.detach()).abs() / ref.detach().abs().clamp_min(1.0)).max())
            gerr = float(((g - gref).abs() / gref.abs().clamp_min(1.0)).max())
            if not (err <= FAST_PATH_RTOL * 10 and gerr <= 1e-3):
                self._graphs.pop(key, None)
                raise PotentialError(
                    f"the recorded graph of the model disagrees with its trace (relative error {err:.3g}, gradient "
                    f"{gerr:.3g}): the program branches on data values; use compile=False")
        return lp, g

    # ------------------------------------------------------------------ prototype
    def bind(self, *args, guide: Optional[Callable] = None, model: Optional[Callable] = None, **kwargs
             ) -> BoundPotential:
        """Run the guide once and the model against it; return the potential of this call.

        Args:
            *args, **kwargs: the program's arguments (a :class:`~ppl_vae.models.base.Batch`, raw tensors, ...).
            guide: overrides the guide given at construction for this call.
            model: overrides the model (e.g. the model ``pyro.infer.SVI`` passes).

        Raises:
            PotentialError: see the class docstring.
        """
        model = self.model if model is None else model
        guide = self.guide if guide is None else guide
        with poutine.block(), pyro.validation_enabled(False):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs) if guide is not None else None
            runner = poutine.replay(model, trace=guide_trace) if guide_trace is not None else model
            model_trace = poutine.trace(runner).get_trace(*args, **kwargs)
        nesting = 0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                for f in site["cond_indep_stack"]:
                    if f.vectorized and f.dim is not None:
                        nesting = max(nesting, -f.dim)
        outer = max([-f.dim for f in get_plates() if f.vectorized and f.dim is not None] or [0])
        nesting = max(nesting, outer)
        sites, offset, batch_size = [], 0, None
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            fn = site["fn"]
            if getattr(fn.support, "is_discrete", False) or site["infer"].get("enumerate"):
                raise PotentialError(
                    f"latent site {name!r} is discrete ({type(fn).__name__}); HMC refinement needs continuous "
                    "latents: marginalise it out in the model (e.g. a mixture likelihood) or observe it")
            frames = [f for f in site["cond_indep_stack"] if f.name == self.data_plate]
            if not frames:
                raise PotentialError(
                    f"latent site {name!r} is outside the {self.data_plate!r} plate: a global latent cannot be "
                    "refined per datapoint. Make it a parameter (pyro.param / a module weight, learned by SVI) or "
                    "move it into the data plate")
            frame = frames[0]
            value = site["value"]
            batch_rank = value.dim() - fn.event_dim
            data_pos = batch_rank + frame.dim
            if data_pos < 0 or value.shape[data_pos] != frame.size:
                raise PotentialError(f"latent site {name!r} has shape {tuple(value.shape)} but the {self.data_plate!r} "
                                     f"plate (size {frame.size}, dim {frame.dim}) is not among its batch dims")
            if batch_size is None:
                batch_size = frame.size
            transform = biject_to(_unwrapped_support(fn.support))
            per_dp = value.movedim(data_pos, 0)
            u = transform.inv(per_dp)
            ushape = tuple(u.shape[1:])
            size = int(math.prod(ushape))
            sites.append(LatentSite(name, tuple(value.shape), fn.event_dim, data_pos, frame.dim, ushape, size, offset,
                                    transform))
            offset += size
        if not sites:
            raise PotentialError(f"the model has no latent site inside a {self.data_plate!r} plate to refine")
        bound = BoundPotential(self, model, args, kwargs, sites, batch_size, nesting, guide_trace)
        return bound

    def _site_loc_scale(self, bound: BoundPotential, s: LatentSite) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of the guide's Gaussian for site ``s``, in the site's unconstrained value layout."""
        gt = bound.guide_trace
        if gt is None:
            raise PotentialError("no guide was given: the proposal needs a guide")
        guide = self.guide
        from pyro.infer.autoguide import AutoContinuous, AutoNormal

        if isinstance(guide, AutoNormal):
            loc, scale = guide._get_loc_and_scale(s.name)
            return loc, scale
        if isinstance(guide, AutoContinuous):
            posterior = guide.get_posterior()
            loc_flat, scale_flat = _gaussian_loc_scale("<AutoContinuous latent>", posterior)
            locs = {site["name"]: v for site, v in guide._unpack_latent(loc_flat)}
            scales = {site["name"]: v for site, v in guide._unpack_latent(scale_flat)}
            if s.name not in locs:
                raise PotentialError(f"the guide has no site {s.name!r}")
            loc, scale = locs[s.name], scales[s.name]
            shape = s.shape[:s.data_pos] + (bound.batch_size,) + s.shape[s.data_pos + 1:]
            if s.event_dim == 0 or tuple(loc.shape) == s.shape:
                return loc.reshape(s.shape), scale.reshape(s.shape)
            return loc.reshape(shape), scale.reshape(shape)
        if s.name not in gt.nodes:
            raise PotentialError(f"latent site {s.name!r} of the model has no site in the guide; the HMC-refined guide "
                                 "starts its chains from the guide's Gaussian for every latent")
        fn = gt.nodes[s.name]["fn"]
        aux = s.name + "_unconstrained"  # the auxiliary Normal site of a constrained latent (AutoNormal's layout)
        if isinstance(fn, dist.Delta) and aux in gt.nodes:
            fn = gt.nodes[aux]["fn"]
        return _gaussian_loc_scale(s.name, fn)

    # ------------------------------------------------------------------ fast path check
    def _check_fast_path(self, bound: BoundPotential, num_points: int = 3) -> None:
        """Compare ``fast_log_joint`` with the trace-derived log joint once, in float64 (see the class docstring)."""
        if self._checked:
            return
        memo: dict = {}
        model64 = _float64_callable(bound.model, memo)
        fast64 = _float64_callable(self.fast_log_joint, memo)
        args64 = _as_float64(bound.args, memo)
        kwargs64 = _as_float64(bound.kwargs, memo)
        gen = torch.Generator().manual_seed(0)
        z = torch.randn((num_points, bound.batch_size, bound.latent_dim), generator=gen, dtype=torch.float64)
        ref_device = next((a.device for a in _tensors(args64)), torch.device("cpu"))
        z = z.to(ref_device)
        with torch.no_grad():
            ref = bound._trace_log_prob(z, model64, args64, kwargs64)
            got = fast64(z, *args64, **kwargs64)
        err = float(((got - ref).abs() / ref.abs().clamp_min(1.0)).max())
        self.check_report = {"max_relative_error": err, "points": num_points, "batch_size": bound.batch_size}
        if not err <= FAST_PATH_RTOL:
            raise PotentialError(
                f"the hand-written log joint disagrees with the model's Pyro program (max relative error {err:.3g} "
                f"> {FAST_PATH_RTOL:g} in float64 on {num_points}x{bound.batch_size} points): fix it or drop it")
        self._checked = True


def _flatten(obj):
    """``(tensors, rebuild, spec)`` of a nest of tensors, dataclasses, lists, tuples and dicts; other leaves must be
    hashable (they are part of ``spec``, the cache key). ``rebuild(tensors)`` gives the nest back with new tensors
    (a dataclass is rebuilt from its init fields: per-object caches are not carried over). ``None`` if a leaf is
    not hashable."""
    tensors: list = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            tensors.append(o)
            return ("T",)
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            names = [f.name for f in dataclasses.fields(o) if f.init and f.compare]
            return ("D", type(o), tuple((n, walk(getattr(o, n))) for n in names))
        if isinstance(o, (list, tuple)):
            return ("L" if isinstance(o, list) else "U", tuple(walk(v) for v in o))
        if isinstance(o, dict):
            return ("M", tuple((k, walk(v)) for k, v in o.items()))
        hash(o)
        return ("V", o)

    try:
        spec = walk(obj)
    except TypeError:
        return None

    def rebuild(ts: list):
        it = iter(ts)

        def build(s):
            kind = s[0]
            if kind == "T":
                return next(it)
            if kind == "D":
                return s[1](**{n: build(v) for n, v in s[2]})
            if kind in ("L", "U"):
                vals = [build(v) for v in s[1]]
                return vals if kind == "L" else tuple(vals)
            if kind == "M":
                return {k: build(v) for k, v in s[1]}
            return s[1]

        return build(spec)

    return tensors, rebuild, spec


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)

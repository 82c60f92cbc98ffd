"""Per-datapoint importance-weighted log-likelihood of any Pyro model/guide pair, derived from their traces.

For a model ``p(x, z)`` and a guide ``q(z | x)`` (both Pyro programs taking the same batch, every latent inside
``pyro.plate("data", B)``), :func:`iw_log_likelihood` estimates for every datapoint ``i``

    log p(x_i) ≈ log (1/K) Σ_k w_ik,     w_ik = p(x_i, z_ik) / q(z_ik | x_i),     z_ik ~ q(· | x_i)

(Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders", ICLR, eq. 8). The bound is a lower bound
of ``log p(x_i)`` in expectation and tightens with ``K``; ``K = 1`` gives a single-sample ELBO.

How the weights come from the traces (nothing is written per model):

- the K particles are a vectorised ``pyro.plate`` left of every plate of the program (``dim = -(N + 1)`` with ``N``
  the program's plate nesting, found from a prototype trace), so one guide run and one replayed model run give all
  ``(K, B)`` weights;
- sites enumerated during training (``infer={"enumerate": "parallel"}``, e.g. a mixture component summed out by
  ``TraceEnum_ELBO``) are *sampled* here: a guide site of that name is then part of the proposal, and a model latent
  with no guide site is drawn from its prior, which is then its own proposal (its log-density cancels and is left
  out of the weight: ``E_{q(z) p(c)}[p(x | z, c) p(z | c) / q(z)] = p(x)``);
- ``poutine.scale`` factors (KL annealing, β) are training devices, not part of the density, and are ignored;
  ``poutine.mask`` / masked distributions are kept (a missing cell adds 0);
- the guide's observed sites (``pyro.factor`` terms of an auxiliary objective) are not part of the proposal density
  and are left out; the model's ``pyro.factor`` sites are part of the joint and kept.

Raises :class:`LikelihoodError` for a latent or observed site outside the data plate (a global latent has no
per-datapoint weight) naming the site.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ppl_vae.errors import PplVaeError

__all__ = ["LikelihoodError", "iw_log_likelihood", "log_importance_weights", "plate_nesting", "no_enumeration",
           "sample_sites"]


class LikelihoodError(PplVaeError, ValueError):
    """The program cannot give per-datapoint importance weights (a site outside the data plate), naming the site."""


def no_enumeration(fn: Callable) -> Callable:
    """``fn`` with every site's ``enumerate`` flag removed (enumerated sites are sampled)."""
    return poutine.infer_config(fn, lambda msg: {"enumerate": None} if msg["type"] == "sample" else {})


def sample_sites(trace) -> list:
    """The sample sites of a trace, without plate subsample sites."""
    return [s for s in trace.nodes.values()
            if s["type"] == "sample" and not site_is_subsample(s) and not s["infer"].get("_do_not_score")]


def _plate_dims(site, data_plate: str) -> tuple[Optional[int], list[int]]:
    """``(data dim, other plate dims)`` of a site's vectorised plates (negative dims)."""
    data_dim, others = None, []
    for frame in site["cond_indep_stack"]:
        if frame.vectorized and frame.dim is not None:
            if frame.name == data_plate:
                data_dim = frame.dim
            else:
                others.append(frame.dim)
    return data_dim, others


def _site_log_prob(site) -> torch.Tensor:
    lp = site["fn"].log_prob(site["value"])
    if site["mask"] is not None and not isinstance(site["mask"], bool):
        lp = torch.where(site["mask"], lp, torch.zeros_like(lp))
    elif site["mask"] is False:
        lp = torch.zeros_like(lp)
    return lp


def _per_datapoint(lp: torch.Tensor, nesting: int, data_dim: int) -> torch.Tensor:
    """Sum a site's log-density over every batch dim but the particle dim (leftmost) and the data dim:
    ``(..., broadcastable to (K, ..., B, ...)) -> (K or 1, B or 1)``."""
    width = nesting + 1
    if lp.dim() > width:
        raise LikelihoodError(f"a site's log-density has {lp.dim()} batch dims, more than the {width} the plates "
                              "declare (declare event dims with .to_event)")
    lp = lp.reshape((1,) * (width - lp.dim()) + tuple(lp.shape))
    keep = {0, width + data_dim}
    summed = [d for d in range(width) if d not in keep]
    if summed:
        lp = lp.sum(dim=summed, keepdim=True)
    return lp.reshape(lp.shape[0], lp.shape[width + data_dim])


def plate_nesting(trace) -> int:
    """How many vectorised plate dims the trace's sites use (``max -frame.dim``; 0 without plates)."""
    dims = [-f.dim for s in sample_sites(trace) for f in s["cond_indep_stack"] if f.vectorized and f.dim is not None]
    return max(dims, default=0)


@torch.no_grad()
def log_importance_weights(model: Callable, guide: Callable, batch, num_particles: int = 100,
                           data_plate: str = "data") -> torch.Tensor:
    """Log importance weights ``log p(x_i, z_ik) - log q(z_ik | x_i)`` of ``num_particles`` guide draws per row.

    Args:
        model, guide: Pyro programs called as ``model(batch)`` / ``guide(batch)``.
        batch: their argument (e.g. a :class:`ppl_vae.models.base.Batch` with ``B`` rows).
        num_particles: K.
        data_plate: name of the plate over datapoints.

    Returns:
        ``(K, B)`` float tensor on the batch's device.

    Raises:
        LikelihoodError: a latent or observed site outside ``data_plate`` (named), or no site inside it.
        ValueError: ``num_particles < 1``.
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    model, guide = no_enumeration(model), no_enumeration(guide)
    return _log_weights(model, guide, batch, num_particles, data_plate, _checked_nesting(model, guide, batch,
                                                                                         data_plate))


def _checked_nesting(model: Callable, guide: Callable, batch, data_plate: str) -> int:
    """The plate nesting of a prototype guide + replayed model run; raises LikelihoodError for a site outside
    ``data_plate``."""
    proto_guide = poutine.trace(guide).get_trace(batch)
    proto_model = poutine.trace(poutine.replay(model, trace=proto_guide)).get_trace(batch)
    for tr in (proto_guide, proto_model):
        for site in sample_sites(tr):
            if _plate_dims(site, data_plate)[0] is None:
                kind = "observed" if site["is_observed"] else "latent"
                raise LikelihoodError(f"{kind} site {site['name']!r} lies outside plate {data_plate!r}: a global "
                                      "site has no per-datapoint importance weight")
    return max(plate_nesting(proto_guide), plate_nesting(proto_model))


def _log_weights(model: Callable, guide: Callable, batch, num_particles: int, data_plate: str,
                 nesting: int) -> torch.Tensor:
    """:func:`log_importance_weights` of enumeration-free programs whose plate nesting is known."""
    with pyro.plate("iw_particles", num_particles, dim=-(nesting + 1)):
        guide_tr = poutine.trace(guide).get_trace(batch)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(batch)
    guide_latents = {s["name"] for s in sample_sites(guide_tr) if not s["is_observed"]}
    total = None
    for sign, tr, is_model in ((1.0, model_tr, True), (-1.0, guide_tr, False)):
        for site in sample_sites(tr):
            if not is_model and site["is_observed"]:
                continue                                  # an auxiliary guide factor, not proposal density
            if is_model and not site["is_observed"] and site["name"] not in guide_latents:
                continue                                  # drawn from its prior: its own proposal
            data_dim, _ = _plate_dims(site, data_plate)
            term = sign * _per_datapoint(_site_log_prob(site), nesting, data_dim)
            total = term if total is None else total + term
    if total is None:
        raise LikelihoodError(f"no sample site inside plate {data_plate!r}")
    rows = total.shape[-1] if total.shape[-1] > 1 else getattr(batch, "size", 1)
    return total.expand(num_particles, rows)


@torch.no_grad()
def iw_log_likelihood(model: Callable, guide: Callable, batch, num_particles: int = 100,
                      chunk: Optional[int] = None, data_plate: str = "data") -> torch.Tensor:
    """Per-datapoint importance-weighted estimate of ``log p(x_i)`` (Burda et al. 2016, eq. 8), in nats.

    Args:
        model, guide: Pyro programs ``model(batch)`` / ``guide(batch)`` (e.g. ``m.model`` / ``m.guide`` of a
            :class:`ppl_vae.models.base.LatentVariableModel`).
        batch: their argument, ``B`` rows.
        num_particles: K importance samples per row.
        chunk: particles per vectorised pass (memory bound; default all K at once).
        data_plate: name of the plate over datapoints.

    Returns:
        ``(B,)`` tensor: ``logsumexp_k log w_ik - log K``.

    Raises:
        LikelihoodError, ValueError: see :func:`log_importance_weights`.
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    chunk = num_particles if chunk is None else max(1, int(chunk))
    model, guide = no_enumeration(model), no_enumeration(guide)
    nesting = _checked_nesting(model, guide, batch, data_plate)          # one prototype run for every chunk
    parts, left = [], num_particles
    while left > 0:
        k = min(chunk, left)
        parts.append(_log_weights(model, guide, batch, k, data_plate, nesting))
        left -= k
    log_w = torch.cat(parts, 0)
    return torch.logsumexp(log_w, 0) - math.log(num_particles)

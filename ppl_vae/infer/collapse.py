"""Posterior-collapse report of any Pyro model/guide pair: active units and the KL per latent dimension.

For every latent site of the guide inside ``pyro.plate("data", B)``, with a Gaussian guide ``q(z | x) =
N(μ(x), diag σ(x)²)``:

- *activity* of dimension ``u``: ``A_u = Var_x(E_q[z_u | x])``, the variance over datapoints of the posterior mean;
  the unit is *active* when ``A_u > threshold`` (0.01; Burda, Grosse & Salakhutdinov 2016, "Importance Weighted
  Autoencoders", ICLR, §5.2). A collapsed unit has ``q(z_u | x) ≈ p(z_u)`` for every ``x``: its mean does not move.
- *KL per dimension*: ``E_x KL(q(z_u | x) || p(z_u))`` in nats, exact for a diagonal Gaussian prior (for a
  Gaussian prior whose parameters depend on other latents — a hierarchy's upper layer, a mixture component — the
  KL given those latents as drawn by the guide, or by the prior where the guide has no site for them, i.e. the
  per-layer term of the ELBO); for any other prior (a mixture distribution, a VampPrior) only the site's total KL is
  estimated, by
  Monte Carlo ``E_x E_q[log q(z | x) - log p(z)]`` with ``num_samples`` draws per row, and the per-dimension column
  is NaN (a non-factorised prior has no per-dimension KL).

The report is a :class:`pandas.DataFrame` with one row per ``(site, dim)`` and columns ``activity``, ``active``,
``kl``; ``report.attrs`` holds per site ``num_active``, ``kl_total`` and ``latent_dim``. KL annealing schedules
(Bowman et al. 2016; Fu et al. 2019) are judged by these numbers.
"""
from __future__ import annotations

from typing import Callable

import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from ppl_vae.infer.latents import base_distribution
from ppl_vae.infer.likelihood import no_enumeration, plate_nesting, sample_sites

__all__ = ["collapse_report"]


def _gaussian_kl(q: dist.Normal, p: dist.Normal) -> torch.Tensor:
    return torch.distributions.kl_divergence(q, p)


@torch.no_grad()
def collapse_report(model: Callable, guide: Callable, batch, threshold: float = 0.01,
                    num_samples: int = 16) -> pd.DataFrame:
    """Active units and KL per dimension of every Gaussian latent site of ``guide``.

    Args:
        model, guide: Pyro programs ``model(batch)`` / ``guide(batch)``.
        batch: the datapoints to average over (``B`` rows; a few hundred give stable numbers).
        threshold: activity above which a unit counts as active (0.01, Burda et al. 2016).
        num_samples: Monte Carlo draws per row for a site whose prior is not a diagonal Gaussian.

    Returns:
        DataFrame indexed by ``(site, dim)`` with ``activity`` (variance of the posterior mean, latent units²),
        ``active`` (bool), ``kl`` (nats per datapoint; NaN for a non-Gaussian prior); ``attrs[site]`` =
        ``{"num_active", "latent_dim", "kl_total"}``.

    Raises:
        ValueError: the guide has no Gaussian latent site, or ``batch`` has fewer than 2 rows.
    """
    model, guide = no_enumeration(model), no_enumeration(guide)
    guide_tr = poutine.trace(guide).get_trace(batch)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(batch)
    rows, attrs = [], {}
    for site in sample_sites(guide_tr):
        q = base_distribution(site["fn"])
        if site["is_observed"] or not isinstance(q, dist.Normal) or site["name"] not in model_tr.nodes:
            continue
        loc = q.loc.expand(site["value"].shape).reshape(-1, site["value"].shape[-1])
        if loc.shape[0] < 2:
            raise ValueError("collapse_report needs at least 2 datapoints")
        activity = loc.var(0)
        p = base_distribution(model_tr.nodes[site["name"]]["fn"])
        if isinstance(p, dist.Normal):
            kl = _gaussian_kl(q, p).expand(site["value"].shape).reshape(-1, loc.shape[-1]).mean(0)
            kl_total = float(kl.sum())
        else:
            kl = torch.full_like(activity, float("nan"))
            kl_total = _mc_kl(model, guide, batch, site["name"], guide_tr, num_samples)
        for u in range(loc.shape[-1]):
            rows.append({"site": site["name"], "dim": u, "activity": float(activity[u]),
                         "active": bool(activity[u] > threshold), "kl": float(kl[u])})
        attrs[site["name"]] = {"num_active": int((activity > threshold).sum()), "latent_dim": int(loc.shape[-1]),
                               "kl_total": kl_total}
    if not rows:
        raise ValueError("the guide has no Gaussian latent site to report on")
    report = pd.DataFrame(rows).set_index(["site", "dim"])
    report.attrs.update(attrs)
    return report


def _mc_kl(model, guide, batch, name: str, proto, num_samples: int) -> float:
    """``E_x E_q[log q(z|x) - log p(z)]`` of site ``name`` with ``num_samples`` draws per row (vectorised)."""
    nesting = plate_nesting(proto)
    with pyro.plate("kl_particles", num_samples, dim=-(nesting + 1)):
        g = poutine.trace(guide).get_trace(batch)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(batch)
    gs, ms = g.nodes[name], m.nodes[name]
    return float((gs["fn"].log_prob(gs["value"]) - ms["fn"].log_prob(ms["value"])).mean())

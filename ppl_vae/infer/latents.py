"""Encode, decode and interpolate through the latent space of any Pyro model/guide pair, from their traces.

- :func:`posterior_mean`: the guide's mean of a latent site, ``(B, latent_dim)`` (the loc of a Gaussian guide).
- :func:`decode_mean`: the model's mean of an observed site with some latents fixed (``poutine.condition``), e.g.
  the mean image of ``p(x | z)``; extra leading dims of the fixed values (a grid of codes) are vectorised with a
  ``pyro.plate`` left of the program's plates.
- :func:`interpolate`: ``num`` points between two codes, linear or spherical (slerp: Shoemake 1985; for Gaussian
  latents White 2016, "Sampling Generative Networks", §2.1, argues slerp stays in the typical set where linear
  paths pass near the origin).
- :func:`latent_interpolation`: both of the above for pairs of datapoints: ``(pairs, num, x_dim)`` decoded means.

Nothing here is written per model: any program whose latent site lies in ``pyro.plate("data", B)`` works (a
conditional model reads its condition, e.g. a CVAE's class, from the batch it is given).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from ppl_vae.infer.likelihood import no_enumeration, plate_nesting, sample_sites

__all__ = ["INTERPOLATIONS", "base_distribution", "posterior_mean", "decode_mean", "interpolate",
           "latent_interpolation"]

#: kinds understood by :func:`interpolate`
INTERPOLATIONS = ("linear", "slerp")


def base_distribution(fn):
    """Strip ``Independent`` / masked / expanded wrappers: the distribution that carries loc and scale."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _latent_site(trace, site: Optional[str]):
    latents = [s for s in sample_sites(trace) if not s["is_observed"]]
    if site is None:
        continuous = [s for s in latents if not getattr(s["fn"].support, "is_discrete", False)]
        if not continuous:
            raise ValueError("the guide has no continuous latent site")
        return continuous[0]
    for s in latents:
        if s["name"] == site:
            return s
    raise ValueError(f"the guide has no latent site {site!r}; it has {[s['name'] for s in latents]}")


@torch.no_grad()
def posterior_mean(guide: Callable, batch, site: Optional[str] = None) -> torch.Tensor:
    """The guide's mean of latent ``site`` (default: its first continuous latent site).

    Returns:
        the loc of a Gaussian guide site, else the distribution's ``mean``; shape of the site's value, e.g.
        ``(B, latent_dim)``.

    Raises:
        ValueError: no such latent site (names the sites there are).
    """
    tr = poutine.trace(no_enumeration(guide)).get_trace(batch)
    fn = _latent_site(tr, site)["fn"]
    base = base_distribution(fn)
    return base.loc if isinstance(base, dist.Normal) else fn.mean


@torch.no_grad()
def decode_mean(model: Callable, batch, latents: Mapping[str, torch.Tensor], obs_site: str = "x") -> torch.Tensor:
    """Mean of the model's observed site ``obs_site`` with the latents in ``latents`` fixed.

    Args:
        model: Pyro model ``model(batch)``.
        batch: its argument (``B`` rows; supplies the conditioning inputs of a conditional model).
        latents: ``{site: value}``, each ``(*grid, B, latent_dim)``; ``grid`` (any leading dims, e.g. interpolation
            steps) is vectorised with a plate left of the model's plates. Other latents are drawn from the model.
        obs_site: the observed site whose mean is returned (``"x"``).

    Returns:
        ``(*grid, B, x_dim)``: e.g. pixel probabilities of a Bernoulli image likelihood.

    Raises:
        ValueError: the model has no site ``obs_site``.
    """
    model = no_enumeration(model)
    name, first = next(iter(latents.items()))
    proto = poutine.trace(model).get_trace(batch)
    if name not in proto.nodes:
        raise ValueError(f"the model has no latent site {name!r}")
    nesting = plate_nesting(proto)
    grid = tuple(first.shape[:max(0, first.dim() - proto.nodes[name]["value"].dim())])
    flat = {k: v.reshape((-1,) + tuple(v.shape[len(grid):])) if grid else v for k, v in latents.items()}
    conditioned = poutine.condition(model, data=flat)
    if grid:
        with pyro.plate("latent_grid", math.prod(grid), dim=-(nesting + 1)):
            tr = poutine.trace(conditioned).get_trace(batch)
    else:
        tr = poutine.trace(conditioned).get_trace(batch)
    if obs_site not in tr.nodes:
        raise ValueError(f"the model has no site {obs_site!r}")
    mean = tr.nodes[obs_site]["fn"].mean
    return mean.reshape(tuple(grid) + tuple(mean.shape[1:])) if grid else mean


def interpolate(a: torch.Tensor, b: torch.Tensor, num: int = 8, kind: str = "linear") -> torch.Tensor:
    """``num`` points from ``a`` to ``b`` (both included), along the last dimension's vectors.

    Args:
        a, b: ``(..., d)`` codes of the same shape.
        num: points, ``>= 2``.
        kind: ``"linear"`` (``(1 - t) a + t b``) or ``"slerp"`` (``sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b``,
            ``Ω`` the angle between ``a`` and ``b``; linear where ``Ω ≈ 0``).

    Returns:
        ``(num, ..., d)``.

    Raises:
        ValueError: ``num < 2``, unknown ``kind``, or shapes that differ.
    """
    if num < 2:
        raise ValueError(f"num must be >= 2, got {num}")
    if kind not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {kind!r}; choose one of {INTERPOLATIONS}")
    if a.shape != b.shape:
        raise ValueError(f"endpoints differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    t = torch.linspace(0.0, 1.0, num, device=a.device, dtype=a.dtype).reshape((num,) + (1,) * a.dim())
    linear = (1 - t) * a + t * b
    if kind == "linear":
        return linear
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    sin = torch.sin(omega)
    slerp = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin.clamp_min(1e-7)
    return torch.where(sin.abs() < 1e-4, linear, slerp)


@torch.no_grad()
def latent_interpolation(model: Callable, guide: Callable, batch_a, batch_b, num: int = 8, kind: str = "linear",
                         site: Optional[str] = None, obs_site: str = "x") -> torch.Tensor:
    """Decode the path between the posterior means of ``batch_a[i]`` and ``batch_b[i]`` for every ``i``.

    Args:
        model, guide: Pyro programs taking a batch.
        batch_a, batch_b: two batches of ``P`` rows each (the pairs' endpoints); ``batch_a`` supplies the
            conditioning inputs of a conditional model.
        num, kind: see :func:`interpolate`.
        site: the guide's latent site (default: its first continuous one).
        obs_site: the model's observed site.

    Returns:
        ``(P, num, x_dim)`` decoded means (row ``i``: the path of pair ``i``; column 0 decodes ``a_i``).
    """
    za = posterior_mean(guide, batch_a, site)
    zb = posterior_mean(guide, batch_b, site)
    name = site or _latent_site(poutine.trace(no_enumeration(guide)).get_trace(batch_a), None)["name"]
    path = interpolate(za, zb, num, kind)                   # (num, P, d)
    return decode_mean(model, batch_a, {name: path}, obs_site).transpose(0, 1)

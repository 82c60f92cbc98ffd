"""MCMC diagnostics for HMC chains: conversion to ArviZ (named dims), R-hat / ESS / MCSE / BFMI summaries, plots.

Chains come out of :mod:`ppl_vae.infer.mcmc` as tensors shaped ``(num_chains, num_draws, batch, latent_dim)``
(or ``(num_chains, num_draws, latent_dim)`` for a single target) with per-transition statistics ``energy``,
``accept_prob`` (the Metropolis-Hastings acceptance probability ``min(1, exp(-ΔH))``: Stan's ``accept_stat__``,
ArviZ's ``acceptance_rate``), ``accepted`` (the MH decision, or the fraction of accepted transitions in a draw made
of several), ``diverging`` (``(num_chains, num_draws[, batch])``) and ``step_size``. :func:`to_arviz` turns them
into an ``xarray.DataTree`` with ``posterior`` and ``sample_stats`` groups (ArviZ 1.x conventions, via
``arviz_base.from_dict``); :func:`summary` computes the usual diagnostics with ``arviz_stats`` (its NumPy array
layer, which needs no optional dependency); the plots use matplotlib only.

References: Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), "Rank-normalization, folding, and localization:
an improved R-hat" (rank-normalised split R-hat, bulk/tail ESS, rank plots); Betancourt (2016), "Diagnosing
suboptimal cotangent disintegrations in HMC" (E-BFMI, energy plot).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import xarray as xr

__all__ = ["to_arviz", "trace_to_arviz", "accepted_from_positions", "summary", "summary_table", "sampler_table",
           "plot_trace", "plot_rank", "plot_energy"]

_STAT_NAMES = ("energy", "accept_prob", "accepted", "diverging", "step_size")


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_arviz(chains, stats: Optional[Mapping[str, Any]] = None, latent_names: Optional[Sequence[str]] = None,
             var_name: str = "latent"):
    """Convert HMC chains (and their statistics) to an ArviZ ``xarray.DataTree``.

    Args:
        chains: ``(num_chains, num_draws, batch, latent_dim)`` or ``(num_chains, num_draws, latent_dim)`` (tensor or
            array).
        stats: optional mapping with any of ``energy``, ``accept_prob``, ``accepted``, ``diverging`` shaped
            ``(num_chains, num_draws[, batch])`` and ``step_size`` shaped ``(num_draws, latent_dim)``,
            ``(num_chains, num_draws, latent_dim)`` or ``(num_chains, num_draws, batch, latent_dim)``; other keys are
            stored as given (leading dims chain, draw).
        latent_names: coordinate labels of ``latent_dim`` (e.g. ``["eps_1[0]", ...]``); default ``0..latent_dim-1``.
        var_name: name of the posterior variable.

    Returns:
        ``xarray.DataTree`` with group ``posterior`` (variable ``var_name``, dims ``chain, draw[, datapoint],
        latent_dim``) and, if ``stats`` is given, ``sample_stats`` (dims ``chain, draw[, datapoint][, latent_dim]``).

    Raises:
        ValueError: ``chains`` is not 3-/4-D, a statistic's shape does not match, or ``latent_names`` has the wrong
            length.
    """
    import arviz_base

    x = _np(chains)
    if x.ndim not in (3, 4):
        raise ValueError(f"chains must be (chain, draw[, datapoint], latent_dim), got shape {x.shape}")
    has_dp = x.ndim == 4
    n_chain, n_draw = x.shape[:2]
    n_lat = x.shape[-1]
    point_dims = ["datapoint", "latent_dim"] if has_dp else ["latent_dim"]
    coords: dict[str, Any] = {}
    if latent_names is not None:
        if len(latent_names) != n_lat:
            raise ValueError(f"latent_names has {len(latent_names)} names for latent_dim {n_lat}")
        coords["latent_dim"] = list(latent_names)
    data: dict[str, dict[str, np.ndarray]] = {"posterior": {var_name: x}}
    dims: dict[str, list[str]] = {var_name: point_dims}
    if stats:
        ss: dict[str, np.ndarray] = {}
        for key, value in stats.items():
            v = _np(value)
            if key == "diverging":
                v = v.astype(bool)
            if key == "step_size":
                if v.ndim == 2:  # (draw, latent_dim): shared by all chains
                    if v.shape != (n_draw, n_lat):
                        raise ValueError(f"step_size must be (num_draws, latent_dim)={n_draw, n_lat}, got {v.shape}")
                    v = np.broadcast_to(v, (n_chain, n_draw, n_lat)).copy()
                dims[key] = ["datapoint", "latent_dim"] if v.ndim == 4 else ["latent_dim"]
            else:
                if v.shape[:2] != (n_chain, n_draw):
                    raise ValueError(f"stat {key!r} must start with (chain, draw)={n_chain, n_draw}, got {v.shape}")
                if key in _STAT_NAMES:
                    expect = (n_chain, n_draw) + ((x.shape[2],) if has_dp else ())
                    if v.shape != expect:
                        raise ValueError(f"stat {key!r} must be {expect}, got {v.shape}")
                    dims[key] = ["datapoint"] if has_dp else []
            ss[key] = v
        data["sample_stats"] = ss
    return arviz_base.from_dict(data, dims=dims, coords=coords or None)


def accepted_from_positions(positions):
    """Metropolis-Hastings decisions recovered from a kept chain: transition ``t`` was accepted iff the state moved,
    ``positions[t + 1] != positions[t]`` in some coordinate (a rejected proposal keeps the state exactly; an
    accepted one that lands exactly on the old state has probability zero).

    Args: positions ``(T + 1, *chain_dims, dim)``. Returns: bool ``(T, *chain_dims)`` (tensor or array as given).
    """
    return (positions[1:] != positions[:-1]).any(-1)


def trace_to_arviz(trace, latent_names: Optional[Sequence[str]] = None):
    """:func:`to_arviz` for an :class:`ppl_vae.infer.mcmc.HMCTrace` run with ``keep_chain=True``: the ``T``
    transitions become draws (the initial state is dropped), the trace's chains the ``chain`` dim. ``accepted`` is
    the trace's own when it has one, else :func:`accepted_from_positions`.

    Raises:
        ValueError: the trace has no kept chain.
    """
    if trace.positions is None:
        raise ValueError("run_hmc(..., keep_chain=True) is needed to convert a trace")
    pos = trace.positions[1:]  # (T, C, B, D) or (T, C, D)
    chains = pos.movedim(0, 1)
    stats = {k: getattr(trace, k).movedim(0, 1) for k in ("energy", "accept_prob", "diverging")}
    accepted = getattr(trace, "accepted", None)
    stats["accepted"] = (accepted if accepted is not None else accepted_from_positions(trace.positions)).movedim(0, 1)
    stats["step_size"] = trace.step_size
    return to_arviz(chains, stats, latent_names)


def _posterior(dt, var_name: Optional[str]) -> xr.DataArray:
    post = dt["posterior"].to_dataset() if hasattr(dt["posterior"], "to_dataset") else dt["posterior"]
    name = var_name or next(iter(post.data_vars))
    return post[name]


def _sample_stats(dt) -> Optional[xr.Dataset]:
    groups = dt.children if hasattr(dt, "children") else dt
    if "sample_stats" not in groups:
        return None
    node = dt["sample_stats"]
    return node.to_dataset() if hasattr(node, "to_dataset") else node


def _bfmi(energy: np.ndarray) -> np.ndarray:
    """E-BFMI per chain for ``energy`` ``(chain, draw, *rest)`` -> ``(chain, *rest)`` via ``arviz_stats``' array
    layer (which expects the chain and draw axes last)."""
    from arviz_stats.base import array_stats

    moved = np.moveaxis(energy, (0, 1), (-2, -1))  # (*rest, chain, draw)
    out = array_stats.bfmi(moved, chain_axis=-2, draw_axis=-1)  # (*rest, chain)
    return np.moveaxis(np.asarray(out), -1, 0)


def summary(dt, var_name: Optional[str] = None, prob: tuple[float, float] = (0.05, 0.95)) -> xr.Dataset:
    """Convergence diagnostics of the chains in ``dt`` (from :func:`to_arviz`), per datapoint and latent dim.

    Computed with ``arviz_stats`` (array layer, ``chain_axis=0, draw_axis=1``):

    - ``mean``, ``sd`` (ddof = 1) over chains and draws;
    - ``mcse_mean``: Monte Carlo standard error of the mean (``mcse(method="mean")``);
    - ``ess_bulk``: bulk ESS of the rank-normalised draws (``ess(method="bulk")``);
    - ``ess_tail``: tail ESS, the minimum of the ESS of the indicators of the ``prob`` quantiles
      (``ess(method="tail", prob=prob)``, default the 5 % and 95 % quantiles);
    - ``r_hat``: rank-normalised split R-hat (``rhat(method="rank")``; needs ≥ 2 chains, NaN otherwise);

    and from ``sample_stats`` when present (per chain, and per datapoint if the chains have one):

    - ``accept_prob``: mean Metropolis-Hastings acceptance probability ``E[min(1, exp(-ΔH))]`` (Stan's mean
      ``accept_stat__``, ArviZ's ``acceptance_rate``; what step-size adaptation targets);
    - ``accept_rate``: fraction of proposals accepted (mean of the ``accepted`` statistic, when present);
    - ``n_divergent``: number of divergent transitions;
    - ``bfmi``: energy Bayesian fraction of missing information ``Σ(E_n - E_{n-1})² / Σ(E_n - Ē)²``
      (``bfmi``; values below 0.3 indicate poor momentum resampling).

    Args:
        dt: the ``xarray.DataTree`` of :func:`to_arviz` (``posterior`` and optional ``sample_stats`` groups).
        var_name: posterior variable (default: the first).
        prob: quantiles of the tail ESS.

    Returns:
        ``xarray.Dataset``: the parameter diagnostics with the posterior's non-sample dims
        (``[datapoint,] latent_dim``), the sampler diagnostics with dims ``chain[, datapoint]``.

    Raises:
        KeyError: no posterior group / unknown ``var_name``.
    """
    from arviz_stats.base import array_stats

    da = _posterior(dt, var_name)
    da = da.transpose("chain", "draw", ...)
    arr = np.asarray(da.values, dtype=float)
    pdims = [d for d in da.dims if d not in ("chain", "draw")]
    pcoords = {d: da.coords[d].values for d in pdims if d in da.coords}
    n_chain = arr.shape[0]

    def put(values) -> xr.DataArray:
        return xr.DataArray(np.asarray(values, dtype=float), dims=pdims, coords=pcoords)

    out = xr.Dataset({
        "mean": put(arr.mean(axis=(0, 1))),
        "sd": put(arr.reshape((-1,) + arr.shape[2:]).std(axis=0, ddof=1)),
        "mcse_mean": put(array_stats.mcse(arr, chain_axis=0, draw_axis=1, method="mean")),
        "ess_bulk": put(array_stats.ess(arr, chain_axis=0, draw_axis=1, method="bulk")),
        "ess_tail": put(array_stats.ess(arr, chain_axis=0, draw_axis=1, method="tail", prob=prob)),
        "r_hat": put(array_stats.rhat(arr, chain_axis=0, draw_axis=1, method="rank") if n_chain > 1
                     else np.full(arr.shape[2:], np.nan)),
    })
    ss = _sample_stats(dt)
    if ss is not None:
        def per_chain(name: str, fn):
            v = ss[name].transpose("chain", "draw", ...)
            dims = ["chain"] + [d for d in v.dims if d not in ("chain", "draw")]
            coords = {d: v.coords[d].values for d in dims if d in v.coords}
            return xr.DataArray(fn(np.asarray(v.values)), dims=dims, coords=coords)

        if "accept_prob" in ss:
            out["accept_prob"] = per_chain("accept_prob", lambda a: a.astype(float).mean(axis=1))
        if "accepted" in ss:
            out["accept_rate"] = per_chain("accepted", lambda a: a.astype(float).mean(axis=1))
        if "diverging" in ss:
            out["n_divergent"] = per_chain("diverging", lambda a: a.astype(bool).sum(axis=1))
        if "energy" in ss and ss["energy"].sizes["draw"] > 2:
            out["bfmi"] = per_chain("energy", lambda a: _bfmi(a.astype(float)))
    out.attrs["computed"] = (
        "mean, sd (ddof=1), mcse_mean (arviz_stats mcse method='mean'), ess_bulk (ess method='bulk'), "
        f"ess_tail (ess method='tail', prob={tuple(prob)}), r_hat (rank-normalised split R-hat); per chain: "
        "accept_prob (mean MH acceptance probability), accept_rate (fraction of accepted proposals), n_divergent, "
        "bfmi (E-BFMI)")
    return out


def summary_table(dt, var_name: Optional[str] = None, prob: tuple[float, float] = (0.05, 0.95)):
    """The parameter part of :func:`summary` as a ``pandas.DataFrame``, exactly one row per ``(datapoint,
    latent_dim)`` (never one per chain), columns ``mean, sd, mcse_mean, ess_bulk, ess_tail, r_hat``; the sampler
    diagnostics pooled over chains and datapoints go into ``df.attrs`` (``accept_prob`` (mean acceptance
    probability), ``accept_rate`` (fraction accepted), ``n_divergent`` (total), ``bfmi`` (per chain)). The
    per-chain sampler diagnostics are :func:`sampler_table`."""
    s = summary(dt, var_name, prob)
    cols = ["mean", "sd", "mcse_mean", "ess_bulk", "ess_tail", "r_hat"]
    df = s[cols].to_dataframe()[cols]
    for key in ("accept_prob", "accept_rate"):
        if key in s:
            df.attrs[key] = float(s[key].mean())
    if "n_divergent" in s:
        df.attrs["n_divergent"] = int(s["n_divergent"].sum())
    if "bfmi" in s:
        b = s["bfmi"]
        df.attrs["bfmi"] = b.mean([d for d in b.dims if d != "chain"]).values.tolist() if b.ndim > 1 else b.values.tolist()
    return df


def sampler_table(dt, var_name: Optional[str] = None):
    """The sampler part of :func:`summary` as a ``pandas.DataFrame``, one row per ``chain[, datapoint]``, columns
    among ``accept_prob, accept_rate, n_divergent, bfmi`` (those the ``sample_stats`` allow); empty without
    ``sample_stats``."""
    import pandas as pd

    s = summary(dt, var_name)
    cols = [c for c in ("accept_prob", "accept_rate", "n_divergent", "bfmi") if c in s]
    if not cols:
        return pd.DataFrame()
    return s[cols].to_dataframe()[cols]


def _select_point(da: xr.DataArray, datapoint: int) -> xr.DataArray:
    if "datapoint" in da.dims:
        da = da.isel(datapoint=datapoint)
    return da.transpose("chain", "draw", ...)


def _finish(fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_trace(dt, path=None, *, var_name: Optional[str] = None, datapoint: int = 0, max_dims: int = 6):
    """Trace plot: per latent dim, the marginal histogram of each chain (left) and the draws against iteration
    (right), for one datapoint.

    Args:
        dt: from :func:`to_arviz`.
        path: file to save to (``None``: don't save).
        var_name: posterior variable (default: the first).
        datapoint: which datapoint (if the chains have that dim).
        max_dims: plot at most this many latent dims.

    Returns:
        ``matplotlib.figure.Figure``.
    """
    import matplotlib.pyplot as plt

    da = _select_point(_posterior(dt, var_name), datapoint)
    arr = np.asarray(da.values)  # (chain, draw, latent)
    n = min(arr.shape[-1], max_dims)
    fig, axes = plt.subplots(n, 2, figsize=(10, 2.0 * n + 0.5), squeeze=False)
    for j in range(n):
        for c in range(arr.shape[0]):
            axes[j, 0].hist(arr[c, :, j], bins=30, histtype="step", density=True)
            axes[j, 1].plot(arr[c, :, j], lw=0.6)
        label = da.coords["latent_dim"].values[j] if "latent_dim" in da.coords else j
        axes[j, 0].set_ylabel(f"{da.name}[{label}]")
    axes[0, 0].set_title("marginal per chain")
    axes[0, 1].set_title("trace")
    axes[-1, 1].set_xlabel("draw")
    return _finish(fig, path)


def plot_rank(dt, path=None, *, var_name: Optional[str] = None, datapoint: int = 0, max_dims: int = 6,
              bins: int = 20):
    """Rank plot (Vehtari et al. 2021): draws of all chains are ranked jointly, and each chain's rank histogram is
    drawn; well-mixed chains give uniform histograms.

    Args/Returns: as :func:`plot_trace` (``bins``: histogram bins).
    """
    import matplotlib.pyplot as plt
    from scipy.stats import rankdata

    da = _select_point(_posterior(dt, var_name), datapoint)
    arr = np.asarray(da.values)
    n_chain, n_draw = arr.shape[:2]
    n = min(arr.shape[-1], max_dims)
    fig, axes = plt.subplots(n, n_chain, figsize=(1.6 * n_chain + 1.5, 1.6 * n + 0.5), squeeze=False,
                             sharex=True, sharey="row")
    edges = np.linspace(0, n_chain * n_draw, bins + 1)
    for j in range(n):
        ranks = rankdata(arr[:, :, j].reshape(-1)).reshape(n_chain, n_draw)
        for c in range(n_chain):
            axes[j, c].hist(ranks[c], bins=edges, color="tab:blue", alpha=0.8)
            axes[j, c].axhline(n_draw / bins, color="k", ls="--", lw=0.8)
            axes[j, c].set_yticks([])
            if j == 0:
                axes[j, c].set_title(f"chain {c}", fontsize=8)
        axes[j, 0].set_ylabel(f"dim {j}")
    return _finish(fig, path)


def plot_energy(dt, path=None, *, datapoint: Optional[int] = None, bins: int = 40):
    """Energy plot (Betancourt 2016): the centred marginal energy distribution ``E - Ē`` against the energy
    transition distribution ``E_n - E_{n-1}``; a transition distribution much narrower than the marginal means
    momentum resampling explores the energy levels slowly (low E-BFMI).

    Args:
        dt: from :func:`to_arviz` with ``sample_stats.energy``.
        path: file to save to.
        datapoint: restrict to one datapoint (default: all pooled, each centred per chain and datapoint).
        bins: histogram bins.

    Returns:
        ``matplotlib.figure.Figure``.

    Raises:
        KeyError: no energy statistic.
    """
    import matplotlib.pyplot as plt

    ss = _sample_stats(dt)
    if ss is None or "energy" not in ss:
        raise KeyError("sample_stats.energy is needed for the energy plot")
    e = ss["energy"]
    if datapoint is not None and "datapoint" in e.dims:
        e = e.isel(datapoint=datapoint)
    e = np.asarray(e.transpose("chain", "draw", ...).values, dtype=float)
    marginal = (e - e.mean(axis=1, keepdims=True)).reshape(-1)
    transition = np.diff(e, axis=1).reshape(-1)
    fig, ax = plt.subplots(figsize=(6, 4))
    lo, hi = np.percentile(np.concatenate([marginal, transition]), [0.5, 99.5])
    edges = np.linspace(lo, hi, bins + 1)
    ax.hist(marginal, bins=edges, alpha=0.5, density=True, label="marginal energy (E - mean)")
    ax.hist(transition, bins=edges, alpha=0.5, density=True, label="energy transition (ΔE)")
    ax.set_xlabel("energy")
    ax.legend()
    bf = _bfmi(e)
    ax.set_title(f"E-BFMI per chain: {np.round(np.nanmean(bf.reshape(bf.shape[0], -1), axis=1), 2).tolist()}"
                 if bf.size <= 64 * 8 else "energy")
    return _finish(fig, path)

"""Sequential active information acquisition (SAIA): which feature to measure next to predict the target best.

A record starts with every feature and the target missing. At each step, for every still-missing feature ``i`` of
a row, a reward is computed from the model's joint posterior predictive given what is observed so far, ``x_O``; the
feature with the highest reward is revealed (its true value is copied in), the posterior is re-inferred (HMC chains
for HMC-refined models) and the prediction of ``y`` is scored. Rewards (all vectorised over rows and candidate
features; no Python loop over rows):

- ``"mi"``: ``R(i, x_O) = I(y; x_i | x_O)`` estimated from K joint draws ``(x_i^(k), y^(k)) ~ p(x_i, y | x_O)``
  (:func:`ppl_vae.infer.sample_predictive`) with the plug-in histogram estimator (:func:`mi_histogram`), the
  reward of Peis, Ma & Hernández-Lobato 2022 ("Missing data imputation and acquisition with deep hierarchical
  models and Hamiltonian Monte Carlo", NeurIPS, §3 "sequential active information acquisition");
- ``"mi-knn"``: the same reward with the k-nearest-neighbour estimator of Kraskov, Stögbauer & Grassberger 2004
  (Phys. Rev. E 69, 066138, "algorithm 1", Eq. 8) and, where one variable is discrete, Ross 2014 (PLoS ONE 9,
  e87357, Eq. 2) (:func:`mi_knn`): the estimators behind scikit-learn's ``mutual_info_regression`` /
  ``mutual_info_classif``, re-implemented batched over many small samples;
- ``"eddi"``: the latent-space reward of EDDI (Ma et al. 2019, "EDDI: efficient dynamic discovery of high-value
  information with partial VAE", ICML, §3.2, the KL form of the information reward):
  ``R = E_{x_i} KL[q(z | x_i, x_O) ‖ q(z | x_O)] − E_{x_i, y} KL[q(z | y, x_i, x_O) ‖ q(z | y, x_O)]``, with the
  encoder's Gaussian ``model.proposal(batch)`` (:func:`eddi_reward`);
- ``"random"``: a uniformly random order (the baseline).

Domains: rewards are computed in the *normalised* domain of the data (mutual information is invariant to the
invertible per-column normalisation; the KL reward lives in latent space). The target error of the curves is in
*original* target units (RMSE; accuracy for classification); the target NLL is in the normalised domain
(the evaluation protocol of Peis et al. 2022, §4).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import xarray as xr

from ppl_vae.models.base import Batch

__all__ = ["METHODS", "mi_histogram", "mi_knn", "mi_reward", "eddi_reward", "random_reward", "reward",
           "run_saia", "saia_split", "error_auc", "discrete_columns"]

#: acquisition methods accepted by :func:`reward` / :func:`run_saia`
METHODS = ("mi", "mi-knn", "eddi", "random")

_DISCRETE = ("bernoulli", "categorical")


def discrete_columns(likelihood) -> torch.Tensor:
    """``(D,)`` bool: which columns of a :class:`~ppl_vae.likelihoods.MixedLikelihood` hold codes of a finite set
    (bernoulli, categorical); real and count columns are treated as continuous by the MI estimators."""
    return torch.tensor([k in _DISCRETE for k in likelihood.kinds], dtype=torch.bool)


# ---------------------------------------------------------------------------------------------- MI estimators
def _as_flags(flags, lead: torch.Size, device) -> torch.Tensor:
    t = torch.as_tensor(flags, dtype=torch.bool, device=device)
    return t.expand(lead).reshape(-1)


def _bin_index(v: torch.Tensor, discrete: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin of every sample: ``v (M, K)`` -> long ``(M, K)``. Continuous rows: ``bins`` equal-width bins over the
    row's own range ``[min, max]`` (a constant row falls in one bin); discrete rows: the code itself."""
    lo = v.min(-1, keepdim=True).values
    hi = v.max(-1, keepdim=True).values
    width = (hi - lo).clamp_min(torch.finfo(v.dtype).tiny)
    cont = ((v - lo) / width * bins).floor().clamp(0, bins - 1).long()
    code = v.round().long().clamp_min(0)
    return torch.where(discrete[:, None], code, cont)


def mi_histogram(a: torch.Tensor, b: torch.Tensor, *, bins: int = 6, a_discrete=False, b_discrete=False,
                 miller_madow: bool = False) -> torch.Tensor:
    """Plug-in (histogram) estimate of the mutual information ``I(a; b)`` in nats, for many small samples at once.

    The K samples of every leading index are binned separately: a continuous variable into ``bins`` equal-width
    bins spanning its own sample range (the reference's per-datapoint histogram, 5–7 bins), a discrete variable by
    its code; then ``I = H(a) + H(b) − H(a, b)`` of the empirical joint histogram (Paninski 2003, Neural Comput.
    15, Eq. 2). The plug-in estimate is biased upwards by about ``(B_a − 1)(B_b − 1) / 2K``;
    ``miller_madow=True`` subtracts the Miller–Madow correction ``(B_a + B_b − B_ab − 1) / 2K`` computed from the
    occupied bins (Paninski 2003, §3.1), not the reference's choice.

    Args:
        a, b: ``(..., K)`` samples (broadcastable leading shapes), e.g. ``a = x_i^(k)`` and ``b = y^(k)``.
            Discrete variables hold codes ``0..C-1``.
        bins: equal-width bins of a continuous variable (>= 2).
        a_discrete, b_discrete: bool or bool tensor broadcastable to the leading shape: which variables are codes.
        miller_madow: apply the Miller–Madow bias correction.

    Returns:
        ``(...)`` estimates (>= 0 without the correction).

    Raises:
        ValueError: ``bins < 2`` or fewer than 2 samples.
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    a, b = torch.broadcast_tensors(a, b)
    lead, K = a.shape[:-1], a.shape[-1]
    if K < 2:
        raise ValueError(f"need at least 2 samples per estimate, got {K}")
    a2, b2 = a.reshape(-1, K), b.reshape(-1, K)
    ia = _bin_index(a2, _as_flags(a_discrete, lead, a.device), bins)
    ib = _bin_index(b2, _as_flags(b_discrete, lead, a.device), bins)
    na = int(ia.max()) + 1 if ia.numel() else 1
    nb = int(ib.max()) + 1 if ib.numel() else 1
    counts = torch.zeros(a2.shape[0], na * nb, dtype=torch.float64, device=a.device)
    counts.scatter_add_(-1, ia * nb + ib, torch.ones_like(ia, dtype=torch.float64))
    p = counts.view(-1, na, nb) / K
    pa, pb = p.sum(-1), p.sum(-2)
    ent = lambda q: -torch.special.xlogy(q, q).flatten(1).sum(-1)  # noqa: E731
    mi = ent(pa) + ent(pb) - ent(p)
    if miller_madow:
        occ = lambda q: (q > 0).flatten(1).sum(-1).to(mi.dtype)  # noqa: E731
        mi = mi + (occ(pa) + occ(pb) - occ(p) - 1) / (2 * K)
    else:
        mi = mi.clamp_min(0.0)
    return mi.to(a.dtype if a.is_floating_point() else torch.float64).reshape(lead)


def _standardise_jitter(v: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """scikit-learn's preprocessing of a continuous variable: scale to unit std (no centring; distances are
    shift-invariant), then add ``1e-10 · max(1, mean |v|)`` Gaussian noise to break ties (float64)."""
    std = v.std(-1, keepdim=True)
    v = v / torch.where(std > 0, std, torch.ones_like(std))
    noise = torch.randn(v.shape, generator=generator, dtype=v.dtype, device=v.device)
    return v + 1e-10 * v.abs().mean(-1, keepdim=True).clamp_min(1.0) * noise


def _ksg(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Kraskov et al. 2004, algorithm 1 (Eq. 8), max-norm, on ``(M, K)`` continuous pairs -> ``(M,)``."""
    M, K = a.shape
    eye = torch.eye(K, dtype=torch.bool, device=a.device)
    da = (a[:, :, None] - a[:, None, :]).abs().masked_fill(eye, math.inf)
    db = (b[:, :, None] - b[:, None, :]).abs().masked_fill(eye, math.inf)
    eps = torch.maximum(da, db).kthvalue(k, -1).values                      # distance to the k-th neighbour
    na = (da < eps[..., None]).sum(-1)                                      # strictly inside, self excluded
    nb = (db < eps[..., None]).sum(-1)
    dg = torch.special.digamma
    return (dg(a.new_tensor(float(K))) + dg(a.new_tensor(float(k)))
            - (dg(na.to(a.dtype) + 1) + dg(nb.to(a.dtype) + 1)).mean(-1))


def _ross(c: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
    """Ross 2014 (Eq. 2), continuous ``c`` vs discrete codes ``d``, both ``(M, K)`` -> ``(M,)``; points whose
    label is unique in their sample are ignored (as scikit-learn does)."""
    M, K = c.shape
    eye = torch.eye(K, dtype=torch.bool, device=c.device)
    same = d[:, :, None] == d[:, None, :]
    count = same.sum(-1)                                                    # label count incl. the point
    valid = count > 1
    dist = (c[:, :, None] - c[:, None, :]).abs()
    within = dist.masked_fill(~same | eye, math.inf).sort(-1).values
    kk = torch.minimum(torch.full_like(count, k), (count - 1).clamp_min(1))
    radius = within.gather(-1, kk[..., None] - 1)[..., 0]
    m = ((dist < radius[..., None]) & valid[:, None, :]).sum(-1)           # includes the point itself
    dg = torch.special.digamma
    f = c.dtype
    n_valid = valid.sum(-1).to(f)
    w = valid.to(f)
    mean_v = lambda t: (t * w).sum(-1) / n_valid.clamp_min(1.0)  # noqa: E731
    mi = (dg(n_valid.clamp_min(1.0)) + mean_v(dg(kk.to(f))) - mean_v(dg(count.to(f)))
          - mean_v(dg(m.to(f).clamp_min(1.0))))
    return torch.where(n_valid > 1, mi, torch.zeros_like(mi))


def mi_knn(a: torch.Tensor, b: torch.Tensor, *, k: int = 3, a_discrete=False, b_discrete=False,
           generator: Optional[torch.Generator] = None, max_elements: int = 2 ** 22) -> torch.Tensor:
    """k-nearest-neighbour estimate of ``I(a; b)`` in nats for many small samples at once (scikit-learn's
    ``mutual_info_regression``/``_classif`` estimators, batched).

    Per leading index: both continuous -> Kraskov, Stögbauer & Grassberger 2004 (algorithm 1, Eq. 8, max-norm);
    one discrete -> Ross 2014 (Eq. 2); both discrete -> the plug-in estimate on the codes. As in scikit-learn,
    continuous variables are scaled to unit standard deviation with ``1e-10``-relative jitter against ties, the
    estimate is clipped at 0, and everything runs in float64. All pairwise distances of a sample are formed at once
    (``O(K²)`` memory per estimate, processed in chunks of ``max_elements``); no loop over estimates.

    Args:
        a, b: ``(..., K)`` samples, broadcastable leading shapes. Discrete variables hold codes.
        k: neighbours (scikit-learn's default 3); must be < K.
        a_discrete, b_discrete: bool or bool tensor broadcastable to the leading shape.
        generator: seeds the tie-breaking jitter.
        max_elements: chunk size bound on ``estimates × K × K``.

    Returns:
        ``(...)`` estimates, float64, >= 0.

    Raises:
        ValueError: ``k < 1`` or ``k >= K``.
    """
    a, b = torch.broadcast_tensors(a, b)
    lead, K = a.shape[:-1], a.shape[-1]
    if not 1 <= k < K:
        raise ValueError(f"k must be in 1..K-1 (K = {K} samples), got {k}")
    a2 = a.reshape(-1, K).to(torch.float64)
    b2 = b.reshape(-1, K).to(torch.float64)
    da, db = _as_flags(a_discrete, lead, a.device), _as_flags(b_discrete, lead, a.device)
    out = torch.zeros(a2.shape[0], dtype=torch.float64, device=a.device)
    ca = torch.where(da[:, None], a2, _standardise_jitter(a2, generator))
    cb = torch.where(db[:, None], b2, _standardise_jitter(b2, generator))
    step = max(1, max_elements // (K * K))

    def chunked(rows: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for s in range(0, rows.numel(), step):
            idx = rows[s:s + step]
            out[idx] = fn(idx)

    chunked(torch.nonzero(~da & ~db)[:, 0], lambda i: _ksg(ca[i], cb[i], k))
    chunked(torch.nonzero(da & ~db)[:, 0], lambda i: _ross(cb[i], a2[i].round(), k))
    chunked(torch.nonzero(~da & db)[:, 0], lambda i: _ross(ca[i], b2[i].round(), k))
    both = torch.nonzero(da & db)[:, 0]
    if both.numel():
        out[both] = mi_histogram(a2[both], b2[both], a_discrete=True, b_discrete=True).to(out.dtype)
    return out.clamp_min(0.0).reshape(lead)


# ---------------------------------------------------------------------------------------------- rewards
def _check_candidates(candidates: torch.Tensor, shape) -> torch.Tensor:
    if tuple(candidates.shape) != tuple(shape):
        raise ValueError(f"candidates must be (N, D) = {tuple(shape)}, got {tuple(candidates.shape)}")
    return candidates.bool()


def mi_reward(model, draws, candidates: torch.Tensor, *, estimator: str = "histogram", bins: int = 6, k: int = 3,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``R(i, x_O) = I(y; x_i | x_O)`` for every row and candidate feature from joint posterior-predictive draws.

    Args:
        model: the table model the draws came from (its ``x_likelihood`` / ``predictor.likelihood`` say which
            columns are discrete).
        draws: :class:`~ppl_vae.infer.predictive.PredictiveDraws` with ``x (K, N, D)`` and ``y (K, N, 1)``
            (normalised domain).
        candidates: ``(N, D)`` bool, the still-missing features that may be acquired.
        estimator: ``"histogram"`` (:func:`mi_histogram`, the paper's) or ``"knn"`` (:func:`mi_knn`).
        bins, k: the estimators' settings.
        generator: seeds the kNN tie-breaking jitter.

    Returns:
        ``(N, D)`` float rewards (nats), ``-inf`` where ``candidates`` is ``False``.

    Raises:
        ValueError: no target draws (the model has no predictor), unknown estimator, or a shape mismatch.
    """
    if draws.y is None:
        raise ValueError("I(y; x_i | x_O) needs target draws: the model has no predictor")
    K, N, D = draws.x.shape
    cand = _check_candidates(candidates, (N, D))
    out = torch.full((N, D), -math.inf, dtype=torch.float64, device=draws.x.device)
    rows, cols = torch.nonzero(cand, as_tuple=True)
    if rows.numel() == 0:
        return out
    a = draws.x.permute(1, 2, 0)[rows, cols]                    # (M, K)
    b = draws.y[..., 0].permute(1, 0)[rows]                      # (M, K)
    a_disc = discrete_columns(model.x_likelihood).to(a.device)[cols]
    b_disc = model.predictor.likelihood.kinds[0] in _DISCRETE
    if estimator == "histogram":
        mi = mi_histogram(a, b, bins=bins, a_discrete=a_disc, b_discrete=b_disc)
    elif estimator == "knn":
        mi = mi_knn(a, b, k=min(k, K - 1), a_discrete=a_disc, b_discrete=b_disc, generator=generator)
    else:
        raise ValueError(f"unknown MI estimator {estimator!r}; choose 'histogram' or 'knn'")
    out[rows, cols] = mi.to(out.dtype)
    return out


def _gaussian_kl(m1, s1, m0, s0) -> torch.Tensor:
    """``KL[N(m1, s1²) ‖ N(m0, s0²)]`` summed over the last dim."""
    return (torch.log(s0 / s1) + (s1 ** 2 + (m1 - m0) ** 2) / (2 * s0 ** 2) - 0.5).sum(-1)


def _proposal(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if not hasattr(model, "proposal"):
        raise TypeError(f"EDDI needs a Gaussian guide: {type(model).__name__} has no proposal(batch) method")
    out = model.proposal(batch)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise TypeError(f"{type(model).__name__}.proposal(batch) must return (loc, scale) tensors for EDDI")
    return out


@torch.no_grad()
def eddi_reward(model, batch: Batch, draws, candidates: torch.Tensor, *, num_samples: Optional[int] = None,
                max_rows: int = 65536) -> torch.Tensor:
    """The EDDI latent-space reward (Ma et al. 2019, ICML, §3.2, the KL form):

    ``R(i, x_O) = E_{x_i ~ p(x_i | x_O)} KL[q(z | x_i, x_O) ‖ q(z | x_O)]
    − E_{(x_i, y) ~ p(x_i, y | x_O)} KL[q(z | y, x_i, x_O) ‖ q(z | y, x_O)]``,

    with ``q`` the encoder's Gaussian (``model.proposal(batch) -> (loc, scale)``, each ``(rows, latent_dim)``) and
    the expectations over the joint posterior-predictive draws. Every (row, candidate, draw) triple is one row of
    a stacked encoder batch (chunked by ``max_rows``); no loop over rows.

    Args:
        model: a table model with a Gaussian guide (``proposal``).
        batch: the current rows ``(N, D)`` (normalised domain; ``x_mask`` = observed so far, target missing).
        draws: :class:`~ppl_vae.infer.predictive.PredictiveDraws` of ``batch`` (``x (K, N, D)``, ``y (K, N, 1)``).
        candidates: ``(N, D)`` bool, the features that may be acquired.
        num_samples: use only the first ``num_samples`` draws (default all K).
        max_rows: encoder rows per call.

    Returns:
        ``(N, D)`` float64 rewards (nats), ``-inf`` off the candidates. Without a predictor only the first term.

    Raises:
        TypeError: the model has no Gaussian ``proposal``.
    """
    K, N, D = draws.x.shape
    K = min(K, num_samples or K)
    cand = _check_candidates(candidates, (N, D))
    out = torch.full((N, D), -math.inf, dtype=torch.float64, device=draws.x.device)
    rows, cols = torch.nonzero(cand, as_tuple=True)
    if rows.numel() == 0:
        return out
    M = rows.numel()
    has_y = draws.y is not None and model.predictor is not None
    base_y = batch.y if batch.y is not None else batch.x.new_zeros(N, 1)
    base_ym = batch.y_mask.bool() if batch.y_mask is not None else torch.zeros(N, 1, dtype=torch.bool,
                                                                                device=batch.device)

    def encode(x, xm, y=None, ym=None):
        locs, scales = [], []
        for s in range(0, x.shape[0], max_rows):
            sl = slice(s, s + max_rows)
            b = Batch(x=x[sl], x_mask=xm[sl], y=None if y is None else y[sl], y_mask=None if ym is None else ym[sl])
            loc, scale = _proposal(model, b)
            locs.append(loc)
            scales.append(scale)
        return torch.cat(locs), torch.cat(scales)

    yy = None if base_y is None or model.predictor is None else base_y
    m0, s0 = encode(batch.x, batch.x_mask.bool(), yy, None if yy is None else base_ym)        # q(z | x_O)
    # (K, M) triples: row rows[j], feature cols[j], draw k
    r_km = rows.expand(K, M).reshape(-1)
    c_km = cols.expand(K, M).reshape(-1)
    k_km = torch.arange(K, device=rows.device)[:, None].expand(K, M).reshape(-1)
    x = batch.x[r_km].clone()
    xm = batch.x_mask.bool()[r_km].clone()
    x[torch.arange(x.shape[0]), c_km] = draws.x[k_km, r_km, c_km].to(x.dtype)
    xm[torch.arange(x.shape[0]), c_km] = True
    y_in = None if yy is None else base_y[r_km]
    ym_in = None if yy is None else base_ym[r_km]
    m1, s1 = encode(x, xm, y_in, ym_in)                                                        # q(z | x_i, x_O)
    kl1 = _gaussian_kl(m1, s1, m0[r_km], s0[r_km]).view(K, M).mean(0)
    reward = kl1
    if has_y:
        y_draw = draws.y[k_km, r_km].to(x.dtype)
        y_obs = torch.ones_like(y_draw, dtype=torch.bool)
        m2, s2 = encode(x, xm, y_draw, y_obs)                                                  # q(z | y, x_i, x_O)
        k_n = torch.arange(K, device=rows.device)[:, None].expand(K, N).reshape(-1)
        r_n = torch.arange(N, device=rows.device).expand(K, N).reshape(-1)
        m3, s3 = encode(batch.x[r_n], batch.x_mask.bool()[r_n], draws.y[k_n, r_n].to(x.dtype),
                        torch.ones(K * N, 1, dtype=torch.bool, device=rows.device))            # q(z | y, x_O)
        m3, s3 = m3.view(K, N, -1), s3.view(K, N, -1)
        kl2 = _gaussian_kl(m2, s2, m3[k_km, r_km], s3[k_km, r_km]).view(K, M).mean(0)
        reward = kl1 - kl2
    out[rows, cols] = reward.to(out.dtype)
    return out


def random_reward(candidates: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform random rewards ``(N, D)`` on the candidates (``-inf`` elsewhere): a random acquisition order."""
    cand = candidates.bool()
    r = torch.rand(cand.shape, generator=generator, dtype=torch.float64).to(cand.device)
    return r.masked_fill(~cand, -math.inf)


def reward(method: str, model, batch: Batch, draws, candidates: torch.Tensor, *, bins: int = 6, k: int = 3,
           eddi_samples: Optional[int] = 50, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Dispatch to the reward of ``method`` (one of :data:`METHODS`); ``(N, D)``, ``-inf`` off the candidates.

    Raises:
        ValueError: an unknown method (the message lists :data:`METHODS`).
    """
    if method == "mi":
        return mi_reward(model, draws, candidates, estimator="histogram", bins=bins, generator=generator)
    if method == "mi-knn":
        return mi_reward(model, draws, candidates, estimator="knn", k=k, generator=generator)
    if method == "eddi":
        return eddi_reward(model, batch, draws, candidates, num_samples=eddi_samples)
    if method == "random":
        return random_reward(candidates, generator)
    raise ValueError(f"unknown acquisition method {method!r}; choose one of {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------------------- the SAIA loop
def _logmeanexp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


@torch.no_grad()
def _target_scores(model, batch: Batch, h: torch.Tensor, y_true: torch.Tensor) -> dict:
    """Per-row target NLL (normalised domain) and point prediction from posterior latents ``h (K, N, L)``."""
    lik = model.predictor.likelihood
    y_params = model.y_params(h, batch, model.x_params(h, batch))                # (K, N, Py)
    nll = -_logmeanexp(lik.log_prob(y_params, y_true, torch.ones_like(y_true, dtype=torch.bool)), 0)
    kind = lik.kinds[0]
    if kind in _DISCRETE:
        d, _ = lik.distributions(y_params)[kind]
        probs = d.probs if kind == "categorical" else torch.stack([1 - d.probs, d.probs], -1)
        return {"nll": nll, "y_class": probs.mean(0)[:, 0].argmax(-1)}
    return {"nll": nll, "y_mean": lik.impute(y_params).mean(0)}                  # (N, 1) normalised


def run_saia(model, truth: Batch, method: str = "mi", num_samples: int = 100, *, normaliser=None,
             feature_names: Optional[Sequence[str]] = None, bins: int = 6, k: int = 3,
             eddi_samples: Optional[int] = 50, seed: int = 0, progress: bool = False,
             max_steps: Optional[int] = None) -> xr.Dataset:
    """Sequential active information acquisition on the rows of ``truth``.

    Every row starts with all features and the target missing. At step ``t`` the posterior given the ``t``
    acquired features is sampled (:func:`ppl_vae.infer.sample_predictive`: HMC chains for HMC models), the target
    is scored from those latents, then every row reveals the still-missing *available* feature (observed in
    ``truth``) with the highest :func:`reward`. A row whose available features are all acquired stops acquiring.
    The loop ends when every available feature of every row is observed and scores that state too.

    Args:
        model: a trained table model with a predictor.
        truth: rows with their true values: ``x (N, D)``, ``x_mask`` (which features can be acquired), ``y (N, 1)``
            with ``y_mask`` all ``True`` (normalised domain).
        method: ``"mi"`` (histogram MI), ``"mi-knn"``, ``"eddi"`` or ``"random"``.
        num_samples: K posterior-predictive draws per row and step (paper: 100–200).
        normaliser: the split's ``Normaliser``; with it the error is in original target units (RMSE) or an
            accuracy; without it the RMSE is in the normalised domain (``attrs["error_units"]`` says which).
        feature_names: names of the D features (default ``x0..``).
        bins, k, eddi_samples: estimator settings (see :func:`reward`).
        seed: seeds the posterior draws, the kNN jitter and the random order.
        progress: show a tqdm progress bar over steps.
        max_steps: stop after this many acquisitions (default: until all available features are observed).

    Returns:
        ``xarray.Dataset`` with coordinates ``num_acquired`` (0..S), ``acquisition`` (1..S), ``row``,
        ``feature``; variables ``rmse`` or ``accuracy`` ``(num_acquired)``, ``target_nll`` and
        ``target_nll_std`` ``(num_acquired)`` (mean/std over rows, normalised domain), per row ``row_nll`` and
        ``row_sq_error`` or ``row_correct`` ``(row, num_acquired)``, ``acquired`` ``(row, acquisition)`` (feature
        index revealed at that acquisition, -1 when the row had nothing left), ``reward``
        ``(row, acquisition, feature)`` (NaN off the candidates), ``seconds`` ``(acquisition)`` (wall time of
        inference + reward of that step) and attrs ``method``, ``model``, ``num_samples``,
        ``seconds_per_step_per_row``, ``error_name``, ``error_units``.

    Raises:
        ValueError: the model has no predictor, ``truth`` has no (fully observed) target, or an unknown method.
        RuntimeError: an acquisition invariant is violated (an observed feature chosen, or features left
            unobserved at the end): a bug, never silent.
    """
    if model.predictor is None:
        raise ValueError("SAIA predicts the target: this model was built without one")
    if truth.y is None or truth.y_mask is None or not bool(truth.y_mask.bool().all()):
        raise ValueError("truth must carry the target of every row (y_mask all True) to score the predictions")
    if method not in METHODS:
        raise ValueError(f"unknown acquisition method {method!r}; choose one of {', '.join(METHODS)}")
    from tqdm.auto import tqdm

    from ppl_vae.infer.predictive import sample_predictive

    device = truth.device
    N, D = truth.x.shape
    available = truth.x_mask.bool().clone()
    steps = int(available.sum(-1).max()) if N else 0
    if max_steps is not None:
        steps = min(steps, int(max_steps))
    acquired = torch.zeros_like(available)
    y_true = truth.y
    kind = model.predictor.likelihood.kinds[0]
    classification = kind in _DISCRETE
    gen = torch.Generator().manual_seed(int(seed))
    names = list(feature_names) if feature_names is not None else [f"x{d}" for d in range(D)]

    row_nll = np.full((N, steps + 1), np.nan)
    row_err = np.full((N, steps + 1), np.nan)
    order = np.full((N, steps), -1, dtype=np.int64)
    rewards = np.full((N, steps, D), np.nan)
    seconds = np.zeros(steps)
    y_true_orig = (normaliser.inverse_target(y_true.cpu().numpy()) if normaliser is not None and not classification
                   else y_true.cpu().numpy())

    def current_batch() -> Batch:
        xm = acquired.clone()
        return Batch(x=truth.x * xm, x_mask=xm, y=torch.zeros_like(y_true),
                     y_mask=torch.zeros_like(y_true, dtype=torch.bool))

    was_training = model.training
    model.eval()
    bar = tqdm(total=steps + 1, desc=f"saia:{method}", disable=not progress)
    try:
        for t in range(steps + 1):
            t0 = time.perf_counter()
            batch = current_batch()
            draws = sample_predictive(model, batch, num_samples, seed=int(seed) * 100003 + t)
            scores = _target_scores(model, batch, draws.latent, y_true)
            row_nll[:, t] = scores["nll"].cpu().numpy()
            if classification:
                row_err[:, t] = (scores["y_class"].cpu() == y_true[:, 0].long().cpu()).numpy()
            else:
                pred = scores["y_mean"].cpu().numpy()
                if normaliser is not None:
                    pred = normaliser.inverse_target(pred)
                row_err[:, t] = ((np.asarray(pred, float) - np.asarray(y_true_orig, float)) ** 2)[:, 0]
            if t == steps:
                bar.update(1)
                break
            candidates = available & ~acquired
            r = reward(method, model, batch, draws, candidates, bins=bins, k=k, eddi_samples=eddi_samples,
                       generator=gen)
            choice = r.argmax(-1)                                                   # (N,)
            has = candidates.any(-1)
            idx = torch.nonzero(has)[:, 0]
            if bool(acquired[idx, choice[idx]].any()) or not bool(candidates[idx, choice[idx]].all()):
                raise RuntimeError("SAIA invariant violated: a chosen feature was already observed or unavailable")
            acquired[idx, choice[idx]] = True
            seconds[t] = time.perf_counter() - t0
            order[:, t] = np.where(has.cpu().numpy(), choice.cpu().numpy(), -1)
            rr = r.cpu().numpy()
            rewards[:, t] = np.where(np.isfinite(rr), rr, np.nan)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if max_steps is None and not bool((acquired == available).all()):
        raise RuntimeError("SAIA invariant violated: available features left unobserved at the end")

    coords = {"num_acquired": np.arange(steps + 1), "acquisition": np.arange(1, steps + 1), "row": np.arange(N),
              "feature": names}
    data = {"row_nll": (("row", "num_acquired"), row_nll),
            "target_nll": ("num_acquired", row_nll.mean(0)),
            "target_nll_std": ("num_acquired", row_nll.std(0)),
            "acquired": (("row", "acquisition"), order),
            "reward": (("row", "acquisition", "feature"), rewards),
            "seconds": ("acquisition", seconds)}
    if classification:
        data["row_correct"] = (("row", "num_acquired"), row_err)
        data["accuracy"] = ("num_acquired", row_err.mean(0))
        error_name, units = "accuracy", "fraction correct"
    else:
        data["row_sq_error"] = (("row", "num_acquired"), row_err)
        data["rmse"] = ("num_acquired", np.sqrt(row_err.mean(0)))
        error_name, units = "rmse", "original target units" if normaliser is not None else "normalised"
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({"method": method, "model": getattr(model, "name", type(model).__name__),
                     "num_samples": int(num_samples), "seed": int(seed), "bins": int(bins), "k": int(k),
                     "seconds_per_step_per_row": float(seconds.mean() / max(N, 1)) if steps else 0.0,
                     "error_name": error_name, "error_units": units,
                     "target_nll_domain": "normalised"})
    return ds


def saia_split(model, split, method: str = "mi", num_samples: int = 100, *, rows: Optional[int] = None,
               seed: int = 0, device=None, **options) -> xr.Dataset:
    """:func:`run_saia` on the first ``rows`` test rows of a ``ppl_vae.data.Split`` (all test rows by default),
    with the split's normaliser (error in original target units) and the schema's feature names. Rows without a
    known target are skipped. ``options`` go to :func:`run_saia`.

    Raises:
        ValueError: the split has no target.
    """
    device = device or next(model.parameters()).device
    truth = split.test.batch(device=device)
    if truth.y is None:
        raise ValueError("the split has no target column: nothing to acquire information about")
    known = truth.y_mask.bool()[:, 0]
    truth = truth[torch.nonzero(known)[:, 0]]
    if rows is not None:
        truth = truth[: int(rows)]
    names = list(model.schema.feature_names) if hasattr(model, "schema") else None
    ds = run_saia(model, truth, method, num_samples, normaliser=split.normaliser, feature_names=names, seed=seed,
                  **options)
    ds.attrs["fold"] = int(getattr(split, "fold", 0))
    return ds


def error_auc(ds: xr.Dataset) -> float:
    """Area under the error curve of a :func:`run_saia` result, normalised by the number of acquisitions (the
    mean of the trapezoid-integrated RMSE, or accuracy, over ``num_acquired ∈ [0, S]``); lower is better for RMSE,
    higher for accuracy. A run without acquisitions returns its single value."""
    name = ds.attrs.get("error_name", "rmse")
    v = np.asarray(ds[name].values, float)
    if v.size < 2:
        return float(v[0]) if v.size else float("nan")
    return float(np.trapezoid(v) / (v.size - 1)) if hasattr(np, "trapezoid") else float(np.trapz(v) / (v.size - 1))

"""Sliced kernelized Stein discrepancy (SKSD) between samples and an unnormalised target, batched over datapoints.

Source: W. Gong, Y. Li, J. M. Hernández-Lobato, "Sliced Kernelized Stein Discrepancy", ICLR 2021
(arXiv:2006.16531), §3: the sliced Stein discrepancy projects the score ``s_p(x) = ∇ log p(x)`` on a direction ``r``
and evaluates a kernel test function on the 1-D projection ``x^T g``; with an RKHS of such test functions the
supremum has a closed form (the paper's analytic form of (max)SKSD), an expectation over pairs of samples of

    h_{r,g}(x, x') = s_r(x) k(x^T g, x'^T g) s_r(x') + (r^T g) s_r(x) ∂_b k + (r^T g) s_r(x') ∂_a k
                     + (r^T g)^2 ∂_a ∂_b k,          with s_r(x) = s_p(x)^T r, a = x^T g, b = x'^T g,

summed over the slices ``(r_i, g_i)``. HH-VAEM (Peis et al. 2022, §3.5) uses it with ``g = r = I`` (coordinate
slices, no maximisation over g) to tune the inflation of the HMC initial proposal. We implement exactly that
default, plus arbitrary (e.g. learned) unit slice directions.

Estimator: with ``N`` samples per datapoint, the U-statistic ``1/(N(N-1)) Σ_{n≠m} h(x_n, x_m)`` (unbiased, can be
slightly negative) or the V-statistic ``1/N² Σ_{n,m} h`` (biased upwards by the diagonal). Kernel: 1-D RBF
``k(a, b) = exp(-(a-b)² / (2 ℓ²))`` with the median heuristic ``ℓ² = median_{n<m} (a_n - a_m)²`` per slice and
datapoint, detached from the graph (it is a hyper-parameter, not a function of the samples to differentiate).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["sksd", "median_bandwidth"]


def median_bandwidth(projected: torch.Tensor, min_value: float = 1e-8) -> torch.Tensor:
    """Median heuristic for a 1-D RBF kernel: median of the squared pairwise distances, per slice.

    Args:
        projected: ``(..., N)`` projected samples (``N ≥ 2``).
        min_value: floor on the returned squared bandwidth (degenerate samples).

    Returns:
        ``(...)`` squared bandwidth ``ℓ²``, detached.

    Raises:
        ValueError: fewer than 2 samples.
    """
    n = projected.shape[-1]
    if n < 2:
        raise ValueError("the median heuristic needs at least 2 samples")
    p = projected.detach()
    sq = (p.unsqueeze(-1) - p.unsqueeze(-2)) ** 2  # (..., N, N)
    iu = torch.triu_indices(n, n, offset=1, device=p.device)
    pairs = sq[..., iu[0], iu[1]]
    return pairs.median(dim=-1).values.clamp_min(min_value)


def sksd(
    samples: torch.Tensor,
    scores: torch.Tensor,
    directions: Optional[torch.Tensor] = None,
    u_statistic: bool = True,
    score_directions: Optional[torch.Tensor] = None,
    bandwidth: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sliced kernelized Stein discrepancy of ``N`` samples per datapoint against a target given by its score.

    Args:
        samples: ``(N, batch, dim)`` samples ``x_n`` (or ``(N, dim)`` for a single datapoint), ``N ≥ 2``.
            Differentiable: gradients flow to whatever produced the samples (e.g. the HMC proposal inflation).
        scores: same shape, the target score ``∇_x log p*(x_n)``. Pass scores computed with ``create_graph=True``
            to also differentiate through the score's dependence on the samples.
        directions: ``(num_slices, dim)`` sample-projection directions ``g_i`` (normalised here to unit length).
            Default: the coordinate axes ``g = I`` (HH-VAEM's choice).
        u_statistic: U-statistic (exclude ``n = m``, unbiased; default) or V-statistic.
        score_directions: ``(num_slices, dim)`` score-projection directions ``r_i`` (normalised); default: equal to
            ``directions`` (so ``r_i^T g_i = 1``).
        bandwidth: optional squared bandwidth ``ℓ²`` broadcastable to ``(batch, num_slices)``; default: median
            heuristic (detached).

    Returns:
        ``(batch,)`` SKSD per datapoint (a scalar for ``(N, dim)`` input), summed over slices. ≈ 0 when the samples
        follow the target; positive when they are shifted, over- or under-dispersed.

    Raises:
        ValueError: shapes disagree, ``N < 2``, or directions have the wrong width.

    Source: Gong et al., ICLR 2021, §3 (closed form of the kernelized sliced Stein discrepancy, h_{r,g} above).
    """
    if samples.shape != scores.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and scores {tuple(scores.shape)} must have the same shape")
    single = samples.dim() == 2
    if single:
        samples, scores = samples.unsqueeze(1), scores.unsqueeze(1)
    if samples.dim() != 3:
        raise ValueError(f"samples must be (N, batch, dim) or (N, dim), got shape {tuple(samples.shape)}")
    n, _, dim = samples.shape
    if n < 2:
        raise ValueError("SKSD needs at least 2 samples per datapoint")

    x = samples.movedim(0, -1)  # (batch, dim, N)
    s = scores.movedim(0, -1)
    if directions is None and score_directions is None:
        a = x  # (batch, S=dim, N): coordinate slices
        s_r = s
        rg = None
    else:
        g = directions if directions is not None else score_directions
        r = score_directions if score_directions is not None else g
        if g.dim() != 2 or g.shape[-1] != dim or r.shape != g.shape:
            raise ValueError(f"directions must be (num_slices, {dim}), got {tuple(g.shape)} / {tuple(r.shape)}")
        g = g / torch.linalg.vector_norm(g, dim=-1, keepdim=True)
        r = r / torch.linalg.vector_norm(r, dim=-1, keepdim=True)
        a = torch.einsum("sd,bdn->bsn", g.to(x), x)
        s_r = torch.einsum("sd,bdn->bsn", r.to(s), s)
        rg = (r * g).sum(-1).to(x)[:, None, None]  # (S, 1, 1)

    ell2 = median_bandwidth(a) if bandwidth is None else torch.as_tensor(bandwidth, dtype=a.dtype, device=a.device)
    ell2 = ell2.reshape(ell2.shape + (1, 1)) if bandwidth is None else ell2[..., None, None]
    d = a.unsqueeze(-1) - a.unsqueeze(-2)  # (batch, S, N, N): a_n - a_m
    kern = torch.exp(-0.5 * d * d / ell2)
    d_over = d / ell2
    ss = s_r.unsqueeze(-1) * s_r.unsqueeze(-2)
    sdiff = s_r.unsqueeze(-1) - s_r.unsqueeze(-2)
    if rg is None:
        h = kern * (ss + sdiff * d_over + 1.0 / ell2 - d_over * d_over)
    else:
        h = kern * (ss + rg * sdiff * d_over + rg * rg * (1.0 / ell2 - d_over * d_over))
    total = h.sum(dim=(-1, -2))  # (batch, S)
    if u_statistic:
        # diagonal n = m: k = 1, d = 0  ->  s_r(x_n)^2 + (r^T g)^2 / ℓ²
        c2 = 1.0 if rg is None else (rg * rg)[..., 0, 0]
        diag = (s_r * s_r).sum(-1) + n * c2 / ell2[..., 0, 0]
        out = (total - diag) / (n * (n - 1))
    else:
        out = total / (n * n)
    out = out.sum(-1)  # sum over slices
    return out[0] if single else out

"""Sliced kernelized Stein discrepancy: ≈ 0 for exact samples, larger for shifted or mis-scaled ones, differentiable."""
from __future__ import annotations

import pytest
import torch

from ppl_vae.infer.mcmc.sksd import median_bandwidth, sksd


def _normal(n=500, batch=4, dim=2, seed=0):
    return torch.randn(n, batch, dim, generator=torch.Generator().manual_seed(seed))


def test_sksd_near_zero_for_exact_samples():
    # target N(0, I): score -x. U-statistic is unbiased for 0; its sd at N = 500 is ~0.005 here.
    for seed in range(3):
        x = _normal(seed=seed)
        val = sksd(x, -x)
        assert val.shape == (4,)
        assert (val.abs() < 0.05).all(), val
    x = _normal()
    d = torch.randn(3, 2, generator=torch.Generator().manual_seed(9))
    assert (sksd(x, -x, directions=d).abs() < 0.05).all()


def test_sksd_grows_under_shift_and_scaling():
    x = _normal()
    exact = sksd(x, -x)
    for y in (x + 0.5, 2.0 * x, 0.5 * x):
        val = sksd(y, -y)  # samples from the wrong distribution, scores of N(0, I)
        assert (val > exact + 0.15).all(), val
    # a larger shift gives a larger discrepancy
    assert (sksd(x + 1.0, -(x + 1.0)) > sksd(x + 0.5, -(x + 0.5))).all()


def test_v_statistic_is_biased_upwards():
    x = _normal()
    assert (sksd(x, -x, u_statistic=False) > sksd(x, -x)).all()


def test_sksd_is_differentiable_in_the_scale():
    xi = _normal(n=400, batch=2)
    grads = {}
    for s0 in (0.5, 1.0, 2.0):
        log_s = torch.tensor(float(s0)).log().requires_grad_(True)
        x = log_s.exp() * xi
        val = sksd(x, -x).mean()
        (g,) = torch.autograd.grad(val, log_s)
        assert torch.isfinite(g)
        grads[s0] = float(g)
    # minimised at the true scale: descending from either side
    assert grads[0.5] < 0 < grads[2.0]
    assert abs(grads[1.0]) < 0.25 * min(abs(grads[0.5]), abs(grads[2.0]))


def test_shapes_and_errors():
    x = _normal(n=50, batch=1)
    assert sksd(x[:, 0], -x[:, 0]).dim() == 0
    with pytest.raises(ValueError):
        sksd(x, -x[:, :, :1])
    with pytest.raises(ValueError):
        sksd(x[:1], -x[:1])
    with pytest.raises(ValueError):
        sksd(x, -x, directions=torch.ones(2, 3))
    h = median_bandwidth(torch.arange(5.0))
    assert float(h) == 4.0  # squared distances 1,1,1,1,4,4,4,9,9,16 -> median 4

"""HMC with learnable step sizes: correctness of the integrator, the Metropolis correction, gradients, divergences."""
from __future__ import annotations

import math

import pytest
import torch

from ppl_vae.infer.mcmc import (
    HMCKernel,
    HMCSampler,
    HMCState,
    StepSizes,
    hmc_step,
    kinetic_energy,
    leapfrog,
    run_hmc,
    value_and_grad_fn,
)
from ppl_vae.testing.targets import TARGETS, correlated_gaussian, dual_moon, gaussian_ring, plot_samples, wave

MEAN = [1.0, -0.5]
COV = [[1.2, 0.7], [0.7, 0.5]]  # the HMC-tuning code's bivariate Gaussian, shifted


def test_sampler_with_mh_recovers_correlated_gaussian():
    target = correlated_gaussian(MEAN, COV)
    gen = torch.Generator().manual_seed(0)
    n, steps = 4000, 60
    # random step sizes per transition (a fixed integration time can resonate with a Gaussian's period)
    sched = 0.05 + 0.15 * torch.rand(steps, 2, generator=gen)
    init = torch.randn(n, 2, generator=gen) * 2.0  # far from the target: over-dispersed start
    trace = run_hmc(target, init, sched, 5, generator=gen)
    x = trace.position
    assert trace.num_divergent == 0
    assert 0.5 < trace.accept_rate < 1.0  # the MH correction is active (not every proposal accepted)
    mean, cov = torch.tensor(MEAN), torch.tensor(COV)
    # final states of independent chains: Monte Carlo standard errors of mean and covariance entries
    se_mean = (cov.diagonal() / n).sqrt()
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se_mean).all(), (x.mean(0), mean)
    assert ((torch.cov(x.T) - cov).abs() < 5 * se_cov).all(), (torch.cov(x.T), cov)


def test_leapfrog_is_reversible():
    torch.manual_seed(0)
    x0 = torch.randn(64, 2, dtype=torch.float64)
    r0 = torch.randn(64, 2, dtype=torch.float64)
    grad_fn = value_and_grad_fn(wave)
    _, g0 = grad_fn(x0)
    step = torch.tensor([0.03, 0.05], dtype=torch.float64)
    x1, r1, _, g1 = leapfrog(x0, r0, g0, step, 20, grad_fn)
    x2, r2, _, _ = leapfrog(x1, -r1, g1, step, 20, grad_fn)
    torch.testing.assert_close(x2, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(-r2, r0, atol=1e-5, rtol=0)
    # with a diagonal mass matrix too
    inv_m = torch.tensor([0.5, 2.0], dtype=torch.float64)
    x1, r1, _, g1 = leapfrog(x0, r0, g0, step, 20, grad_fn, inv_m)
    x2, r2, _, _ = leapfrog(x1, -r1, g1, step, 20, grad_fn, inv_m)
    torch.testing.assert_close(x2, x0, atol=1e-5, rtol=0)


def test_energy_error_shrinks_quadratically():
    target = correlated_gaussian(MEAN, COV)
    torch.manual_seed(1)
    x0 = torch.randn(500, 2, dtype=torch.float64) * 0.5 + torch.tensor(MEAN, dtype=torch.float64)
    r0 = torch.randn(500, 2, dtype=torch.float64)
    grad_fn = value_and_grad_fn(lambda x: target(x.float()).double())
    lp0, g0 = grad_fn(x0)
    errors = []
    for eps in (0.08, 0.04, 0.02):  # fixed integration time 0.64: global error O(eps^2)
        n = round(0.64 / eps)
        _, r1, lp1, _ = leapfrog(x0, r0, g0, torch.tensor(eps, dtype=torch.float64), n, grad_fn)
        dh = (kinetic_energy(r1) - lp1) - (kinetic_energy(r0) - lp0)
        errors.append(dh.abs().mean().item())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(3.0 < q < 5.5 for q in ratios), (errors, ratios)


def test_closed_form_gradient_matches_recorded_integrator():
    """hmc_step rebuilds the accepted proposal from a closed form in the step size; its value and gradient must
    equal those of the recorded integrator (position = position + step * momentum, detached ∇log p*)."""
    torch.manual_seed(2)
    x = torch.randn(300, 2, dtype=torch.float64)
    grad_fn = value_and_grad_fn(lambda z: wave(z))
    lp, g = grad_fn(x)
    xi = torch.randn_like(x)
    u = torch.rand(300, dtype=torch.float64)
    for inv_mass in (None, torch.tensor([0.7, 1.6], dtype=torch.float64, requires_grad=True)):
        log_step = torch.tensor([-2.5, -2.0], dtype=torch.float64, requires_grad=True)
        step = log_step.exp()
        new, info = hmc_step(HMCState(x, lp, g), step, 5, grad_fn, inverse_mass=inv_mass, noise=(xi, u))
        # reference: record the integrator itself
        mom = xi if inv_mass is None else xi * inv_mass.rsqrt()
        prop, _, _, _ = leapfrog(x, mom, g, step, 5, grad_fn, inv_mass)
        ref = torch.where(info.accepted.unsqueeze(-1), prop, x)
        torch.testing.assert_close(new.position, ref, atol=1e-12, rtol=0)
        assert 0 < info.accepted.sum() < 300
        w = torch.randn_like(x)
        params = [log_step] + ([] if inv_mass is None else [inv_mass])
        got = torch.autograd.grad((new.position * w).sum(), params, retain_graph=True)
        want = torch.autograd.grad((ref * w).sum(), params)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_gradients_reach_step_sizes_and_surrogate_is_exact():
    steps = StepSizes(4, 2, seed=0)
    init = torch.randn(256, 3, 2, generator=torch.Generator().manual_seed(0))
    trace = run_hmc(wave, init, steps(), 5, generator=torch.Generator().manual_seed(1))
    assert trace.energy.shape == trace.accept_prob.shape == trace.diverging.shape == (4, 256, 3)
    (g_true,) = torch.autograd.grad(wave(trace.position).mean(), steps.log_step_size, retain_graph=True)
    (g_sur,) = torch.autograd.grad(trace.surrogate_log_prob().mean(), steps.log_step_size)
    assert torch.isfinite(g_true).all() and (g_true.abs() > 0).all()
    torch.testing.assert_close(g_sur, g_true, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(trace.surrogate_log_prob(), wave(trace.position), rtol=1e-5, atol=1e-5)


def _steep(x):
    return -1e6 * (x**4).sum(-1)


def _nan_outside(x):
    r2 = (x**2).sum(-1)
    return torch.where(r2 < 4.0, -0.5 * r2, torch.full_like(r2, float("nan")))


@pytest.mark.parametrize("target", [_steep, _nan_outside])
def test_divergences_are_counted_and_rejected(target):
    gen = torch.Generator().manual_seed(0)
    init = 0.3 * torch.randn(500, 2, generator=gen)
    log_step = torch.full((3, 2), math.log(0.9), requires_grad=True)
    trace = run_hmc(target, init, log_step.exp(), 5, generator=gen, keep_chain=True)
    div = trace.diverging
    assert div.sum() > 50
    assert (trace.accept_prob[div] == 0).all()
    # a divergent transition keeps the previous state exactly (the whole proposal is rejected)
    stay = (trace.positions[1:] == trace.positions[:-1]).all(-1)
    assert stay[div].all()
    assert torch.isfinite(trace.position).all() and torch.isfinite(trace.log_prob).all()
    # no 0 * nan leaks into the step-size gradient
    (g,) = torch.autograd.grad(trace.surrogate_log_prob().mean(), log_step)
    assert torch.isfinite(g).all()


def test_energy_error_threshold_marks_divergence():
    target = correlated_gaussian([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]])
    init = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    big = torch.full((1, 2), 1.9)  # stable but inaccurate: energy errors of order 1
    loose = run_hmc(target, init, big, 5, generator=torch.Generator().manual_seed(1))
    tight = run_hmc(target, init, big, 5, generator=torch.Generator().manual_seed(1), divergence_threshold=0.1)
    assert loose.num_divergent == 0
    assert tight.num_divergent > 0


def test_step_sizes_init_and_validation():
    s = StepSizes(7, 3, seed=4)
    v = s()
    assert v.shape == (7, 3) and (v >= 0.02).all() and (v <= 0.05).all()
    torch.testing.assert_close(StepSizes(7, 3, seed=4)(), v)
    assert not torch.equal(StepSizes(7, 3, seed=5)(), v)
    with pytest.raises(ValueError):
        StepSizes(0, 3)
    with pytest.raises(ValueError):
        run_hmc(wave, torch.zeros(4, 2), torch.ones(3, 5), 2)
    with pytest.raises(ValueError):
        run_hmc(wave, torch.zeros(4, 2), torch.ones(3, 2), 0)
    with pytest.raises(ValueError):
        HMCKernel(wave, num_leapfrog=0)


def test_fixed_seed_gives_identical_samples():
    a = HMCSampler(dual_moon, 2, num_chains=64, sksd_chains=8, seed=3)
    b = HMCSampler(dual_moon, 2, num_chains=64, sksd_chains=8, seed=3)
    ha, hb = a.fit(3, progress=False), b.fit(3, progress=False)
    torch.testing.assert_close(a.sample(100), b.sample(100), rtol=0, atol=0)
    assert ha.objective.values.tolist() == hb.objective.values.tolist()
    c = HMCSampler(dual_moon, 2, num_chains=64, sksd_chains=8, seed=4)
    assert not torch.equal(c.sample(100), HMCSampler(dual_moon, 2, num_chains=64, sksd_chains=8, seed=3).sample(100))


def test_sampler_tuning_improves_objective_and_chains_have_stats():
    t = TARGETS["wave"]
    sampler = HMCSampler(t, 2, num_chains=500, sksd_chains=20, init_loc=t.init_loc, init_scale=t.init_scale,
                         lr=0.03, seed=0)
    hist = sampler.fit(40, progress=False)
    obj = hist.objective.values
    assert obj[-5:].mean() > obj[:5].mean() + 0.2
    assert set(hist.data_vars) == {"objective", "sksd", "accept_rate", "divergences", "ms_per_step"}
    assert (hist.ms_per_step > 0).all()
    assert sampler.sample(50).shape == (50, 2)
    chains, stats = sampler.sample_chains(3, 12, warmup=2)
    assert chains.shape == (3, 12, 2)
    assert stats["energy"].shape == stats["accept_prob"].shape == stats["diverging"].shape == (3, 12)
    assert stats["step_size"].shape == (12, 2)


def test_learned_mass_receives_gradient():
    sampler = HMCSampler(gaussian_ring, 2, num_chains=128, sksd_chains=0, init_scale=0.3, learn_mass=True, seed=0)
    before = sampler.log_mass.detach().clone()
    sampler.fit(2, progress=False)
    assert not torch.equal(before, sampler.log_mass.detach())
    assert torch.isfinite(sampler.log_mass).all()


@pytest.mark.slow
def test_compiled_sampler_matches_eager():
    t = TARGETS["dual_moon"]
    kw = dict(num_chains=200, sksd_chains=10, init_scale=t.init_scale, seed=1)
    eager, comp = HMCSampler(t, 2, **kw), HMCSampler(t, 2, compile=True, **kw)
    he, hc = eager.fit(3, progress=False), comp.fit(3, progress=False)
    assert comp.kernel.compiled
    torch.testing.assert_close(torch.tensor(hc.objective.values), torch.tensor(he.objective.values),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comp.step_sizes(), eager.step_sizes(), rtol=1e-4, atol=1e-6)


def test_targets_shapes_and_plot(tmp_path):
    x = torch.randn(5, 7, 2)
    for name, tgt in TARGETS.items():
        assert tgt(x).shape == (5, 7), name
        assert torch.isfinite(tgt(x)).all()
    # the ring and the Gaussian are normalised: integrate on a grid
    g = torch.linspace(-3, 3, 301)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1)
    area = (g[1] - g[0]) ** 2
    assert abs(float(gaussian_ring(grid).exp().sum() * area) - 1.0) < 1e-3
    s = TARGETS["dual_moon"].sample(2000, torch.Generator().manual_seed(0))
    assert s.shape == (2000, 2) and abs(float(s[:, 0].mean())) < 0.2  # symmetric modes at x1 = ±2
    with pytest.raises(ValueError):
        wave(torch.zeros(3, 3))
    fig = plot_samples("wave", torch.randn(100, 2), torch.randn(100, 2), tmp_path / "wave.png")
    assert (tmp_path / "wave.png").stat().st_size > 1000
    import matplotlib.pyplot as plt

    plt.close(fig)

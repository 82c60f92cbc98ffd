"""HMC with learnable step sizes: correctness of the integrator, the Metropolis correction, gradients, divergences."""
from __future__ import annotations

import math

import pytest
import torch

import warnings

import numpy as np

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
from ppl_vae.infer.mcmc.tuning import (acceptance_floor_loss, adapt_scale, backoff_step_sizes,
                                       expected_squared_change, step_size_loss)
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


def _inf_outside(x):
    """-inf outside the disc: a hard constraint, as an invalid value under a support check gives."""
    r2 = (x**2).sum(-1)
    return torch.where(r2 < 4.0, -0.5 * r2, torch.full_like(r2, -float("inf")))


@pytest.mark.parametrize("target", [_steep, _nan_outside, _inf_outside])
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
    a = HMCSampler(dual_moon, 2, num_chains=64, sksd_chains=8, seed=3, compile=False)
    b = HMCSampler(dual_moon, 2, num_chains=64, sksd_chains=8, seed=3, compile=False)
    ha, hb = a.fit(3, progress=False), b.fit(3, progress=False)
    torch.testing.assert_close(a.sample(100), b.sample(100), rtol=0, atol=0)
    assert ha.objective.values.tolist() == hb.objective.values.tolist()
    c = HMCSampler(dual_moon, 2, num_chains=64, sksd_chains=8, seed=4, compile=False)
    assert not torch.equal(c.sample(100), HMCSampler(dual_moon, 2, num_chains=64, sksd_chains=8, seed=3,
                                                     compile=False).sample(100))


def test_sampler_tuning_improves_objective_and_chains_have_stats():
    t = TARGETS["wave"]
    # the reference objective E log p*(ε_T) (wave: improper, so only the absolute scheme has a meaningful optimum)
    sampler = HMCSampler(t, 2, num_chains=500, sksd_chains=20, init_loc=t.init_loc, init_scale=t.init_scale,
                         lr=0.03, seed=0, compile=False, step_size_scheme="absolute")
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
    sampler = HMCSampler(gaussian_ring, 2, num_chains=128, sksd_chains=0, init_scale=0.3, learn_mass=True, seed=0,
                         compile=False)
    before = sampler.log_mass.detach().clone()
    sampler.fit(2, progress=False)
    assert not torch.equal(before, sampler.log_mass.detach())
    assert torch.isfinite(sampler.log_mass).all()


@pytest.mark.slow
def test_compiled_sampler_matches_eager():
    t = TARGETS["dual_moon"]
    kw = dict(num_chains=200, sksd_chains=10, init_scale=t.init_scale, seed=1)
    eager, comp = HMCSampler(t, 2, compile=False, **kw), HMCSampler(t, 2, **kw)  # compile=True is the default
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


# ----------------------------------------------------------------------------------- Metropolis-Hastings matters
def test_metropolis_hastings_corrects_the_variance_that_unadjusted_hmc_gets_wrong():
    """Large step sizes (φ ~ U(1.0, 1.6), L = 5 on N(0, I)): leapfrog alone samples a distribution ~70-80% too
    wide (its shadow Hamiltonian); only the accept/reject step brings the variance back to 1."""
    target = correlated_gaussian([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]])
    n = 4000
    variances = {}
    for mh in (True, False):
        gen = torch.Generator().manual_seed(0)
        sched = 1.0 + 0.6 * torch.rand(40, 2, generator=gen)
        init = torch.randn(n, 2, generator=gen)  # exact start: any drift is the kernel's fault
        trace = run_hmc(None, init, sched, 5, generator=gen, kernel=HMCKernel(target, 5, metropolis=mh))
        assert trace.num_divergent == 0
        variances[mh] = trace.position.var(0)
        frac = float(trace.accepted.float().mean())
        assert (0.6 < frac < 0.95) if mh else frac == 1.0
    se = math.sqrt(2.0 / n)  # standard error of a sample variance of N(0, 1)
    assert ((variances[True] - 1.0).abs() < 4 * se).all(), variances[True]
    assert (variances[False] > 1.2).all(), variances[False]  # the switch changes the variance by > 20%


# ----------------------------------------------------------------------------------- step-size schemes
def _diag_gaussian(dim):
    var = torch.logspace(-1, 1, dim)
    return correlated_gaussian(torch.zeros(dim), torch.diag(var)), var


def test_relative_scheme_follows_the_target_scale_where_the_reference_collapses():
    """Variances 0.1…10 from N(0, I), inflation not tuned: the relative scheme (whitened by the adapted scale,
    ChEES objective) recovers every variance within 10% with absolute steps growing with the target's scale; the
    reference E log p*(ε_T) objective shrinks the steps of the wide dimensions and under-disperses them."""
    target, var = _diag_gaussian(8)
    out = {}
    for scheme in ("relative", "absolute"):
        sampler = HMCSampler(target, 8, num_chains=400, sksd_chains=0, lr=0.03, seed=0, compile=False,
                             step_size_scheme=scheme, scale_adaptation_rate=0.1)
        sampler.fit(100, progress=False)
        ratio = sampler.sample(4000).var(0) / var
        steps = sampler.absolute_step_sizes().mean(0)
        corr = float(np.corrcoef(steps.log().numpy(), var.log().numpy())[0, 1])
        out[scheme] = (ratio, corr, sampler)
    ratio, corr, sampler = out["relative"]
    assert ((ratio - 1).abs() < 0.1).all(), ratio
    assert corr > 0.9, corr
    torch.testing.assert_close(sampler.scale, var.sqrt(), rtol=0.1, atol=0)  # the adapted metric
    ratio, corr, _ = out["absolute"]
    assert corr < 0 and ratio[-1] < 0.5, (ratio, corr)  # what the relative scheme fixes


def test_scale_is_a_diagonal_mass_matrix():
    """run_hmc(step φ, scale s) is leapfrog with M = diag(s)^-2: same chain as run_hmc(step φ, M⁻¹ = s²)."""
    target, _ = _diag_gaussian(3)
    s = torch.tensor([0.4, 1.0, 2.5])
    phi = torch.full((4, 3), 0.3)
    init = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    a = run_hmc(target, init, phi, 5, scale=s, generator=torch.Generator().manual_seed(1))
    b = run_hmc(target, init, phi, 5, inverse_mass=s**2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.position, b.position, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.energy, b.energy, rtol=1e-4, atol=1e-4)
    assert a.states.shape == (5, 300, 3) and a.accepted.shape == (4, 300)
    # per-datapoint scale (an encoder's σ): chains (C, batch, dim), scale (batch, dim); gradients reach φ and s
    log_phi = torch.full((4, 3), math.log(0.3), requires_grad=True)
    sigma = torch.rand(7, 3, generator=torch.Generator().manual_seed(2)).add(0.5).requires_grad_(True)
    tr = run_hmc(target, torch.randn(5, 7, 3), log_phi.exp(), 5, scale=sigma)
    loss = step_size_loss(tr, log_phi.exp(), "relative", center=torch.zeros(7, 3))
    g_phi, g_sigma = torch.autograd.grad(loss, [log_phi, sigma])
    assert torch.isfinite(g_phi).all() and (g_phi != 0).any() and torch.isfinite(g_sigma).all()
    sub = tr.select_chains(slice(0, 2))
    assert sub.position.shape == (2, 7, 3) and sub.states.shape == (5, 2, 7, 3) and sub.accept_prob.shape == (4, 2, 7)


def test_expected_squared_change_is_sin_squared_of_the_rotation():
    """For a whitened Gaussian at stationarity, one exact rotation by Θ changes the second moment by ChEES =
    sin²Θ per coordinate (Hoffman et al. 2021); invariant to the whitening scale; one chain needs a centre."""
    gen = torch.Generator().manual_seed(0)
    x, p = torch.randn(2, 200_000, 2, generator=gen)
    for theta in (0.3, math.pi / 2, 2.5):
        new = x * math.cos(theta) + p * math.sin(theta)
        val = expected_squared_change(torch.stack([x, new]))
        assert val.shape == (1, 2)
        torch.testing.assert_close(val, torch.full((1, 2), math.sin(theta) ** 2), rtol=0.03, atol=0.01)
    s = torch.tensor([0.1, 7.0])
    torch.testing.assert_close(expected_squared_change(torch.stack([x, new]) * s, scale=s),
                               expected_squared_change(torch.stack([x, new])), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):
        expected_squared_change(torch.stack([x[:1], new[:1]]))
    assert expected_squared_change(torch.stack([x[:1], new[:1]]), center=torch.zeros(2)).shape == (1, 2)


def test_adapt_scale_and_floor_loss_and_backoff():
    gen = torch.Generator().manual_seed(0)
    sd = torch.tensor([0.2, 3.0])
    s = torch.ones(2)
    for _ in range(60):
        s = adapt_scale(s, torch.randn(2000, 2, generator=gen) * sd, rate=0.2)
    torch.testing.assert_close(s, sd, rtol=0.05, atol=0)
    bad = torch.randn(100, 2, generator=gen)
    bad[0, 0] = float("nan")
    assert torch.isfinite(adapt_scale(torch.ones(2), bad)).all()
    # floor loss: gradient w.r.t. log φ_{t,d} is (target - mean acceptance of t)_+
    log_phi = torch.zeros(3, 2, requires_grad=True)
    acc = torch.tensor([[0.0, 0.0], [0.5, 0.7], [1.0, 1.0]])
    (g,) = torch.autograd.grad(acceptance_floor_loss(acc, log_phi.exp(), 0.6), log_phi)
    torch.testing.assert_close(g, torch.tensor([[0.6, 0.6], [0.0, 0.0], [0.0, 0.0]]))
    data = torch.zeros(3, 2)
    assert backoff_step_sizes(data, acc).tolist() == [True, False, False]
    torch.testing.assert_close(data[0], torch.full((2,), math.log(0.5)))
    with pytest.raises(ValueError):
        step_size_loss(None, log_phi, "bogus")


@pytest.mark.parametrize("scheme", ["relative", "absolute"])
def test_all_divergent_step_sizes_recover_by_gradient(scheme):
    """Step size 3 on N(0, I): every transition diverges. The acceptance-floor term is the only gradient; with the
    halving back-off disabled it alone brings the steps down and the acceptance back within 150 steps."""
    target = correlated_gaussian([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]])
    sampler = HMCSampler(target, 2, num_chains=200, sksd_chains=0, seed=0, compile=False, lr=0.01,
                         step_size_scheme=scheme, step_size_init=(3.0, 3.0), divergence_backoff=1.0)
    hist = sampler.fit(150, progress=False)
    assert hist.divergences.values[0] == 5 * 200  # 100% divergent at the start
    assert float(sampler.absolute_step_sizes().max()) < 2.0
    acc = hist.accept_rate.values
    assert acc[:10].max() < 0.05 and acc[-20:].mean() > 0.4, acc[::10]
    assert (acc > 0.3).argmax() < 100


def test_divergence_backoff_and_low_acceptance_warning():
    target = correlated_gaussian([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]])
    kw = dict(num_chains=100, sksd_chains=0, seed=0, compile=False, lr=0.001, step_size_init=(3.0, 3.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = HMCSampler(target, 2, **kw)  # halving back-off (default): recovers at once even at lr 0.001
        hist = fast.fit(30, progress=False)
    assert hist.accept_rate.values[-10:].mean() > 0.5
    slow = HMCSampler(target, 2, divergence_backoff=1.0, low_accept_warning=(0.05, 10), **kw)
    with pytest.warns(RuntimeWarning, match="acceptance rate below 0.05") as record:
        slow.fit(30, progress=False)
    assert sum("acceptance rate" in str(w.message) for w in record) == 1  # once

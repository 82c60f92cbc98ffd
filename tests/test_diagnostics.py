"""ArviZ conversion and diagnostics of HMC chains; the summary agrees with direct arviz_stats calls."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from arviz_stats import sampling_diagnostics as azd  # noqa: E402

from ppl_vae.diagnostics import (  # noqa: E402
    accepted_from_positions,
    plot_energy,
    plot_rank,
    plot_trace,
    sampler_table,
    summary,
    summary_table,
    to_arviz,
    trace_to_arviz,
)
from ppl_vae.infer.mcmc import run_hmc  # noqa: E402
from ppl_vae.testing.targets import correlated_gaussian  # noqa: E402


@pytest.fixture(scope="module")
def chains():
    target = correlated_gaussian([0.5, -1.0], [[1.0, 0.6], [0.6, 1.0]])
    gen = torch.Generator().manual_seed(0)
    sched = 0.1 + 0.2 * torch.rand(120, 2, generator=gen)
    init = torch.randn(4, 3, 2, generator=gen)  # 4 chains, 3 datapoints
    return run_hmc(target, init, sched, 5, generator=gen, keep_chain=True)


def test_to_arviz_dims(chains):
    dt = trace_to_arviz(chains, latent_names=["a", "b"])
    post = dt["posterior"]["latent"]
    assert post.dims == ("chain", "draw", "datapoint", "latent_dim")
    assert post.shape == (4, 120, 3, 2)
    assert list(post.coords["latent_dim"].values) == ["a", "b"]
    ss = dt["sample_stats"]
    for k in ("energy", "accept_prob", "diverging"):
        assert ss[k].dims == ("chain", "draw", "datapoint")
    assert ss["diverging"].dtype == bool
    assert ss["step_size"].dims == ("chain", "draw", "latent_dim")
    # without a datapoint dim
    dt2 = to_arviz(torch.randn(2, 10, 3), {"energy": torch.randn(2, 10)})
    assert dt2["posterior"]["latent"].dims == ("chain", "draw", "latent_dim")
    with pytest.raises(ValueError):
        to_arviz(torch.randn(2, 10, 3), {"energy": torch.randn(3, 10)})
    with pytest.raises(ValueError):
        to_arviz(torch.randn(10, 3))


def test_summary_agrees_with_arviz_stats(chains):
    dt = trace_to_arviz(chains)
    s = summary(dt)
    arr = chains.positions[1:].movedim(0, 1).numpy().astype(float)  # (chain, draw, datapoint, dim)
    np.testing.assert_allclose(s["r_hat"].values, azd.rhat(arr), rtol=1e-10)
    np.testing.assert_allclose(s["ess_bulk"].values, azd.ess(arr, method="bulk"), rtol=1e-10)
    np.testing.assert_allclose(s["ess_tail"].values, azd.ess(arr, method="tail", prob=(0.05, 0.95)), rtol=1e-10)
    np.testing.assert_allclose(s["mcse_mean"].values, azd.mcse(arr, method="mean"), rtol=1e-10)
    np.testing.assert_allclose(s["mean"].values, arr.mean((0, 1)), rtol=1e-10)
    # converged chains on a Gaussian: R-hat near 1, decent ESS, posterior mean close to the truth
    assert (s["r_hat"] < 1.05).all() and (s["ess_bulk"] > 50).all()
    assert np.abs(s["mean"].values - np.array([0.5, -1.0])).max() < 0.4
    # sampler stats: the mean acceptance probability and the fraction of accepted proposals, both per chain
    acc = chains.accept_prob.movedim(0, 1).numpy().mean(1)
    np.testing.assert_allclose(s["accept_prob"].values, acc, rtol=1e-6)
    moved = (chains.positions[1:] != chains.positions[:-1]).any(-1).movedim(0, 1).numpy().mean(1)
    np.testing.assert_allclose(s["accept_rate"].values, moved, rtol=1e-6)
    assert s["n_divergent"].dims == ("chain", "datapoint") and int(s["n_divergent"].sum()) == chains.num_divergent
    e = chains.energy.movedim(0, 1).numpy().astype(float)  # (chain, draw, datapoint)
    bfmi = np.square(np.diff(e, axis=1)).sum(1) / np.square(e - e.mean(1, keepdims=True)).sum(1)
    np.testing.assert_allclose(s["bfmi"].values, bfmi, rtol=0.05)
    assert "r_hat" in s.attrs["computed"]
    df = summary_table(dt)
    assert list(df.columns) == ["mean", "sd", "mcse_mean", "ess_bulk", "ess_tail", "r_hat"]
    assert len(df) == 6 and df.attrs["n_divergent"] == chains.num_divergent
    assert {"accept_prob", "accept_rate"} <= set(df.attrs)


def test_accept_rate_is_the_fraction_accepted_not_the_mean_probability():
    """Two chains, three draws: MH probabilities 0.5 everywhere; chain 0 accepted 3 of 3, chain 1 1 of 3."""
    x = np.zeros((2, 3, 1))
    stats = {"accept_prob": np.full((2, 3), 0.5), "accepted": np.array([[1, 1, 1], [1, 0, 0]], dtype=bool),
             "diverging": np.zeros((2, 3), dtype=bool), "energy": np.arange(6.0).reshape(2, 3)}
    s = summary(to_arviz(x, stats))
    np.testing.assert_allclose(s["accept_prob"].values, [0.5, 0.5])
    np.testing.assert_allclose(s["accept_rate"].values, [1.0, 1 / 3])
    table = sampler_table(to_arviz(x, stats))
    assert list(table.index) == [0, 1] and list(table.columns[:2]) == ["accept_prob", "accept_rate"]


def test_accepted_from_positions_matches_the_kernel_decision():
    from ppl_vae.infer.mcmc import HMCState, hmc_step, value_and_grad_fn

    target = correlated_gaussian([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]])
    gen = torch.Generator().manual_seed(3)
    pos = torch.randn(64, 2, generator=gen)
    grad_fn = value_and_grad_fn(target)
    lp, g = grad_fn(pos)
    state = HMCState(pos, lp, g)
    new, info = hmc_step(state, torch.full((2,), 1.6), 4, grad_fn, None, gen)
    decided = accepted_from_positions(torch.stack([pos, new.position.detach()]))[0]
    assert 0 < int(info.accepted.sum()) < 64                  # a step size that rejects some proposals
    assert torch.equal(decided, info.accepted)


def test_rhat_flags_stuck_chains():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 200, 2))
    x[0] += 3.0  # one chain in another place
    s = summary(to_arviz(x))
    assert (s["r_hat"] > 1.2).all()


def test_plots_save(chains, tmp_path):
    dt = trace_to_arviz(chains)
    for fn, name in ((plot_trace, "trace.png"), (plot_rank, "rank.png"), (plot_energy, "energy.png")):
        fig = fn(dt, tmp_path / name)
        assert (tmp_path / name).stat().st_size > 1000
        plt.close(fig)
    with pytest.raises(KeyError):
        plot_energy(to_arviz(torch.randn(2, 10, 3)))

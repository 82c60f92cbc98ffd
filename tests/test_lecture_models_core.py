"""The lecture models are plain Pyro programs on the generic core: HMC refinement, ArviZ diagnostics, the IW
log-likelihood, the collapse report, interpolation and checkpoints all come from their traces, with nothing written
per model. Models with an enumerated discrete latent (M2's unobserved label, VaDE's cluster) are refused by the HMC
potential with an error naming the site (HMC needs a continuous latent)."""
import numpy as np
import pyro
import pytest
import torch

from ppl_vae.experiments.lectures.common import binarise, label_batch, labelled_batches
from ppl_vae.infer import HMCObjective, HMCRefinedGuide, PotentialError, load_model, save_checkpoint
from ppl_vae.infer.collapse import collapse_report
from ppl_vae.infer.latents import latent_interpolation
from ppl_vae.infer.likelihood import iw_log_likelihood
from ppl_vae.models import build_model

SMALL = {"x_dim": 64, "hidden": 64}


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = binarise(torch.as_tensor(d.data, dtype=torch.float32) / 16.0)
    return x, torch.as_tensor(d.target, dtype=torch.long)


#: continuous-latent lecture models with the options that fit 8x8 digits
CONTINUOUS = {
    "vampprior": dict(SMALL, dim_z=4, num_pseudo=10),
    "cvae": dict(SMALL, dim_z=4),
    "poe-vae": dict(SMALL, dim_z=4),
}
DISCRETE = {"m2": ("y_unobserved", dict(SMALL, dim_z=4)), "vade": ("c", dict(SMALL, dim_z=4, num_clusters=10))}


def _trained(name, options, digits, steps=150):
    x, y = digits
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = build_model(name, **options)
    from ppl_vae.experiments.lectures.common import train_model

    train_model(model, labelled_batches(x[:1200], y[:1200], 128, seed=0), steps, lr=3e-3)
    return model


@pytest.mark.parametrize("name", list(CONTINUOUS))
def test_hmc_refines_a_lecture_model_from_its_trace(name, digits):
    x, y = digits
    model = _trained(name, CONTINUOUS[name], digits)
    batch = label_batch(x[1500:1510], y[1500:1510])
    refined = HMCRefinedGuide(model.model, model.guide, num_transitions=3, num_leapfrog=4)
    svi = pyro.infer.SVI(model.model, refined, pyro.optim.Adam({"lr": 3e-3}), HMCObjective(sksd_rows=4))
    losses = [svi.step(batch) for _ in range(15)]
    assert np.isfinite(losses).all()
    with torch.no_grad():
        bound = refined.bind(batch)
        pyro.set_rng_seed(0)
        refined.log_inflation.data.fill_(float(np.log(3.0)))   # over-dispersed starts, 3x the guide's sigma
        trace = refined.refine(batch, num_chains=64, keep_chain=True, potential=bound)
        start, end = bound(trace.positions[0]).mean(), bound(trace.positions[-1]).mean()
        refined.log_inflation.data.zero_()
    # HMC on the trace-derived target moves over-dispersed starts into the posterior's typical set
    assert end > start + 1.0
    assert float(trace.accept_prob.mean()) > 0.3
    from ppl_vae.diagnostics import summary, to_arviz

    chains, stats = refined.sample_chains(batch[:2], num_chains=4, num_draws=100, seed=1)
    rhat = summary(to_arviz(chains, stats))["r_hat"].to_numpy()
    assert chains.shape[:3] == (4, 100, 2) and np.isfinite(rhat).all() and np.median(rhat) < 1.1


@pytest.mark.parametrize("name", list(DISCRETE))
def test_hmc_potential_names_the_enumerated_site(name, digits):
    x, y = digits
    site, options = DISCRETE[name]
    model = build_model(name, **options)
    labelled = torch.zeros(10, dtype=torch.bool)
    refined = HMCRefinedGuide(model.model, model.guide, num_transitions=2, num_leapfrog=2)
    with pytest.raises(PotentialError, match=f"{site!r} is discrete"):
        refined.bind(label_batch(x[:10], y[:10], labelled))


@pytest.mark.parametrize("name", list(CONTINUOUS) + list(DISCRETE))
def test_generic_tools_run_on_every_lecture_model(name, digits, tmp_path):
    x, y = digits
    options = CONTINUOUS.get(name) or DISCRETE[name][1]
    model = build_model(name, **options)
    batch = label_batch(x[:40], y[:40])
    ll = iw_log_likelihood(model.model, model.guide, batch, num_particles=8)
    assert ll.shape == (40,) and torch.isfinite(ll).all()
    report = collapse_report(model.model, model.guide, batch)
    assert len(report) >= options["dim_z"]
    grid = latent_interpolation(model.model, model.guide, batch[:3], batch[3:6], num=4)
    assert grid.shape == (3, 4, 64)
    path = save_checkpoint(tmp_path / f"{name}.pt", model)
    again = load_model(path)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k

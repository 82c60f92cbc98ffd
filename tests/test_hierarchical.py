"""H-VAE(M), HH-VAE(M), MIWAE(M), KL schedules and the 28x28 conv nets (issue 10)."""
import math

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
import torch.nn.functional as F

from ppl_vae.data import from_dataframe, load_dataset
from ppl_vae.infer import Trainer, evaluate_split
from ppl_vae.infer.potential import TracePotential
from ppl_vae.models import MODELS, TABLE_MODELS, build_model
from ppl_vae.models.schedules import CyclicalKL, KLBalancer, LinearKL, make_kl_schedule
from ppl_vae.models.tabular.hierarchical import HHVAEM, HVAE
from ppl_vae.models.tabular.miwae import MIWAE, PerDatapointIWELBO
from ppl_vae.nn import ConvDecoder28, MaskedConvEncoder28

NEW_MODELS = ("h-vae", "h-vaem", "hh-vae", "hh-vaem", "miwae", "miwaem")


@pytest.fixture(scope="module")
def gaussian_table():
    """A small all-Gaussian table with a Gaussian target, 30% of x missing."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(60, 2))
    x = z @ rng.normal(size=(2, 3)) + 0.3 * rng.normal(size=(60, 3)) - 1.0     # negative: gaussian, not loggaussian
    df = pd.DataFrame(x, columns=["a", "b", "c"])
    df["y"] = z[:, 0] - z[:, 1] - 1.0 + 0.1 * rng.normal(size=60)
    df.iloc[:, :3] = df.iloc[:, :3].mask(rng.random((60, 3)) < 0.3)
    return from_dataframe(df, target="y")


@pytest.fixture(scope="module")
def yacht_split():
    return load_dataset("yacht").splits(n_splits=10, seed=0)[0]


def test_registered_as_table_models():
    for name in NEW_MODELS:
        assert name in MODELS and name in TABLE_MODELS


def test_hierarchy_log_joint_from_trace_equals_hand_computation(gaussian_table):
    """log p(x_O, y_O, ε) derived from the Pyro trace at a fixed ε (TracePotential, the HMC target) equals the
    equations of Peis et al. 2022 §3.2 computed by hand: Σ_l log N(ε_l; 0, I) + Σ_{d∈O} log N(x_d; dec(h_1), s)
    + log N(y; pred(x̂, m, h_1), s), with h_2 = ε_2, h_1 = f_μ(h_2) + f_σ(h_2) ⊙ ε_1."""
    torch.manual_seed(0)
    s = 0.5
    model = HVAE(gaussian_table.schema, layer_dims=(3, 2), hidden=[8], gaussian_scale=s, kl_balancing=False)
    batch = gaussian_table.splits(n_splits=2, seed=0)[0].train.batch()
    N = batch.size
    eps = torch.randn(N, 5, generator=torch.Generator().manual_seed(1))
    e1, e2 = eps[:, :3], eps[:, 3:]
    with torch.no_grad():
        mu, raw = model.hierarchy.nets[0](e2).chunk(2, -1)
        h1 = mu + (F.softplus(raw) + 1e-3) * e1
        loc = model.decoder(h1)                                             # (N, 3): fixed scale, one param per column
        m = batch.x_mask.bool()
        normal = torch.distributions.Normal
        lx = torch.where(m, normal(loc, s).log_prob(torch.where(m, batch.x, 0.0)), 0.0).sum(-1)
        x_hat = torch.where(m, batch.x, loc)
        y_loc = model.predictor.net(torch.cat([x_hat, m.float(), h1], -1))[:, 0]
        ly = torch.where(batch.y_mask[:, 0].bool(), normal(y_loc, s).log_prob(batch.y[:, 0]), 0.0)
        hand = normal(0.0, 1.0).log_prob(eps).sum(-1) + lx + ly
        bound = TracePotential(model.model, model.guide).bind(batch)
        assert [site.name for site in bound.sites] == ["eps_1", "eps_2"] and bound.latent_dim == 5
        from_trace = bound.trace_log_prob(eps.unsqueeze(0))[0]
        fast = model.log_joint(eps, batch)
    torch.testing.assert_close(from_trace, hand, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast, hand, rtol=1e-5, atol=1e-4)
    # the potential is also what the HH model's refined guide uses (one inflation per layer)
    hh = build_model("hh-vae", gaussian_table.schema, layer_dims=(3, 2), hidden=[8])
    assert hh.hmc_guide.inflation_kind == "layer" and hh.hmc_guide.log_inflation.numel() == 2


def test_layer_dims_default_and_conflict(gaussian_table):
    assert HVAE(gaussian_table.schema).layer_dims == [10, 5]
    assert HVAE(gaussian_table.schema, latent_dim=4).layer_dims == [4, 2]
    model = HVAE(gaussian_table.schema, layer_dims=[6, 4, 2])
    assert model.latent_dim == 6 and model.flat_latent_dim == 12
    assert model.decoder_input(torch.zeros(7, 5, 12)).shape == (7, 5, 6)
    with pytest.raises(ValueError, match="contradicts"):
        HVAE(gaussian_table.schema, latent_dim=3, layer_dims=[6, 2])
    with pytest.raises(TypeError, match="layer_dims"):
        HVAE(gaussian_table.schema, layer_dim=[6, 2])


def test_kl_schedules_values_at_given_steps():
    lin = LinearKL(warmup=100, beta=2.0)
    assert [lin(s) for s in (0, 49, 99, 500)] == [0.02, 1.0, 2.0, 2.0]
    assert lin.annealing(50) and not lin.annealing(99)
    cyc = CyclicalKL(total=100, cycles=2, ratio=0.5)                     # Fu et al. 2019: period 50, rise over 25
    assert [cyc(s) for s in (0, 12, 25, 49, 50, 62, 100)] == pytest.approx([0.0, 0.48, 1.0, 1.0, 0.0, 0.48, 1.0])
    assert cyc.annealing(60) and not cyc.annealing(30)
    assert make_kl_schedule("constant", beta=0.5)(7) == 0.5
    with pytest.raises(ValueError, match="cyclical"):
        make_kl_schedule("cosine")


def test_kl_balancing_weights_proportional_to_dim_times_kl():
    bal = KLBalancer([10, 5])
    assert bal.weights().tolist() == [0.5, 0.5]                             # uniform before any update
    w = bal.update(torch.tensor([1.0, 6.0], requires_grad=True))
    assert w.tolist() == pytest.approx([10 / 40, 30 / 40]) and not w.requires_grad
    assert float(w.sum()) == pytest.approx(1.0)


def test_kl_balancing_scales_the_layers_during_warmup(yacht_split):
    model = build_model("h-vae", load_dataset("yacht").schema, latent_dim=4, kl_warmup=50)
    stage = model.training_stages(100)[0]
    batch = next(yacht_split.train.loader(32, seed=0))
    stage.on_step(10)
    tr = pyro.poutine.trace(model.guide).get_trace(batch)
    scales = [tr.nodes[f"eps_{l}"]["scale"] for l in (1, 2)]
    assert sum(scales) == pytest.approx(2 * 11 / 50) and scales[0] != scales[1]
    stage.on_step(60)                                                       # warm-up over: plain weights
    tr = pyro.poutine.trace(model.guide).get_trace(batch)
    assert [tr.nodes[f"eps_{l}"]["scale"] for l in (1, 2)] == [1.0, 1.0]


def test_iw_bound_above_elbo_and_tightens_with_k(yacht_split):
    """E L_K is non-decreasing in K and L_1 is the ELBO (Burda et al. 2016, Theorem 1)."""
    torch.manual_seed(0)
    model = MIWAE(load_dataset("yacht").schema, latent_dim=3, iw_particles=1)
    batch = yacht_split.train.batch()
    loss = PerDatapointIWELBO()

    def bound(k, reps=8):
        model.iw_particles = k
        with torch.no_grad():
            return -np.mean([loss.loss(model.model, model.guide, batch) for _ in range(reps)]) / batch.size

    model.iw_particles = 1                                                  # one particle: Trace_ELBO's ELBO
    with torch.no_grad():
        elbo = -np.mean([pyro.infer.Trace_ELBO().loss(model.model, model.guide, batch) for _ in range(8)])
    elbo /= batch.size
    b1, b5, b50 = bound(1), bound(5), bound(50)
    assert abs(b1 - elbo) < 0.02 * abs(elbo) + 0.1                          # L_1 is the ELBO
    assert b5 > elbo and b50 > b5, (elbo, b1, b5, b50)


@pytest.mark.parametrize("name", NEW_MODELS)
def test_new_models_train_and_evaluate_without_nan(name, yacht_split):
    ds = load_dataset("yacht")
    opts = {"latent_dim": 4, "hidden": [16, 16], "kl_warmup": 5}
    if name.endswith("m"):
        opts["marginal_steps"] = 6
    if name.startswith("hh"):
        opts.update(hmc_steps=2, leapfrog_steps=2, sksd_chains=4, test_sweeps=1, hmc_fraction=0.3)
    torch.manual_seed(0)
    model = build_model(name, ds.schema, **opts)
    history = Trainer(model, seed=0, progress=False, batch_size=32).fit(yacht_split.train, 16)
    assert all(math.isfinite(h["loss"]) for h in history)
    if name.startswith("hh"):
        assert history[-1]["stage"] == "hmc"
    metrics = evaluate_split(model, yacht_split, num_samples=8)
    for key in ("imputation_nll", "target_nll", "rmse"):
        assert math.isfinite(metrics[key]), (name, key, metrics)


def test_hh_vaem_fast_log_joint_is_verified_against_the_trace(yacht_split):
    ds = load_dataset("yacht")
    model = HHVAEM(ds.schema, latent_dim=4, hidden=[16, 16], hmc_steps=1, leapfrog_steps=1)
    model.freeze_marginals()
    batch = next(yacht_split.train.loader(16, seed=0))
    model.hmc_guide.refine(batch, num_chains=2)
    report = model.hmc_guide.potential.check_report
    assert report is not None and report["max_relative_error"] < 1e-6


def test_conv_shapes():
    enc = MaskedConvEncoder28(32, extra_features=11)
    assert enc(torch.zeros(3, 2, 2 * 784 + 11)).shape == (3, 2, 32)
    with pytest.raises(ValueError, match="1579"):
        enc(torch.zeros(3, 784))
    dec = ConvDecoder28(6)
    assert dec(torch.zeros(4, 3, 6)).shape == (4, 3, 784)


def test_conv_table_model_on_images():
    """A VAE/H-VAE with network='conv28' on 784 bernoulli pixels and a 10-class target (MNIST-like)."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame((rng.random((40, 784)) < 0.3).astype(float), columns=[f"px{i}" for i in range(784)])
    df["label"] = np.arange(40) % 4                                           # < 10 levels: categorical
    ds = from_dataframe(df, target="label")
    assert ds.schema.target.likelihood == "categorical"
    split = ds.splits(n_splits=2, seed=0)[0]
    for name in ("vae", "h-vae"):
        model = build_model(name, ds.schema, latent_dim=4, hidden=[32], network="conv28")
        Trainer(model, seed=0, progress=False, batch_size=8).fit(split.train, 2)
        metrics = evaluate_split(model, split, num_samples=4)
        assert math.isfinite(metrics["imputation_nll"]) and 0.0 <= metrics["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="784"):
        build_model("vae", load_dataset("yacht").schema, network="conv28")


def test_hh_vaem_runs_from_the_cli(tmp_path, capsys):
    from ppl_vae.cli import main
    out = tmp_path / "run"
    code = main(["run", "hh-vaem", "--dataset", "yacht", "--splits", "1", "--steps", "12", "--num-samples", "5",
                 "--latent-dim", "4", "--out", str(out), "--no-progress"])
    assert code == 0
    assert "imputation_nll" in capsys.readouterr().out
    assert (out / "results.nc").exists()

"""Posterior-predictive sampling, the SAIA rewards (MI estimators, EDDI, random) and the acquisition loop."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ppl_vae.acquisition import (METHODS, error_auc, mi_histogram, mi_knn, mi_reward, reward, run_saia,
                                 saia_split)
from ppl_vae.data import from_dataframe
from ppl_vae.infer import PredictiveDraws, Trainer, sample_predictive
from ppl_vae.models import build_model


def _gaussian_pairs(rho, rows, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, k, generator=g, dtype=torch.float64)
    b = rho * a + math.sqrt(1 - rho ** 2) * torch.randn(rows, k, generator=g, dtype=torch.float64)
    return a, b


# ------------------------------------------------------------------ estimators
@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_mi_estimators_recover_bivariate_gaussian(rho):
    truth = -0.5 * math.log(1 - rho ** 2)
    a, b = _gaussian_pairs(rho, 48, 400)
    knn = mi_knn(a, b, generator=torch.Generator().manual_seed(0))
    assert knn.shape == (48,)
    assert abs(float(knn.mean()) - truth) < 0.05
    hist = mi_histogram(a, b, bins=10, miller_madow=True)
    assert abs(float(hist.mean()) - truth) < 0.12
    plain = mi_histogram(a, b, bins=6)                         # the reference's coarse plug-in: biased, ordered
    assert float(plain.mean()) > 0.5 * truth


def test_mi_estimators_near_zero_for_independent_samples():
    a, b = _gaussian_pairs(0.0, 48, 400, seed=1)
    assert float(mi_knn(a, b, generator=torch.Generator().manual_seed(0)).mean()) < 0.02
    assert abs(float(mi_histogram(a, b, bins=6, miller_madow=True).mean())) < 0.02
    c = torch.randint(0, 3, (48, 400), generator=torch.Generator().manual_seed(2)).double()
    assert float(mi_knn(a, c, b_discrete=True).mean()) < 0.02
    assert float(mi_histogram(c, c.flip(-1), a_discrete=True, b_discrete=True, miller_madow=True).mean()) < 0.03


def test_knn_matches_scikit_learn_per_row():
    from sklearn.feature_selection import mutual_info_classif, mutual_info_regression

    a, b = _gaussian_pairs(0.7, 4, 150, seed=3)
    ours = mi_knn(a, b)
    for i in range(4):
        ref = mutual_info_regression(a[i, :, None].numpy(), b[i].numpy(), n_neighbors=3, random_state=0)[0]
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)
    labels = (a > 0.3).double() + (a > -0.3).double()           # discrete target depending on a
    ours = mi_knn(b, labels, b_discrete=True)
    for i in range(4):
        ref = mutual_info_classif(b[i, :, None].numpy(), labels[i].numpy().astype(int), n_neighbors=3,
                                  random_state=0)[0]
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)


def test_estimators_validate_arguments():
    a, b = _gaussian_pairs(0.5, 2, 5)
    with pytest.raises(ValueError, match="k must be"):
        mi_knn(a, b, k=5)
    with pytest.raises(ValueError, match="bins"):
        mi_histogram(a, b, bins=1)


# ------------------------------------------------------------------ data and models
def _latent_table(n=300, seed=0):
    """Three latent factors; feature c copies factor 3 and y = 3 c: only c informs y."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    x = np.c_[z[:, 0], z[:, 1], z[:, 2], (z[:, 0] + z[:, 1]) / 2 ** 0.5] + 0.1 * rng.standard_normal((n, 4))
    df = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    df["k"] = np.digitize(z[:, 1], [-0.5, 0.5])               # categorical, 3 levels
    df["y"] = 3 * x[:, 2] + 0.1 * rng.standard_normal(n)
    return from_dataframe(df, target="y", warn=False)


@pytest.fixture(scope="module")
def trained():
    import pyro

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = _latent_table()
    split = data.splits(n_splits=5, seed=0)[0]
    model = build_model("vae", data.schema, latent_dim=3, hidden=(32,), predictor_hidden=(16,), gaussian_scale=0.1)
    Trainer(model, seed=0, progress=False, lr=1e-2, batch_size=100).fit(split.train, steps=200)
    return model, split


def test_batch_cache_follows_in_place_mask_edits():
    data = _latent_table(60)
    split = data.splits(n_splits=5, seed=0)[0]
    for name in ("vae", "vaem"):
        model = build_model(name, data.schema, latent_dim=2)
        batch = split.test_input()
        before = model.proposal(batch)[0].detach().clone()
        batch.x_mask[0, :] = False                               # in-place: hide every feature of row 0
        fresh = split.test_input()
        fresh.x_mask[0, :] = False
        after, expected = model.proposal(batch)[0], model.proposal(fresh)[0]
        assert torch.allclose(after, expected) and not torch.allclose(after[0], before[0])
        batch.x_mask = split.test_input().x_mask                 # field reassignment is seen too
        assert torch.allclose(model.proposal(batch)[0], before)


@pytest.mark.parametrize("name", ["vae", "hmc-vae"])
def test_sample_predictive_shapes_observed_cells_and_sampled_categories(name):
    data = _latent_table(80)
    split = data.splits(n_splits=5, seed=0)[0]
    opts = {"hmc_steps": 2, "leapfrog_steps": 2, "test_sweeps": 1} if name.startswith("hmc") else {}
    model = build_model(name, data.schema, latent_dim=2, **opts)
    batch = split.test_input()
    draws = sample_predictive(model, batch, 64, seed=3)
    assert isinstance(draws, PredictiveDraws)
    K, (N, D) = 64, batch.x.shape
    assert draws.x.shape == (K, N, D) and draws.y.shape == (K, N, 1) and draws.latent.shape == (K, N, 2)
    obs = batch.x_mask.bool()
    assert torch.equal(draws.x[:, obs], batch.x[obs].expand(K, -1))
    cat = data.schema.feature_names.index("k")
    hidden = ~obs[:, cat]
    codes = draws.x[:, hidden, cat]
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 2   # codes, not means
    assert all(len(torch.unique(codes[:, j])) > 1 for j in range(codes.shape[1]))       # sampled per draw
    again = sample_predictive(model, batch, 64, seed=3)
    assert torch.equal(again.x, draws.x) and torch.equal(again.y, draws.y)
    with pytest.raises(ValueError):
        sample_predictive(model, batch, 0)


# ------------------------------------------------------------------ SAIA
@pytest.mark.parametrize("method", ["mi", "mi-knn", "eddi"])
def test_informative_feature_is_acquired_first(trained, method):
    model, split = trained
    ds = saia_split(model, split, method, 50, rows=30, seed=0)
    first = ds.acquired.values[:, 0]
    assert (first == 2).mean() >= 0.8                            # feature "c" is the only one y depends on
    assert ds.rmse.values[1] < 0.5 * ds.rmse.values[0]


def test_saia_loop_invariants_with_unavailable_features_and_hmc():
    data = _latent_table(60)
    split = data.splits(n_splits=5, seed=0)[0]
    model = build_model("hmc-vae", data.schema, latent_dim=2, hmc_steps=2, leapfrog_steps=2, test_sweeps=1)
    truth = split.test.batch()[:6]
    truth.x_mask[0, 1] = False                                   # not measurable in this row
    truth.x_mask[3, :3] = False
    ds = run_saia(model, truth, "random", 20, normaliser=split.normaliser, seed=1)
    available = truth.x_mask.bool().numpy()
    steps = int(available.sum(1).max())
    assert ds.sizes["num_acquired"] == steps + 1 and ds.sizes["acquisition"] == steps
    order = ds.acquired.values
    for r in range(6):
        chosen = order[r][order[r] >= 0]
        assert len(chosen) == len(set(chosen)) == available[r].sum()   # each available feature once, then stop
        assert available[r, chosen].all()
        assert (order[r][len(chosen):] == -1).all()
    reward_at_chosen = np.take_along_axis(ds.reward.values[:, 0], order[:, :1], 1)
    assert np.isfinite(reward_at_chosen).all()
    assert np.isfinite(ds.rmse.values).all() and np.isfinite(ds.target_nll.values).all()
    assert ds.attrs["error_units"] == "original target units" and math.isfinite(error_auc(ds))


def test_saia_errors():
    data = _latent_table(40)
    split = data.splits(n_splits=5, seed=0)[0]
    model = build_model("vae", data.schema, latent_dim=2)
    truth = split.test.batch()
    with pytest.raises(ValueError, match="unknown acquisition method"):
        run_saia(model, truth, "entropy")
    with pytest.raises(ValueError, match="target"):
        run_saia(model, truth.replace(y_mask=torch.zeros_like(truth.y_mask)), "mi")
    draws = sample_predictive(model, split.test_input(), 5)
    with pytest.raises(ValueError, match="estimator"):
        mi_reward(model, draws, torch.ones(truth.x.shape, dtype=torch.bool), estimator="kde")
    assert set(METHODS) == {"mi", "mi-knn", "eddi", "random"}
    r = reward("random", model, split.test_input(), draws, torch.zeros(truth.x.shape, dtype=torch.bool))
    assert torch.isinf(r).all()


def test_cli_acquire_writes_netcdf_and_plot(tmp_path):
    import xarray as xr

    from ppl_vae.cli import main

    ck = tmp_path / "fit"
    assert main(["fit", "vae", "--dataset", "yacht", "--steps", "30", "--out", str(ck), "--no-progress"]) == 0
    out = tmp_path / "saia"
    assert main(["acquire", str(ck / "checkpoint.pt"), "--method", "mi", "--rows", "4", "--num-samples", "20",
                 "--out", str(out), "--no-progress"]) == 0
    ds = xr.open_dataset(out / "saia_mi.nc")
    assert ds.sizes["fold"] == 1 and ds.sizes["num_acquired"] == 7 and np.isfinite(ds.rmse.values).all()
    assert (out / "saia_mi.png").stat().st_size > 0 and "area under" in (out / "saia_mi.md").read_text()
    assert main(["acquire", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2

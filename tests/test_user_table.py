"""A user's own table end to end (issue 12): schema inference that warns or refuses, CSV reading options, DataFrame
in / DataFrame out imputation and prediction in original units, interval coverage, type errors, the impute /
predict commands, the thread policy and the README's "Your own CSV" section."""
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ppl_vae
from ppl_vae.cli import build_parser, main
from ppl_vae.data import from_csv, from_dataframe
from ppl_vae.data.dataset import load_schema_file, sniff_delimiter
from ppl_vae.data.schema import SchemaWarning, format_schema
from ppl_vae.data.tables import require_batch, require_split
from ppl_vae.errors import DataError, SchemaError
from ppl_vae.infer.frames import TrainedModel, frame_to_batch
from ppl_vae.threads import default_threads, small_work_threads

README = Path(__file__).resolve().parents[1] / "README.md"


# ---------------------------------------------------------------------- schema inference: warn or refuse
def _messages(record):
    return [str(w.message) for w in record if issubclass(w.category, SchemaWarning)]


def test_mostly_numeric_text_column_warns_naming_the_tokens_and_na_values_fix_it():
    vals = [str(v) for v in range(1, 19)] + ["missing", "?"]
    df = pd.DataFrame({"a": vals, "b": np.linspace(0, 1, 20)})
    with pytest.warns(SchemaWarning) as rec:
        ds = from_dataframe(df)
    msg = " ".join(_messages(rec))
    assert "'a'" in msg and "'missing'" in msg and "'?'" in msg and "na_values" in msg
    assert ds.schema.column("a").likelihood == "categorical"          # what happens without the fix
    fixed = from_dataframe(df.replace({"missing": np.nan, "?": np.nan}).astype({"a": float}))
    assert fixed.schema.column("a").likelihood == "loggaussian"


def test_id_like_and_date_like_and_row_number_columns_warn():
    n = 12
    df = pd.DataFrame({"model": [f"car{i}" for i in range(n)], "when": [f"2024-03-{i + 1:02d}" for i in range(n)],
                       "rownum": np.arange(1, n + 1), "x": np.r_[np.linspace(-1, 1, n - 1), 0.3],
                       "g": ["u", "v", "w"] * 4})
    with pytest.warns(SchemaWarning) as rec:
        from_dataframe(df)
    msgs = _messages(rec)
    assert any("'model'" in m and "identifier" in m for m in msgs)
    assert any("'when'" in m and "dates" in m for m in msgs)
    assert any("'rownum'" in m and "row number" in m for m in msgs)
    assert not any("'x'" in m or "'g'" in m for m in msgs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SchemaWarning)
        ds = from_dataframe(df, drop=["model", "when", "rownum"])       # dropping them silences the warnings
    assert ds.schema.feature_names == ["x", "g"]


def test_datetime_timedelta_duplicates_and_no_features_are_refused_with_plain_messages(tmp_path):
    base = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "g": ["a", "b", "a", "b"]})
    with pytest.raises(DataError, match=r"'t'.*datetime.*convert it to a number"):
        from_dataframe(base.assign(t=pd.date_range("2024-01-01", periods=4)))
    with pytest.raises(DataError, match=r"'d'.*timedelta"):
        from_dataframe(base.assign(d=pd.to_timedelta([1, 2, 3, 4], unit="D")))
    dup = pd.DataFrame([[1.0, 2.0, 3.0], [4.0, 5.0, 7.0]], columns=["a", "a", "b"])
    with pytest.raises(DataError, match=r"duplicated column name\(s\): \['a'\]"):
        from_dataframe(dup)
    path = tmp_path / "dup.csv"
    path.write_text("a,b,a\n1,2,3\n4,5,6\n7,8,9\n")
    with pytest.raises(DataError, match=r"duplicated column name\(s\) in the header.*\['a'\]"):
        from_csv(path)                                                   # pandas would silently say 'a.1'
    with pytest.raises(DataError, match="no feature columns besides the target 'x'"):
        from_dataframe(base[["x"]], target="x")


def test_semicolon_csv_is_sniffed_na_tokens_read_and_schema_overrides_apply(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"v": rng.normal(size=30).round(3), "k": rng.integers(0, 3, 30), "w": rng.normal(size=30)})
    df["v"] = df["v"].astype(object)
    df.loc[[3, 7], "v"] = "missing"
    path = tmp_path / "t.csv"
    df.to_csv(path, sep=";", index=False)
    assert sniff_delimiter(path) == ";"
    with pytest.warns(SchemaWarning, match="'missing'"):
        bad = from_csv(path)
    assert bad.num_features == 3 and bad.schema.column("v").likelihood == "categorical"
    ds = from_csv(path, na_values="missing")
    assert ds.schema.column("v").likelihood == "gaussian" and ds.features["v"].isna().sum() == 2
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"columns": {"k": "gaussian", "v": {"likelihood": "gaussian"}}, "target": "w"}))
    ds2 = from_csv(path, na_values=["missing"], schema=schema)
    assert ds2.schema.column("k").likelihood == "gaussian" and ds2.schema.target.name == "w"
    assert "k  gaussian" in format_schema(ds2.schema).replace("   ", "  ")
    yml = tmp_path / "s.yaml"
    yml.write_text("columns:\n  k: categorical\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(SchemaError, match="PyYAML is not installed"):
            load_schema_file(yml)
    else:
        assert load_schema_file(yml) == {"columns": {"k": "categorical"}}
    with pytest.raises(SchemaError, match="unknown key"):
        from_dataframe(df, schema={"colums": {}})


# ---------------------------------------------------------------------- DataFrame in, DataFrame out
def _gaussian_table(n=800, seed=1):
    """4 Gaussian columns from a 1-D factor, a 3-level text category and a regression target."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 1))
    x = z @ np.array([[1.0, -0.8, 0.6, 1.2]]) + 0.5 * rng.normal(size=(n, 4)) + np.array([10.0, -3.0, 0.0, 5.0])
    df = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    df["grp"] = np.where(z[:, 0] < -0.5, "low", np.where(z[:, 0] > 0.5, "high", "mid"))
    df["y"] = 2.0 * z[:, 0] + 0.3 * rng.normal(size=n)
    hide = rng.random((n, 5)) < 0.3
    masked = df.copy()
    for j, c in enumerate(["a", "b", "c", "d", "grp"]):
        masked.loc[hide[:, j], c] = np.nan
    return df, masked, hide


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    truth, masked, hide = _gaussian_table()
    tm = TrainedModel.fit(masked, "vae", target="y", steps=200, lr=1e-2, batch_size=256, latent_dim=2,
                          hidden=[32, 32], kl_warmup=0)
    return tm, truth, masked, hide


def test_impute_keeps_observed_cells_labels_and_dtypes(trained):
    tm, truth, masked, hide = trained
    frame = masked.iloc[:60].copy()
    frame.index = [f"r{i}" for i in range(60)]                    # a user's index survives
    frame["note"] = "keep me"                                      # a column the model does not know passes through
    out = ppl_vae.impute(tm, frame, num_samples=30)
    assert list(out.columns) == list(frame.columns) and list(out.index) == list(frame.index)
    obs = frame.notna()
    for c in frame.columns:
        pd.testing.assert_series_equal(out[c][obs[c]], frame[c][obs[c]])   # observed cells untouched
    assert not out[["a", "b", "c", "d", "grp"]].isna().any().any()
    assert set(out["grp"]) <= {"low", "mid", "high"}                # labels, not codes
    assert out["grp"].dtype == frame["grp"].dtype and out["a"].dtype == np.float64
    # the filled values are informative: better than the column means on the hidden cells
    h = hide[:60, 0]
    rmse = float(np.sqrt(((out["a"].to_numpy()[h] - truth["a"].to_numpy()[:60][h]) ** 2).mean()))
    base = float(np.sqrt(((masked["a"].mean() - truth["a"].to_numpy()[:60][h]) ** 2).mean()))
    assert rmse < base


def test_ninety_percent_intervals_cover_85_to_95_percent_on_a_gaussian_table(trained):
    tm, truth, masked, hide = trained
    out = tm.impute(masked, num_samples=200, interval=0.9)
    covered = []
    for j, c in enumerate(["a", "b", "c", "d"]):
        h = hide[:, j]
        t = truth[c].to_numpy()[h]
        covered.append((out[f"{c}_lower"].to_numpy()[h] <= t) & (t <= out[f"{c}_upper"].to_numpy()[h]))
        assert (out[f"{c}_lower"][~h] == masked[c][~h]).all()       # an observed cell's interval is the value
    coverage = float(np.concatenate(covered).mean())
    assert 0.85 <= coverage <= 0.95, coverage
    assert {"grp_prob"} <= set(out.columns) and out["grp_prob"].between(0, 1).all()


def test_multiple_imputations_long_and_xarray(trained):
    tm, _, masked, hide = trained
    frame = masked.iloc[:5]
    long = tm.impute(frame, num_samples=4, draws="long")
    assert long.index.names == ["draw", "row"] and len(long) == 20
    ds = tm.impute(frame, num_samples=4, draws="xarray")
    assert ds["a"].dims == ("draw", "row") and ds.sizes == {"draw": 4, "row": 5}
    a = ds["a"].values
    obs = frame["a"].notna().to_numpy()
    assert (a[:, obs] == frame["a"].to_numpy()[obs]).all()          # observed: the same in every draw
    if (~obs).any():
        assert a[:, ~obs].std(0).min() > 0                          # missing: genuinely different draws
    assert set(np.unique(ds["grp"].values)) <= {"low", "mid", "high"}


def test_predict_regression_and_classification(trained):
    tm, truth, masked, _ = trained
    pred = ppl_vae.predict(tm, masked.drop(columns="y"), num_samples=100, interval=0.9)
    assert list(pred.columns) == ["y_mean", "y_std", "y_lower", "y_upper"]
    assert (pred["y_lower"] <= pred["y_mean"]).all() and (pred["y_mean"] <= pred["y_upper"]).all()
    rmse = float(np.sqrt(((pred["y_mean"] - truth["y"]) ** 2).mean()))
    assert rmse < 0.8 * truth["y"].std()
    # classification on the text column
    clf = TrainedModel.fit(masked.drop(columns="y").iloc[:300], "vae", target="grp", steps=60, lr=1e-2,
                           latent_dim=2, hidden=[16, 16], kl_warmup=0)
    p = clf.predict(masked.iloc[:50].drop(columns="y"), num_samples=20)
    probs = p[["grp_prob_high", "grp_prob_low", "grp_prob_mid"]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert set(p["grp_predicted"]) <= {"low", "mid", "high"}


def test_wrong_types_raise_type_errors_that_say_what_to_pass(trained):
    tm, _, masked, _ = trained
    with pytest.raises(TypeError, match="normaliser="):
        ppl_vae.impute(tm.model, masked)                            # a bare model cannot map original units
    split = from_dataframe(masked, target="y").splits(n_splits=2, seed=0)[0]
    with pytest.raises(TypeError, match=r"got a Split; pass the original rows"):
        ppl_vae.impute(tm, split)
    with pytest.raises(TypeError, match="first argument is the model"):
        ppl_vae.impute(masked, tm)
    with pytest.raises(TypeError, match=r"expects a ppl_vae Batch.*ppl_vae.impute"):
        require_batch(masked, "sample_predictive")
    with pytest.raises(TypeError, match="dataset.splits"):
        require_split(from_dataframe(masked, target="y"), "evaluate_split")
    # a Batch still goes to the tensor-level imputation, and the frame API accepts a bare model + normaliser
    batch = frame_to_batch(masked.iloc[:4], tm.normaliser)
    assert ppl_vae.impute(tm, batch, 5).shape == (4, 5)
    out = ppl_vae.impute(tm.model, masked.iloc[:4], 5, normaliser=tm.normaliser)
    assert out.shape == (4, 6)
    with pytest.raises(SchemaError, match=r"lacks the model's feature column\(s\) \['b'\]"):
        tm.impute(masked.drop(columns="b"))


# ---------------------------------------------------------------------- command line
def test_impute_and_predict_commands_and_run_lists_only_table_models(tmp_path, capsys):
    truth, masked, _ = _gaussian_table(n=120, seed=3)
    masked["id"] = [f"row{i}" for i in range(120)]
    masked["a"] = masked["a"].astype(object).where(masked["a"].notna(), "n/a")
    path = tmp_path / "in.csv"
    masked.to_csv(path, sep=";", index=False)
    out = tmp_path / "run"
    assert main(["fit", "vae", "--csv", str(path), "--target", "y", "--folds", "2", "--steps", "5", "--latent-dim",
                 "2", "--na-values", "n/a", "--drop", "id", "--beta", "0.5", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "grp" in printed.out and "categorical" in printed.out and "3 levels: high, low, mid" in printed.out
    assert "warning" not in printed.err
    ckpt = out / "checkpoint.pt"
    assert TrainedModel.load(ckpt).model.beta == 0.5
    assert main(["impute", str(ckpt), "--csv", str(path), "--na-values", "n/a", "--out", str(tmp_path / "f.csv"),
                 "--num-samples", "8", "--intervals", "0.9", "--draws", str(tmp_path / "d.nc")]) == 0
    filled = pd.read_csv(tmp_path / "f.csv")
    assert filled[["a", "b", "grp"]].notna().all().all() and "a_lower" in filled and "grp_prob" in filled
    assert (filled["id"] == masked["id"]).all()
    import xarray as xr

    with xr.open_dataset(tmp_path / "d.nc", engine="scipy") as ds:
        assert ds.sizes["draw"] == 8
    assert main(["predict", str(ckpt), "--csv", str(path), "--na-values", "n/a", "--out",
                 str(tmp_path / "p.csv"), "--num-samples", "8"]) == 0
    pred = pd.read_csv(tmp_path / "p.csv")
    assert {"y_mean", "y_std", "y_lower", "y_upper"} <= set(pred.columns) and len(pred) == 120
    capsys.readouterr()
    assert main(["fit", "ug-vae", "--dataset", "yacht", "--out", str(tmp_path / "x")]) == 2
    assert "ugvae-experiment" in capsys.readouterr().err
    assert main(["run", "vae", "--dataset", "mnist", "--steps", "1"]) == 2
    assert "image data set" in capsys.readouterr().err
    run_help = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "ug-vae," not in run_help.split("model")[1].split("\n\n")[0] or "ugvae-experiment" in run_help
    for cmd in ("evaluate", "diagnose", "impute", "predict", "run", "fit"):
        assert "--threads" in build_parser()._subparsers._group_actions[0].choices[cmd].format_help()


# ---------------------------------------------------------------------- threads
def test_thread_policy_is_scoped_and_import_has_no_side_effect(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("PPL_VAE_THREADS", raising=False)
    assert default_threads() == 1
    with small_work_threads(2) as n:
        assert n == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    monkeypatch.setenv("PPL_VAE_THREADS", "torch")
    assert default_threads() is None
    monkeypatch.setenv("PPL_VAE_THREADS", "zero")
    with pytest.raises(ValueError, match="PPL_VAE_THREADS"):
        default_threads()
    import ast                                     # no module of the package sets threads at import time
    for path in Path(ppl_vae.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                assert "set_num_threads" not in ast.unparse(node), path


# ---------------------------------------------------------------------- README
def test_readme_your_own_csv_section_runs():
    text = README.read_text()
    section = text.split("## Your own CSV", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("steps=2000", "steps=20").replace("num_samples=200", "num_samples=10")
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    df, filled, draws, pred = scope["df"], scope["filled"], scope["draws"], scope["pred"]
    obs = df["Ozone"].notna()
    assert (filled.loc[obs, "Ozone"] == df.loc[obs, "Ozone"]).all() and filled["Ozone"].notna().all()
    assert {"Ozone_lower", "Ozone_upper"} <= set(filled.columns) and draws.sizes["draw"] == 20
    assert {"Temp_mean", "Temp_std", "Temp_lower", "Temp_upper"} == set(pred.columns)
    for cmd in re.findall(r"^(ppl-vae (?:impute|predict) .*?)(?:\s+#.*)?$", section, re.M):
        build_parser().parse_args(cmd.split()[1:])                  # the commands shown parse


def test_point_estimate_is_robust_for_log_gaussian_columns():
    """The mean of back-transformed log-Gaussian draws is dominated by the tail; "auto" takes their median."""
    import numpy as np

    from ppl_vae.infer.frames import point_estimate

    rng = np.random.default_rng(0)
    draws = np.expm1(rng.normal(np.log1p(50.0), 3.0, size=(100, 200)))   # (K, N) wide log-scale predictive
    auto = point_estimate(draws, "loggaussian")
    assert np.allclose(auto, np.median(draws, 0))
    assert abs(float(np.median(auto)) - 50.0) < 15.0
    assert float(np.median(point_estimate(draws, "loggaussian", "mean"))) > 500.0
    gauss = rng.normal(3.0, 1.0, size=(100, 50))
    assert np.allclose(point_estimate(gauss, "gaussian"), gauss.mean(0))
    with pytest.raises(ValueError):
        point_estimate(gauss, "gaussian", "mode")

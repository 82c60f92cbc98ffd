"""`ppl-vae` end to end on small real data, and every documented bad input."""
import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from ppl_vae.cli import main


def test_datasets_lists_shapes_and_types(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("boston"))
    assert "506" in line and "13" in line and "loggaussian" in line and "categorical" in line


def test_run_smoke_on_yacht(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "vaem", "--dataset", "yacht", "--splits", "2", "--steps", "60", "--num-samples", "30",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "imputation_nll" in printed and "mean ± std" in printed
    res = xr.open_dataset(out / "results.nc", engine="scipy")
    assert res.sizes["split"] == 2
    for key in ("imputation_nll", "target_nll", "rmse"):
        assert np.isfinite(res[key].values).all()
    assert (out / "fold0" / "checkpoint.pt").exists() and (out / "fold1" / "checkpoint.pt").exists()


def test_fit_then_evaluate(tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(["fit", "vae", "--dataset", "yacht", "--fold", "1", "--steps", "40", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "checkpoint.pt"), "--num-samples", "20"]) == 0
    lines = dict(l.split(":", 1) for l in capsys.readouterr().out.splitlines() if ":" in l)
    assert math.isfinite(float(lines["imputation_nll".rjust(22)]))


def _csv(tmp_path, df):
    path = tmp_path / "user.csv"
    df.to_csv(path, index=False)
    return str(path)


@pytest.fixture
def user_frame():
    rng = np.random.default_rng(0)
    n = 120
    df = pd.DataFrame({"temp": rng.normal(size=n), "rain": rng.gamma(2.0, size=n),
                       "kind": rng.choice(["a", "b", "c"], size=n), "y": rng.normal(size=n)})
    df.loc[rng.random(n) < 0.2, "temp"] = np.nan
    df.loc[rng.random(n) < 0.1, "y"] = np.nan
    return df


def test_user_csv_with_missing_values(tmp_path, user_frame, capsys):
    code = main(["run", "vae", "--csv", _csv(tmp_path, user_frame), "--target", "y", "--splits", "1", "--steps",
                 "30", "--num-samples", "10", "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run", "vaem", "--dataset", "bostonn"], "unknown data set 'bostonn'.*boston"),
    (["run", "vame", "--dataset", "boston"], "unknown model 'vame'.*vaem"),
    (["run", "vae", "--dataset", "boston", "--splits", "11"], "--splits"),
    (["run", "vae"], "exactly one of"),
    (["evaluate", "/nonexistent/checkpoint.pt"], "no checkpoint"),
])
def test_bad_input_exits_2_with_message(argv, message, capsys):
    assert main(argv) == 2
    import re
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("mutate, message", [
    (lambda df: df.assign(temp=np.nan), "temp"),                          # all-NaN column
    (lambda df: df.assign(rain=df.rain.where(df.index != 3, np.inf)), "rain"),  # inf is not 'missing'
])
def test_bad_user_data_names_the_column(tmp_path, user_frame, mutate, message, capsys):
    code = main(["run", "vae", "--csv", _csv(tmp_path, mutate(user_frame)), "--target", "y", "--splits", "1",
                 "--steps", "5", "--no-progress", "--out", str(tmp_path / "o")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_target_column(tmp_path, user_frame, capsys):
    code = main(["run", "vae", "--csv", _csv(tmp_path, user_frame), "--target", "price", "--steps", "5",
                 "--no-progress", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "price" in capsys.readouterr().err


def test_target_likelihood_option_is_trained_stored_and_refused_where_it_cannot_apply(tmp_path, capsys):
    from ppl_vae.infer.checkpoint import load_checkpoint
    out = tmp_path / "fit"
    assert main(["fit", "vae", "--dataset", "yacht", "--steps", "20", "--target-likelihood", "loggaussian",
                 "--out", str(out), "--no-progress"]) == 0
    assert "residuary_resistance   loggaussian   (target)" in capsys.readouterr().out
    meta = load_checkpoint(out / "checkpoint.pt")["metadata"]
    assert meta["data"]["target_likelihood"] == "loggaussian"
    assert meta["normaliser"]["schema"]["target"]["likelihood"] == "loggaussian"
    assert main(["evaluate", str(out / "checkpoint.pt"), "--num-samples", "10"]) == 0
    assert "target_nll" in capsys.readouterr().out
    code = main(["fit", "vae", "--dataset", "wine", "--steps", "5", "--target-likelihood", "loggaussian",
                 "--out", str(tmp_path / "w"), "--no-progress"])
    assert code == 2 and "categorical" in capsys.readouterr().err


def test_ugvae_experiment_subcommand(tmp_path, capsys):
    assert main(["ugvae-experiment", "--smoke", "--experiment", "interpolation", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "UG-VAE experiments" in out
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())

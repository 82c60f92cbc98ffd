"""The benchmarks' smoke modes run and write their tables (full runs are outside the test suite)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name):
    path = ROOT / "benchmarks" / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{path.name} not present")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_uci_table_smoke(tmp_path):
    bench = load_benchmark("uci_table")
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "uci_table_smoke.md").read_text()
    assert "| yacht | vae |" in table and "| yacht | vaem |" in table and "HH-VAEM (paper)" in table
    assert "nan" not in table.lower()
    # an inference-only change re-evaluated from the checkpoints, then the table rebuilt from the cells
    import xarray as xr
    cell = tmp_path / "uci" / "paper" / "vaem-yacht"
    before = xr.load_dataset(cell / "results.nc", engine="scipy")
    assert float(before.imputation_nll_code_mean[0]) != float(before.imputation_nll[0])
    assert load_benchmark("reevaluate").main([str(cell), "--num-samples", "5", "--set", "code_likelihood=mean",
                                              "--write"]) == 0
    after = xr.load_dataset(cell / "results.nc", engine="scipy")
    assert float(after.imputation_nll[0]) == pytest.approx(float(before.imputation_nll_code_mean[0]), abs=1e-6)
    # an option the model reads at construction (HMC test sweeps) takes effect too; an unknown one is refused
    hh = tmp_path / "uci" / "paper" / "hh-vaem-yacht"
    reeval = load_benchmark("reevaluate")
    base, _ = reeval.evaluate(hh / "fold0" / "checkpoint.pt", 5, [])
    swept, _ = reeval.evaluate(hh / "fold0" / "checkpoint.pt", 5, ["test_sweeps=3"])
    assert base["imputation_nll"] == pytest.approx(float(xr.load_dataset(hh / "results.nc", engine="scipy")
                                                         .imputation_nll[0]), abs=1e-6)
    assert swept["imputation_nll"] != pytest.approx(base["imputation_nll"], abs=1e-6)
    with pytest.raises(SystemExit, match="test_sweep"):
        reeval.evaluate(hh / "fold0" / "checkpoint.pt", 5, ["test_sweep=3"])
    with pytest.raises(SystemExit, match="'latent_dim' is a training option"):
        reeval.evaluate(hh / "fold0" / "checkpoint.pt", 5, ["latent_dim=3"])
    assert bench.main(["--smoke", "--collect", "--out", str(tmp_path), "--name", "rebuilt"]) == 0
    rebuilt = (tmp_path / "rebuilt.md").read_text()
    assert f"| yacht | vaem | {float(after.imputation_nll[0]):.2f} ± 0.00 |" in rebuilt


def test_uci_paper_protocol_uses_the_reference_settings_and_data():
    """The paper's "Wine" is scikit-learn's 3-cultivar table (the reference calls load_wine), and the paper protocol
    takes the reference's per-data-set latent width / batch size / T."""
    from ppl_vae.data import load_dataset
    from ppl_vae.models import build_model

    bench = load_benchmark("uci_table")
    assert set(bench.UCI) <= set(bench.PAPER["hh-vaem"]) and "wine-quality-red" not in bench.PAPER["hh-vaem"]
    assert load_dataset("wine").schema.target.likelihood == "categorical"
    kw, batch = bench.protocol_kwargs("paper", "yacht", "hh-vaem")
    assert batch == 20 and kw == {"gaussian_scale": 0.1 ** 0.5, "latent_dim": 4, "hmc_steps": 5,
                                  "marginal_steps": 1000, "marginal_lr": 1e-3, "marginal_kl_warmup": 0}
    # ...and the reference's stage 1 reaches the optimiser: 1000 steps at 1e-3 (ours: max(lr, 3e-3))
    from ppl_vae.models import build_model as _build
    schema = load_dataset("yacht").schema
    first = _build("hh-vaem", schema, **kw).training_stages(5000, lr=1e-3)[0]
    assert (first.name, first.steps, first.lr) == ("marginal", 1000, 1e-3)
    assert _build("vaem", schema, marginal_steps=10).training_stages(5000, lr=1e-3)[0].lr == 3e-3
    kw, batch = bench.protocol_kwargs("paper", "boston", "vae")
    assert batch == 100 and kw == {"gaussian_scale": 0.1 ** 0.5, "latent_dim": 10}
    assert bench.protocol_kwargs("default", "yacht", "hh-vaem") == ({}, 128)
    # the reference's VAEM family models regression targets as loggaussian, its VAE family as gaussian
    data, spec = bench.protocol_data("paper", load_dataset("boston"), "hh-vaem")
    assert data.schema.target.likelihood == "loggaussian" and spec == {"name": "boston",
                                                                         "target_likelihood": "loggaussian"}
    for protocol, model, name in (("paper", "hmc-vae", "boston"), ("default", "vaem", "boston"),
                                  ("paper", "vaem", "wine")):
        data, spec = bench.protocol_data(protocol, load_dataset(name), model)
        assert data.schema.target.likelihood == load_dataset(name).schema.target.likelihood and spec == {"name": name}
    assert bench.parse_overrides(["test_sweeps=1"], ["vaem", "hh-vaem"]) == {"vaem": {}, "hh-vaem": {"test_sweeps": 1}}
    with pytest.raises(SystemExit, match="test_sweep"):
        bench.parse_overrides(["test_sweep=1"], ["vaem", "hh-vaem"])
    for model in bench.VAEM_FAMILY + bench.VAE_FAMILY:      # every option exists on the model's typed config
        build_model(model, load_dataset("yacht").schema, **bench.protocol_kwargs("paper", "wine", model)[0])


def test_uci_targets_are_counted_from_the_table():
    """The paper-protocol targets (HH-VAEM vs the paper, best-or-tied in the family, HMC vs Gaussian guide)."""
    import numpy as np
    import xarray as xr
    bench = load_benchmark("uci_table")
    models, data = ["vaem", "h-vaem", "hh-vaem"], ["yacht", "boston"]
    paper_yacht, paper_boston = bench.PAPER["hh-vaem"]["yacht"], bench.PAPER["hh-vaem"]["boston"]
    values = {k: np.zeros((2, 3, 2)) for k in bench.METRICS}
    # yacht: hh-vaem below the paper on both NLLs and lowest of the three; boston: above the paper, and clearly
    # worse than vaem on the target (a gap far outside the fold spread), tied with h-vaem.
    values["imputation_nll_code_mean"][0] = [[3.0, 3.1], [3.0, 3.1], [paper_yacht[0][0] - 0.1] * 2]
    values["target_nll"][0] = [[0.9, 0.9], [0.8, 0.8], [paper_yacht[1][0] - 0.1] * 2]
    values["imputation_nll_code_mean"][1] = [[2.5, 2.5], [2.5, 2.5], [paper_boston[0][0] + 1.0] * 2]
    values["target_nll"][1] = [[0.5, 0.5], [2.0, 2.1], [2.0, 2.2]]
    for k in ("imputation_nll", "rmse", "accuracy"):
        values[k][:] = 1.0
    ds = xr.Dataset({k: (("dataset", "model", "split"), v) for k, v in values.items()},
                    coords={"dataset": data, "model": models, "split": [0, 1]})

    def summary(ds):      # the targets table as {row label: cells}
        return {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in bench.targets(ds)
                if line.startswith("| ") and "---" not in line}

    rows = summary(ds)
    assert rows["HH-VAEM ≤ paper HH-VAEM"][0].startswith("1 of 2 (yacht)")
    assert rows["HH-VAEM ≤ paper HH-VAEM"][2].startswith("1 of 2 (yacht)")
    assert rows["HH-VAEM best or tied in the VAEM family"][0] == "1 of 2 (yacht); strictly lowest on 1"
    assert rows["HH-VAEM best or tied in the VAEM family"][2].startswith("1 of 2 (yacht);")
    assert rows["hh-vaem wins or ties h-vaem"][2] == "2 of 2 (yacht, boston); strictly lowest on 1 |"

    # comparisons are over the folds both models ran: with h-vaem's fold 1 missing, hh-vaem's boston target
    # (2.0 on fold 0, 9.0 on fold 1) is compared on fold 0 alone, a strict win over h-vaem's 2.05; on each
    # model's own folds its mean 5.5 would be no strict win
    ds["target_nll"].loc[dict(dataset="boston", model="h-vaem", split=1)] = np.nan
    ds["target_nll"].loc[dict(dataset="boston", model="hh-vaem", split=0)] = 2.0
    ds["target_nll"].loc[dict(dataset="boston", model="h-vaem", split=0)] = 2.05
    ds["target_nll"].loc[dict(dataset="boston", model="hh-vaem", split=1)] = 9.0
    rows = summary(ds)
    assert rows["hh-vaem wins or ties h-vaem"][2] == "2 of 2 (yacht, boston); strictly lowest on 2 |"


def test_hmc_2d_smoke(tmp_path):
    bench = load_benchmark("hmc_2d")
    out = tmp_path / "hmc_2d.md"
    bench.main(["--smoke", "--no-nuts", "--out", str(out)])
    table = out.read_text()
    for target in ("wave", "dual_moon", "gaussian_ring"):
        assert f"| {target} |" in table
    assert "nan" not in table.split("| target |")[1].split("\n\n")[0].lower()


def test_hmc_gaussian20_smoke(tmp_path):
    bench = load_benchmark("hmc_gaussian20")
    out = tmp_path / "hmc_gaussian20.md"
    bench.main(["--smoke", "--out", str(out)])
    table = out.read_text()
    for scheme in ("relative", "absolute"):
        assert table.count(f"| {scheme} |") == 2
    assert "nan" not in table.lower()


def test_refined_guide_overhead_smoke():
    bench = load_benchmark("refined_guide_overhead")
    result = bench.main(["--smoke"])                       # {num_chains: {"trace_over_fast": ..., ...}}
    keys = ("trace_over_fast", "fast_over_bare", "step_trace_over_fast", "step_fast_over_bare")
    ratios = [r[k] for r in result.values() for k in keys]
    assert set(result) == {1, 16} and len(ratios) == 8
    assert all(0.2 < r < 10.0 for r in ratios)   # the same arithmetic: within a small factor even in smoke


def test_saia_smoke(tmp_path):
    bench = load_benchmark("saia")
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "saia_smoke.md").read_text()
    for run in ("hmc-vaem + mi", "vaem + eddi", "vaem + random"):
        assert f"| yacht | {run} |" in table
    assert "nan" not in table.lower() and (tmp_path / "saia_smoke.nc").exists()


def test_scaling_smoke(tmp_path):
    """benchmarks/scaling.py --smoke: 1 and 2 CPU processes (gloo), the all-reduce size and the 8-GPU projection."""
    bench = load_benchmark("scaling")
    out = tmp_path / "scaling.md"
    rows = bench.main(["--smoke", "--out", str(out)])
    one, two = (next(r for r in rows if r["processes"] == n) for n in (1, 2))
    assert one["bytes_per_step"] == 0 and two["bytes_per_step"] >= 4 * one["params"]   # every gradient, float32
    assert two["rows_per_s"] > 0 and two["pure_allreduce_s"] > 0
    text = out.read_text()
    assert "| vae | cpu | 2 | 32 |" in text and "Projection for 8 GPUs" in text and "nan" not in text.lower()


def test_run_on_gpu_script_is_valid_bash_and_covers_the_gpu_session():
    import subprocess

    script = ROOT / "benchmarks" / "run_on_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for needed in ("-m gpu", "--device cuda", "import pyro", "hh-vaem", "uci_table.py", "hmc_2d.py", "scaling.py"):
        assert needed in text, needed
    assert "pip install" not in text.replace("'pip install", "")   # nothing is installed by the script


def test_imputation_race_smoke(tmp_path):
    bench = load_benchmark("imputation_race")
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "imputation_race_smoke.md").read_text()
    for method in ("ours:vae", "mean", "mice-bayesridge", "missforest-extratrees", "hist-gradient-boosting"):
        assert f"| yacht | {method} |" in table
    assert (tmp_path / "imputation_race_smoke.nc").exists() and (tmp_path / "imputation_race_smoke.png").exists()
    import numpy as np
    draws = np.random.default_rng(0).normal(size=(4000, 3))
    crps = bench.crps_from_draws(draws, np.zeros(3))          # CRPS of N(0, 1) at 0: (sqrt(2) - 1) / sqrt(pi)
    assert np.allclose(crps, (np.sqrt(2) - 1) / np.sqrt(np.pi), atol=0.02)


def test_threads_benchmark_smoke(tmp_path):
    bench = load_benchmark("threads")
    result = bench.main(["--smoke", "--out", str(tmp_path / "threads.md")])
    assert set(result) == {"airquality VAE training", "2-D HMCSampler fit (wave)"}
    assert "package default / best" in (tmp_path / "threads.md").read_text()


def test_uci_table_smoke_writes_both_protocols_netcdf_and_plot(tmp_path):
    import numpy as np
    import xarray as xr
    bench = load_benchmark("uci_table")
    assert bench.main(["--smoke", "--models", "miwae", "hh-vae", "--protocol", "both", "--out", str(tmp_path),
                       "--name", "t"]) == 0
    ds = xr.open_dataset(tmp_path / "t.nc", engine="scipy")
    assert list(ds.protocol.values) == ["paper", "default"] and list(ds.model.values) == ["miwae", "hh-vae"]
    assert np.isfinite(ds["imputation_nll"].values).all() and np.isfinite(ds["seconds_per_split"].values).all()
    table = (tmp_path / "t.md").read_text()
    assert "paper protocol" in table and "our default" in table and "| yacht | hh-vae |" in table
    assert (tmp_path / "t.png").stat().st_size > 0


def test_mnist_table_smoke(tmp_path):
    bench = load_benchmark("mnist_table")
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "mnist_table_smoke.md").read_text()
    assert "| vae |" in table and "| hh-vae |" in table and "trained on" in table
    assert "nan" not in table.lower()
    (tmp_path / "b").mkdir()
    assert bench.main(["--smoke", "--models", "miwae", "--out", str(tmp_path / "b")]) == 0
    assert bench.main(["--merge", str(tmp_path / "b" / "mnist_table_smoke.nc"), str(tmp_path / "mnist_table_smoke.nc"),
                       "--out", str(tmp_path)]) == 0
    merged = (tmp_path / "mnist_table.md").read_text()
    rows = [line.split(" | ")[0] for line in merged.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| model", "| vae", "| miwae", "| hh-vae"]


def test_lecture_models_smoke(tmp_path):
    bench = load_benchmark("lecture_models")
    assert bench.main(["--smoke", "--only", "ood", "kl-annealing", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "lecture_models_smoke.md").read_text()
    assert "| ood | Bishop 1994" in table and "| kl-annealing |" in table
    assert "nan" not in table.lower()
    assert (tmp_path / "lecture_models_smoke" / "kl-annealing" / "kl_per_dim.png").exists()

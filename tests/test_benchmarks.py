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

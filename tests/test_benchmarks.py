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

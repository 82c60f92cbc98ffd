"""The README's Python example runs as written (with fewer steps and draws) and gives finite diagnostics."""
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_trains_refines_and_diagnoses():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("range(2000)", "range(30)").replace("range(200)", "range(3)")
    code = code.replace("num_draws=200", "num_draws=20").replace(
        "print(diagnostics_summary(to_arviz(chains, stats)))", "result = diagnostics_summary(to_arviz(chains, stats))")
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    summary, refined = scope["result"], scope["refined"]
    assert summary["r_hat"].shape == (5, 2)
    assert np.isfinite(summary["ess_bulk"].values).all()
    assert float(summary["accept_prob"].mean()) > 0.5
    assert refined.step_sizes().shape == (5, 2)

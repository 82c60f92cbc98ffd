"""The README's Python example runs as written (with fewer steps and samples)."""
import re
from pathlib import Path

import torch
from pyro import poutine

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_its_log_joint_matches_the_trace():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("steps=2000", "steps=30").replace("num_samples=1000", "num_samples=10")
    code = code.replace("Trainer(model, seed=0,", "Trainer(model, seed=0, progress=False,")
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model, split = scope["model"], scope["split"]
    batch = split.test_input()
    z = torch.randn(batch.size, model.latent_dim)
    model.kl_weight = 1.0
    tr = poutine.trace(poutine.condition(model.model, {"z": z})).get_trace(batch)
    tr.compute_log_prob()
    total = sum(s["log_prob"] for s in tr.nodes.values() if s["type"] == "sample")
    torch.testing.assert_close(model.log_joint(z, batch), total, rtol=0, atol=1e-4)

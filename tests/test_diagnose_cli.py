"""`ppl-vae diagnose` on a trained HMC model: ArviZ summary with finite R-hat/ESS, plots written."""
import math

import pandas as pd
import pytest
import torch

from ppl_vae.cli import main


@pytest.fixture(scope="module")
def hmc_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    assert main(["fit", "hmc-vae", "--dataset", "yacht", "--steps", "40", "--latent-dim", "3", "--out", str(out),
                 "--no-progress"]) == 0
    return out / "checkpoint.pt"


def test_diagnose_writes_summary_and_plots(hmc_checkpoint, tmp_path, capsys):
    out = tmp_path / "diag"
    assert main(["diagnose", str(hmc_checkpoint), "--rows", "2", "--chains", "3", "--draws", "40", "--warmup",
                 "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "acceptance rate" in printed and "divergences" in printed
    table = pd.read_csv(out / "summary.csv", index_col=0)
    rhat = [c for c in table.columns if "r_hat" in c.lower() or "rhat" in c.lower()]
    assert rhat and len(table[rhat[0]].dropna()) == len(table)
    assert (table[rhat[0]] > 0.99).all()                    # R-hat is >= 1 up to estimation noise
    ess = [c for c in table.columns if "ess" in c.lower()]
    assert len(ess) >= 2 and (table[ess] > 0).all().all()   # bulk and tail ESS
    for name in ("trace.png", "rank.png", "energy.png", "summary.md"):
        assert (out / name).stat().st_size > 0


def test_collect_chains_shapes_and_mixing(hmc_checkpoint):
    from ppl_vae.data import load_dataset
    from ppl_vae.cli.diagnose import collect_chains
    from ppl_vae.infer import load_model

    model = load_model(hmc_checkpoint)
    split = load_dataset("yacht").splits(n_splits=10, seed=0)[0]
    batch = split.test_input()[:3]
    chains, stats = collect_chains(model, batch, num_chains=2, num_draws=25, warmup=5)
    assert chains.shape == (2, 25, 3, 3)
    assert set(stats) == {"energy", "accept_prob", "diverging", "step_size"}
    assert stats["step_size"].shape == (25, 3)
    assert stats["energy"].shape == (2, 25, 3) and stats["diverging"].dtype == torch.bool
    assert torch.isfinite(chains).all()
    assert 0.2 < float(stats["accept_prob"].mean()) <= 1.0
    assert float(chains.std(1).mean()) > 0          # the chains move

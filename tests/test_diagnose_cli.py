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
    assert "accept_prob" in printed and "accept_rate" in printed and "divergences" in printed
    table = pd.read_csv(out / "summary.csv", index_col=[0, 1])
    assert len(table) == 2 * 3 and not table.index.duplicated().any()   # one row per (row, latent dim), not per chain
    sampler = pd.read_csv(out / "sampler.csv", index_col=[0, 1])
    assert len(sampler) == 3 * 2 and {"accept_prob", "accept_rate", "n_divergent"} <= set(sampler.columns)
    assert ((sampler.accept_rate >= 0) & (sampler.accept_rate <= 1)).all()
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
    assert set(stats) == {"energy", "accept_prob", "accepted", "diverging", "step_size"}
    assert stats["accepted"].shape == (2, 25, 3) and ((stats["accepted"] >= 0) & (stats["accepted"] <= 1)).all()
    assert stats["step_size"].shape == (25, 3)
    assert stats["energy"].shape == (2, 25, 3) and stats["diverging"].dtype == torch.bool
    assert torch.isfinite(chains).all()
    assert 0.2 < float(stats["accept_prob"].mean()) <= 1.0
    assert float(chains.std(1).mean()) > 0          # the chains move


def test_collect_chains_fixed_step_for_models_without_sampler():
    """A table model without ``hmc_guide`` is sampled by a one-transition HMCRefinedGuide at the fixed step size."""
    from ppl_vae.cli.diagnose import _moved_fraction, collect_chains, fixed_step_guide
    from ppl_vae.data import load_dataset
    from ppl_vae.models import build_model

    data = load_dataset("yacht")
    torch.manual_seed(0)
    model = build_model("vae", data.schema, latent_dim=2)
    assert not hasattr(model, "hmc_guide")
    batch = data.splits(n_splits=10, seed=0)[0].test_input()[:3]
    chains, stats = collect_chains(model, batch, num_chains=2, num_draws=20, warmup=5, step_size=0.1,
                                   num_leapfrog=3)
    assert chains.shape == (2, 20, 3, 2) and torch.isfinite(chains).all()
    assert torch.allclose(stats["step_size"], torch.full((20, 2), 0.1))
    assert set(stats) == {"energy", "accept_prob", "accepted", "diverging", "step_size"}
    # one transition per draw: the kernel's decisions are exactly the moves of the kept chain
    assert torch.equal(stats["accepted"][:, 1:], _moved_fraction(chains)[:, 1:])
    assert float(chains.std(1).mean()) > 0
    guide = fixed_step_guide(model, 0.2, 4)
    assert guide.num_transitions == 1 and guide.num_leapfrog == 4
    assert torch.allclose(guide.step_sizes(), torch.full((1, 2), 0.2))
    with pytest.raises(ValueError, match="step_size"):
        fixed_step_guide(model, 0.0)


def test_collect_chains_leapfrog_override_is_temporary(hmc_checkpoint):
    from ppl_vae.cli.diagnose import collect_chains
    from ppl_vae.data import load_dataset
    from ppl_vae.infer import load_model

    model = load_model(hmc_checkpoint)
    before = model.hmc_guide.num_leapfrog
    batch = load_dataset("yacht").splits(n_splits=10, seed=0)[0].test_input()[:2]
    chains, _ = collect_chains(model, batch, num_chains=2, num_draws=5, warmup=0, num_leapfrog=before + 2)
    assert chains.shape == (2, 5, 2, 3) and model.hmc_guide.num_leapfrog == before

"""Data-parallel SVI (issue 13): two CPU processes on gloo give the gradients and the loss curve of one process on
the whole global batch; HMC parameter groups are reduced by their own objective's rule; a signal on one rank stops
every rank at the same step and the resumed run is bit-identical; the README's ``--num-processes 2`` command runs.

The two-process runs are forked (:func:`ppl_vae.infer.distributed.launch`, file rendezvous, no port), tiny models.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from ppl_vae.infer import distributed as D
from ppl_vae.infer.svi import Trainer
from ppl_vae.models.base import Batch, LatentVariableModel

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")


class TinyMAP(LatentVariableModel):
    """A deterministic latent-variable model (amortised MAP: a Delta guide) so that a step's gradient does not depend
    on random draws: z = enc(x ⊙ m), x ~ N(dec(z), noise) on the observed cells, ``noise`` a bare ``pyro.param``."""

    name = "tiny-map"

    def __init__(self, x_dim: int = 6, z_dim: int = 2):
        super().__init__(x_dim=x_dim, z_dim=z_dim)
        g = torch.Generator().manual_seed(0)
        self.enc, self.dec = nn.Linear(x_dim, z_dim), nn.Linear(z_dim, x_dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def model(self, batch):
        pyro.module("dec", self.dec)
        noise = pyro.param("noise", torch.ones(batch.x.shape[1]), constraint=dist.constraints.positive)
        with pyro.plate("data", batch.size):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.config["z_dim"]), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), noise).mask(batch.x_mask).to_event(1), obs=batch.x)

    def guide(self, batch):
        pyro.module("enc", self.enc)
        with pyro.plate("data", batch.size):
            pyro.sample("z", dist.Delta(self.enc(batch.x * batch.x_mask)).to_event(1))


def _table():
    from ppl_vae import load_dataset

    ds = load_dataset("yacht")
    return ds, ds.splits(n_splits=10, seed=0)[0]


def _global_batch(n=24, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    m = torch.rand(n, d, generator=g) > 0.3
    return Batch(x=x * m, x_mask=m, y=None, y_mask=None, group=None, index=torch.arange(n))


def _grads_of_step(objective, model, guide, batch) -> tuple[float, dict]:
    with poutine.trace(param_only=True) as tr:
        loss = objective.loss_and_grads(model, guide, batch)
    out = {}
    for name, site in tr.trace.nodes.items():
        p = site["value"].unconstrained()
        out[name] = p.grad.detach().clone() if p.grad is not None else None
        p.grad = None
    return float(loss), out


# ---------------------------------------------------------------------- (2) one step: the same gradients
def _one_step_worker(rank, world, batch):
    pyro.clear_param_store()                                    # the fork inherits the parent's param store
    pyro.set_rng_seed(rank)
    model = TinyMAP()
    shard = batch[D.shard_slice(batch.size, rank, world)]
    obj = D.DistributedObjective(pyro.infer.Trace_ELBO())
    loss, grads = _grads_of_step(obj, model.model, model.guide, shard)
    return loss, grads, obj.last_rows, obj.last_bytes


def test_one_step_over_two_processes_gives_the_whole_batch_gradient():
    batch = _global_batch(n=25)                                 # 13 + 12 rows: unequal shards too
    pyro.clear_param_store()
    ref_model = TinyMAP()
    ref_loss, ref = _grads_of_step(pyro.infer.Trace_ELBO(), ref_model.model, ref_model.guide, batch)
    results = D.launch(_one_step_worker, 2, batch)
    for loss, grads, rows, nbytes in results:
        assert rows == 25 and loss == pytest.approx(ref_loss, rel=1e-5)
        assert set(grads) == set(ref) == {"enc$$$weight", "enc$$$bias", "dec$$$weight", "dec$$$bias", "noise"}
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
        n_params = sum(g.numel() for g in ref.values())
        assert nbytes == 4 * (n_params + len(ref) + 4)         # float32 gradients + flags + 4 scalars


# ---------------------------------------------------------------------- HMC groups: sum vs mean
def _hmc_setup():
    from ppl_vae.models import build_model

    ds, split = _table()
    torch.manual_seed(0)
    model = build_model("hmc-vae", ds.schema, latent_dim=2, hidden=[8], hmc_steps=2, leapfrog_steps=2, sksd_chains=4)
    stage = model.training_stages(20, 1e-3)[-1]
    batch = split.train.batch(torch.arange(12))
    return model, stage, batch


def _hmc_worker(rank, world):  # noqa: ARG001
    pyro.clear_param_store()
    model, stage, batch = _hmc_setup()
    if stage.on_step is not None:
        stage.on_step(0)
    pyro.set_rng_seed(0)                                        # both ranks: the same draws on the same rows
    return _grads_of_step(D.DistributedObjective(stage.loss), stage.model, stage.guide, batch)[1]


def test_hmc_objective_groups_sum_the_elbo_and_average_the_means():
    """Two ranks holding the same rows and seeds = one global batch of two identical halves: the base guide's
    parameters (ELBO, a sum over rows) get twice the local gradient; decoder, step sizes and inflation (L_HMC, SKSD,
    acceptance floor: means over rows and chains) get the local gradient."""
    pyro.clear_param_store()
    model, stage, batch = _hmc_setup()
    assert stage.name == "hmc" and type(stage.loss).__name__ == "HMCObjective"
    if stage.on_step is not None:
        stage.on_step(0)
    pyro.set_rng_seed(0)
    _, ref = _grads_of_step(stage.loss, stage.model, stage.guide, batch)
    psi = {n for n, s in poutine.trace(stage.guide.guide).get_trace(batch).nodes.items() if s["type"] == "param"}
    reduced = D.launch(_hmc_worker, 2)
    assert reduced[0].keys() == ref.keys()
    doubled = halved = 0
    for name, g in ref.items():
        if g is None:
            assert reduced[0][name] is None
            continue
        factor = 2.0 if name in psi else 1.0
        doubled, halved = doubled + (factor == 2.0), halved + (factor == 1.0)
        for r in reduced:
            torch.testing.assert_close(r[name], factor * g, rtol=1e-4, atol=1e-6, msg=name)
    assert doubled and halved and any("log_step_size" in n for n in ref) and any("inflation" in n for n in ref)


# ---------------------------------------------------------------------- (2) a short run: the same loss curve
def _fit_worker(rank, world, name, steps, batch_size):  # noqa: ARG001
    ds, split = _table()
    torch.manual_seed(0)
    if name == "tiny-map":
        model = TinyMAP(x_dim=split.train.num_features)
    else:
        from ppl_vae.models import build_model

        model = build_model(name, ds.schema, latent_dim=2, hidden=[8], hmc_steps=2, leapfrog_steps=2, sksd_chains=4) \
            if name.startswith("hmc") else build_model(name, ds.schema, latent_dim=2, hidden=[8])
    history = Trainer(model, seed=3, progress=False, batch_size=batch_size, lr=1e-2).fit(split.train, steps)
    return [h["loss"] for h in history], {k: v.clone() for k, v in model.state_dict().items()}


def test_short_run_loss_curve_matches_one_process_on_the_global_batch():
    one_losses, one_state = _fit_worker(0, 1, "tiny-map", 15, 32)
    (l0, s0), (l1, s1) = D.launch(_fit_worker, 2, "tiny-map", 15, 32)
    assert l0 == l1 and all(torch.equal(s0[k], s1[k]) for k in s0)          # replicas stay identical
    torch.testing.assert_close(torch.tensor(l0), torch.tensor(one_losses), rtol=1e-4, atol=1e-5)
    for k in one_state:
        torch.testing.assert_close(s0[k], one_state[k], rtol=1e-4, atol=1e-5, msg=k)


def test_vae_and_hmc_vae_train_data_parallel_with_identical_replicas():
    """The real table models (sampling noise seeded per rank): replicas identical, loss curve close to one process
    on the same global batch (mean of the last 10 steps within 10%)."""
    one, _ = _fit_worker(0, 1, "vae", 30, 32)
    (l0, s0), (l1, s1) = D.launch(_fit_worker, 2, "vae", 30, 32)
    assert l0 == l1 and all(torch.equal(s0[k], s1[k]) for k in s0)
    tail = lambda v: sum(v[-10:]) / 10  # noqa: E731
    assert abs(tail(l0) - tail(one)) < 0.1 * abs(tail(one))
    (h0, t0), (h1, t1) = D.launch(_fit_worker, 2, "hmc-vae", 12, 16)   # ELBO stage, then the HMC joint stage
    assert h0 == h1 and all(torch.equal(t0[k], t1[k]) for k in t0) and all(map(torch.isfinite, map(torch.tensor, h0)))


# ---------------------------------------------------------------------- signals and exact resume
def _resume_worker(rank, world, tmp):
    from ppl_vae.errors import TrainingInterrupted

    def run(ckpt, kill_at=None):
        ds, split = _table()
        torch.manual_seed(0)
        from ppl_vae.models import build_model

        model = build_model("vae", ds.schema, latent_dim=2, hidden=[8])
        stages = model.training_stages

        def patched(steps, lr):
            out = stages(steps, lr)
            inner = out[0].on_step

            def on_step(t):
                if inner is not None:
                    inner(t)
                if kill_at is not None and rank == 1 and t == kill_at:
                    os.kill(os.getpid(), signal.SIGTERM)             # only rank 1 is told to stop
            out[0].on_step = on_step
            return out
        model.training_stages = patched
        trainer = Trainer(model, seed=0, progress=False, batch_size=16, checkpoint=ckpt, checkpoint_every=4)
        try:
            history = trainer.fit(split.train, 14)
        except TrainingInterrupted as exc:
            return ("stopped", exc.step, exc.exit_code)
        return [h["loss"] for h in history], {k: v.clone() for k, v in model.state_dict().items()}

    whole = run(Path(tmp) / "a.pt")
    stopped = run(Path(tmp) / "b.pt", kill_at=6)
    resumed = run(Path(tmp) / "b.pt")
    return whole, stopped, resumed


def test_sigterm_on_one_rank_stops_both_then_resume_is_bit_identical(tmp_path):
    from ppl_vae.infer.checkpoint import load_checkpoint

    results = D.launch(_resume_worker, 2, str(tmp_path))
    for whole, stopped, resumed in results:
        assert stopped == ("stopped", 7, 143)                    # both ranks stop after the same step
        assert resumed[0] == whole[0]                            # the same losses, bit for bit
        assert all(torch.equal(resumed[1][k], whole[1][k]) for k in whole[1])
    ckpt = load_checkpoint(tmp_path / "b.pt")
    assert ckpt["num_processes"] == 2 and len(ckpt["rng_ranks"]) == 2 and ckpt["settings"]["num_processes"] == 2
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------- (5) the README command
def test_readme_num_processes_command_runs_and_records_it(tmp_path, capfd):
    """``ppl-vae run ... --num-processes 2`` (called in-process: the launcher's own imports are the test's; the two
    ranks are fresh ``python -m ppl_vae.cli`` processes)."""
    import xarray as xr

    from ppl_vae.cli import main
    from ppl_vae.infer.checkpoint import load_checkpoint

    section = (REPO / "README.md").read_text().split("## Scaling out")[1].split("\n## ")[0]
    command = " ".join(section.split("```bash")[1].split("#")[0].replace("\\\n", " ").split())
    assert command.startswith("ppl-vae run ") and command.endswith("--num-processes 2 --out runs/dp"), command
    out = tmp_path / "dp"
    argv = command.split()[1:-4] + ["--out", str(out)]                  # the README's command, into tmp_path
    assert main(argv + ["--num-processes", "2"]) == 0
    cap = capfd.readouterr()
    assert cap.out.count("| mean ± std |") == 1, cap.err[-2000:]     # rank 0 prints the table, once
    assert "yacht fold 0 vae:elbo step 4/4" in cap.err and "\r" not in cap.err   # log lines off a TTY, no bar
    with xr.open_dataset(out / "results.nc", engine="scipy") as res:
        assert int(res.attrs["num_processes"]) == 2 and res.attrs["device"] == "cpu"
    ckpt = load_checkpoint(out / "fold0" / "checkpoint.pt")
    assert ckpt["finished"] and ckpt["settings"]["num_processes"] == 2 and len(ckpt["rng_ranks"]) == 2
    assert main(argv + ["--no-progress"]) == 2                          # one process: a stale result, refused
    assert "num_processes=2, you asked num_processes=1" in capfd.readouterr().err


# ---------------------------------------------------------------------- Trainer API details
def test_fit_refuses_a_whole_dataset_and_says_what_to_pass():
    ds, split = _table()
    with pytest.raises(TypeError, match=r"splits\(.*\)\[k\]\.train"):
        Trainer(TinyMAP(), progress=False).fit(ds, 1)
    with pytest.raises(TypeError, match="split.train"):
        Trainer(TinyMAP(), progress=False).fit(split, 1)


def test_progress_off_a_tty_logs_lines_with_desc(capsys):
    _, split = _table()
    Trainer(TinyMAP(x_dim=split.train.num_features), progress=True, desc="yacht fold 0", log_every=5,
            batch_size=16).fit(split.train, 10)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "step" in l]
    assert [l.split(" step ")[1].split()[0] for l in lines] == ["5/10", "10/10"]
    assert all(l.startswith("yacht fold 0 tiny-map:elbo step") for l in lines) and "\r" not in err

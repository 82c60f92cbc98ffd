"""Fault injection: crafted checkpoints, stale checkpoints, SIGINT/SIGTERM/SIGKILL during training, diverging
training and hostile tables. Each test reproduces a defect of issue 9 (it fails on the code before the fix)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoNormal
from torch import nn

from ppl_vae.cli import main
from ppl_vae.errors import CheckpointError, NonFiniteLossError, TrainingInterrupted
from ppl_vae.infer.checkpoint import (constraint_to_spec, load_checkpoint, load_model, rng_state, set_rng_state,
                                      spec_to_constraint)
from ppl_vae.infer.svi import Trainer
from ppl_vae.models.base import Batch, LatentVariableModel

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--latent-dim", "2", "--no-progress"]


# ---------------------------------------------------------------------- 1. code execution from a checkpoint
class _Evil:
    """Unpickling this runs a shell command (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 2, "model_name": "vae", "config": {}, "state_dict": {}, "x": _Evil(marker)}, path)
    return path


def test_crafted_pickle_is_refused_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _crafted(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(evil)
    assert main(["evaluate", str(evil), "--num-samples", "5"]) == 2
    assert main(["diagnose", str(evil)]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "Traceback" not in err
    # the same file planted as a fold checkpoint of `run`
    out = tmp_path / "run"
    _crafted(out / "fold0" / "checkpoint.pt", marker)
    assert main(["run", "vae", "--dataset", "yacht", "--splits", "1", "--steps", "5", "--out", str(out), *SMALL]) == 2
    assert not marker.exists()


def test_model_class_comes_only_from_the_registry(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"format": 2, "model_name": "os:system", "model_class": "os.system", "config": {"command": "true"},
                "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="unregistered model"):
        load_model(path)


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    a = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


# ---------------------------------------------------------------------- 2. Pyro param store in checkpoints
class AutoNormalModel(LatentVariableModel):
    """A Pyro program whose guide is ``AutoNormal`` (parameters built lazily on its first call, living in Pyro's
    param store), plus plain ``pyro.param`` s with constraints."""

    name = "test-autonormal"

    def __init__(self, dim: int = 2, width: int = 3):
        super().__init__(dim=dim, width=width)
        self.dim = dim
        self.decoder = nn.Linear(dim, width)
        self.autoguide = AutoNormal(self._program)

    def _program(self, batch):
        pyro.module("decoder", self.decoder)
        noise = pyro.param("noise", torch.tensor(1.0), constraint=constraints.positive)
        mix = pyro.param("mix", torch.ones(2) / 2, constraint=constraints.simplex)
        shift = pyro.param("shift", torch.tensor(0.5), constraint=constraints.interval(0.0, 2.0))
        w = pyro.sample("w", dist.Gamma(2.0, 2.0))
        with pyro.plate("data", batch.size):
            z = pyro.sample("z", dist.Normal(batch.x.new_zeros(batch.size, self.dim), 1.0).to_event(1))
            mean = self.decoder(z) * w + shift * mix[0]
            pyro.sample("x", dist.Normal(mean, noise).to_event(1), obs=batch.x)

    def model(self, batch):
        self._program(batch)

    def guide(self, batch):
        return self.autoguide(batch)


@pytest.fixture
def autonormal_registered(monkeypatch):
    from ppl_vae import models

    monkeypatch.setitem(models.MODELS, AutoNormalModel.name, f"{AutoNormalModel.__module__}:AutoNormalModel")
    return AutoNormalModel


def _full_batch(n=6, width=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, width, generator=g)
    return Batch(x=x, x_mask=torch.ones_like(x, dtype=torch.bool))


def _store_values():
    store = pyro.get_param_store()
    return {k: store[k].detach().clone() for k in store.keys()}


def test_autonormal_param_store_round_trips(autonormal_registered, tmp_path):
    batch = _full_batch()
    torch.manual_seed(0)
    model = autonormal_registered()
    Trainer(model, seed=0, progress=False, checkpoint=tmp_path / "c.pt", lr=0.05).fit(batch, 15)
    before = _store_values()
    assert {"AutoNormal.locs.z", "AutoNormal.scales.z", "noise", "mix", "shift"} <= set(before)
    pyro.clear_param_store()
    loaded = load_model(tmp_path / "c.pt")
    after = _store_values()
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    loaded.guide(batch)                                    # AutoNormal builds itself from the stored values
    assert torch.equal(loaded.autoguide.locs.z.detach(), before["AutoNormal.locs.z"])
    assert torch.equal(loaded.autoguide.scales.z.detach(), before["AutoNormal.scales.z"])


def test_autonormal_resume_is_bit_identical(autonormal_registered, tmp_path):
    batch = _full_batch()

    def train(steps, ckpt=None, stop_at=None):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = autonormal_registered()

        def stream():
            for i in range(10 ** 6):
                if stop_at is not None and i == stop_at:
                    raise KeyboardInterrupt("simulated crash")
                yield batch
        Trainer(model, seed=0, progress=False, checkpoint=ckpt, checkpoint_every=4, lr=0.05).fit(stream, steps)
        return _store_values()

    ref = train(20)
    ckpt = tmp_path / "c.pt"
    with pytest.raises(KeyboardInterrupt):
        train(20, ckpt, stop_at=10)
    resumed = train(20, ckpt)
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k


def test_unknown_constraints_are_refused():
    for c in (constraints.real, constraints.positive, constraints.simplex, constraints.lower_cholesky,
              constraints.unit_interval, constraints.interval(-1.0, 3.0), constraints.greater_than(2.0),
              constraints.softplus_positive, constraints.independent(constraints.positive, 1)):
        back = spec_to_constraint(constraint_to_spec(c))
        assert type(back) is type(c) and repr(back) == repr(c)
    with pytest.raises(CheckpointError, match="cannot store"):
        constraint_to_spec(constraints.integer_interval(0, 3))
    with pytest.raises(CheckpointError, match="unknown parameter constraint"):
        spec_to_constraint("os.system")


# ---------------------------------------------------------------------- 3. stale results
def _fit(out, *extra):
    return main(["fit", "vae", "--dataset", "yacht", "--steps", "6", "--out", str(out), *SMALL, *extra])


@pytest.mark.parametrize("change, named", [
    (["--seed", "1"], "seed=0, you asked seed=1"),
    (["--steps", "7"], "steps=6, you asked steps=7"),
    (["--lr", "0.01"], "lr=0.003, you asked lr=0.01"),
    (["--batch-size", "64"], "batch_size=128, you asked batch_size=64"),
    (["--folds", "5"], "folds=10, you asked folds=5"),
    (["--latent-dim", "3"], "latent_dim=2, you asked latent_dim=3"),
])
def test_stale_checkpoint_is_refused_naming_the_setting(tmp_path, capsys, change, named):
    out = tmp_path / "fit"
    assert _fit(out) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert _fit(out, *change) == 2
    err = capsys.readouterr().err
    assert named in err and "--overwrite" in err and str(out / "checkpoint.pt") in err
    assert (out / "checkpoint.pt").read_bytes() == before          # nothing was touched
    assert _fit(out) == 0                                          # the same settings still reuse it


def test_run_with_another_seed_refuses_then_overwrites(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "vae", "--dataset", "yacht", "--splits", "1", "--steps", "6", "--num-samples", "5", "--out",
            str(out), *SMALL]
    assert main(args) == 0
    assert main(args + ["--seed", "1"]) == 2
    assert f"{out / 'fold0' / 'checkpoint.pt'} was trained with seed=0, you asked seed=1" in capsys.readouterr().err
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert load_checkpoint(out / "fold0" / "checkpoint.pt")["settings"]["seed"] == 1


def test_changed_training_data_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=40), "b": rng.gamma(2.0, size=40), "y": rng.normal(size=40)})
    csv = tmp_path / "t.csv"
    df.to_csv(csv, index=False)
    args = ["fit", "vae", "--csv", str(csv), "--target", "y", "--steps", "4", "--out", str(tmp_path / "o"), *SMALL]
    assert main(args) == 0
    df.loc[5, "a"] += 1.0
    df.to_csv(csv, index=False)
    assert main(args) == 2
    assert "other training data" in capsys.readouterr().err


# ---------------------------------------------------------------------- 4. SIGINT / SIGTERM / SIGKILL
def _fit_cmd(out, steps):
    return [sys.executable, "-m", "ppl_vae.cli", "fit", "vae", "--dataset", "boston", "--steps", str(steps),
            "--checkpoint-every", "5", "--batch-size", "32", "--out", str(out), *SMALL]


def _wait_for(pred, proc, timeout=120.0):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)


def _step(path):
    try:
        p = torch.load(path, weights_only=True)
        return p["stage_step"] if not p["finished"] else 10 ** 9
    except Exception:  # noqa: BLE001 - not written yet
        return -1


def test_sigterm_then_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    steps = 150
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "killed"
    ckpt = out / "checkpoint.pt"
    # SIGTERM once the first checkpoint exists: the step finishes, a checkpoint is written, exit 143
    proc = subprocess.Popen(_fit_cmd(out, steps), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: _step(ckpt) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "run the same command again to resume" in err and "Traceback" not in err
    stopped = _step(ckpt)
    assert 5 <= stopped < steps
    # restart, then SIGKILL mid-training (no handler can run); leave an orphaned temporary file behind too
    proc = subprocess.Popen(_fit_cmd(out, steps), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: _step(ckpt) >= stopped + 10, proc)
    proc.kill()
    proc.communicate(timeout=60)
    orphan = out / "checkpoint.pt.deadbeef.tmp"
    orphan.write_bytes(b"half a checkpoint")
    assert _step(ckpt) < steps
    # resume to the end (the same command; in this process to save an interpreter start)
    assert main(_fit_cmd(out, steps)[3:]) == 0
    assert not orphan.exists()
    # the uninterrupted run (same command, in this process)
    ref = tmp_path / "ref"
    assert main(_fit_cmd(ref, steps)[3:]) == 0
    a = load_checkpoint(ckpt)
    b = load_checkpoint(ref / "checkpoint.pt")
    assert a["finished"] and [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    for k, v in b["state_dict"].items():
        assert torch.equal(v, a["state_dict"][k]), k


def test_sigint_in_process_checkpoints_restores_handlers_and_resumes(tmp_path):
    from ppl_vae.data import load_dataset
    from ppl_vae.models import VAE

    ds = load_dataset("yacht")
    split = ds.splits(n_splits=10, seed=0)[0]

    def train(ckpt, interrupt_at=None):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = VAE(ds.schema, latent_dim=2)
        trainer = Trainer(model, seed=0, progress=False, checkpoint=ckpt, checkpoint_every=7, batch_size=32)
        if interrupt_at is not None:
            stage = model.training_stages
            def stages(steps, lr):
                out = stage(steps, lr)
                hook = out[0].on_step
                def on_step(t):
                    if hook is not None:
                        hook(t)
                    if t == interrupt_at:
                        os.kill(os.getpid(), signal.SIGINT)
                out[0].on_step = on_step
                return out
            model.training_stages = stages
        trainer.fit(split.train, 30)
        return model

    ref = train(None)
    previous = signal.getsignal(signal.SIGINT)
    ckpt = tmp_path / "c.pt"
    with pytest.raises(TrainingInterrupted) as info:
        train(ckpt, interrupt_at=11)
    assert info.value.exit_code == 130 and info.value.step == 12
    assert signal.getsignal(signal.SIGINT) is previous
    assert load_checkpoint(ckpt)["stage_step"] == 12
    resumed = train(ckpt)
    for (k, v), (_, w) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(v, w), k


# ---------------------------------------------------------------------- 5. non-finite loss
@pytest.mark.parametrize("lr", ["100", "1e4"])
def test_diverging_learning_rate_exits_2_without_inventing_a_checkpoint(tmp_path, capsys, lr):
    out = tmp_path / "o"
    assert main(["fit", "vae", "--dataset", "yacht", "--steps", "40", "--lr", lr, "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "stage 'elbo' step" in err and "lower learning rate" in err
    assert "checkpoint" not in err and "Traceback" not in err


def test_non_finite_loss_names_an_existing_checkpoint(tmp_path):
    from ppl_vae.data import load_dataset
    from ppl_vae.models import VAE

    ds = load_dataset("yacht")
    good = ds.splits(n_splits=10, seed=0)[0].train.batch(torch.arange(16))
    bad = good.replace(x=good.x.clone())
    bad.x[0, 0] = float("nan")
    stream = [good] * 7 + [bad]
    model = VAE(ds.schema, latent_dim=2)
    ckpt = tmp_path / "c.pt"
    with pytest.raises(NonFiniteLossError, match=r"stage 'elbo' step 7 .*last good checkpoint is .*c\.pt"):
        Trainer(model, progress=False, checkpoint=ckpt, checkpoint_every=5).fit(iter(stream), 10)
    assert load_checkpoint(ckpt)["stage_step"] == 5


# ---------------------------------------------------------------------- 6. hostile input
def _table(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.gamma(2.0, size=n), "y": rng.normal(size=n)})


@pytest.mark.parametrize("make, message", [
    (lambda: _table().assign(a=lambda d: d.a.where(d.index != 3, 1e300)), "'a'.*too large"),
    (lambda: _table()[["y"]], "no feature columns besides the target 'y'"),
    (lambda: _table(5), "cannot make 10 folds of 5 rows: use --folds 5"),
    (lambda: _table().assign(c=1.0), r"column 'c' has a single distinct value \(1\.0\)"),
    (lambda: _table().iloc[:0], "no rows"),
])
def test_hostile_tables_exit_2_with_one_line(tmp_path, capsys, make, message):
    import re

    csv = tmp_path / "t.csv"
    make().to_csv(csv, index=False)
    code = main(["run", "vae", "--csv", str(csv), "--target", "y", "--splits", "1", "--steps", "3",
                 "--num-samples", "3", "--out", str(tmp_path / "o"), *SMALL])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "np.float64" not in err and "entirely missing" not in err


def test_value_overflowing_float32_in_a_test_row_is_named():
    from ppl_vae.data import from_dataframe
    from ppl_vae.errors import DataError

    ds = from_dataframe(_table().assign(a=lambda d: d.a.where(d.index != 3, 1e300)), target="y")
    norm = ds.fit_normaliser([i for i in range(len(ds)) if i != 3])   # 1e300 only in the "test" rows
    with pytest.raises(DataError, match="column 'a' row 3: the value is too large to normalise"):
        ds.to_table([2, 3], norm)


# ---------------------------------------------------------------------- determinism and atomic writes
def test_same_seed_gives_byte_identical_results_nc(tmp_path):
    args = ["run", "vae", "--dataset", "yacht", "--splits", "1", "--steps", "8", "--num-samples", "5", *SMALL]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "results.nc").read_bytes() == (tmp_path / "b" / "results.nc").read_bytes()
    assert main(args + ["--out", str(tmp_path / "a")]) == 0            # reusing the finished fold: same bytes
    assert (tmp_path / "a" / "results.nc").read_bytes() == (tmp_path / "b" / "results.nc").read_bytes()


def test_a_crash_during_a_checkpoint_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from ppl_vae.infer import checkpoint as ck
    from ppl_vae.models import VAE
    from ppl_vae.data import load_dataset

    ds = load_dataset("yacht")
    model = VAE(ds.schema, latent_dim=2)
    path = ck.save_checkpoint(tmp_path / "checkpoint.pt", model, note="old")
    real_save = torch.save

    def dying_save(obj, fh):
        real_save(obj, fh)
        fh.truncate(100)                                  # half a file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, model, note="new")
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert load_checkpoint(path)["note"] == "old"
    assert list(tmp_path.iterdir()) == [path]

"""VAE / VAEM as Pyro programs: log joint vs trace, training improves the ELBO, seeds, checkpoints, resume."""
import math

import numpy as np
import pytest
import torch
from pyro import poutine

from ppl_vae.data import load_dataset
from ppl_vae.infer import Trainer, evaluate_split, load_model
from ppl_vae.models import VAE, VAEM, build_model, model_class
from ppl_vae.errors import UnknownNameError


@pytest.fixture(scope="module")
def boston_split():
    return load_dataset("boston").splits(n_splits=10, seed=0)[0]


def trace_log_joint(model, latent, batch):
    model.kl_weight = 1.0
    tr = poutine.trace(poutine.condition(model.model, {model.latent_site: latent})).get_trace(batch)
    tr.compute_log_prob()
    return sum(site["log_prob"] for site in tr.nodes.values() if site["type"] == "sample")


@pytest.mark.parametrize("cls", [VAE, VAEM])
def test_fast_log_joint_equals_pyro_trace(cls, boston_split):
    ds = load_dataset("boston")
    torch.manual_seed(1)
    model = cls(ds.schema, latent_dim=5)
    batch = next(boston_split.train.loader(64, seed=0))
    assert not batch.x_mask.all() and not batch.y_mask.all()   # train-time missingness is on
    h = torch.randn(batch.size, 5)
    torch.testing.assert_close(model.log_joint(h, batch), trace_log_joint(model, h, batch), rtol=0, atol=1e-4)
    # batched over chains: (C, B, L) -> (C, B)
    hc = torch.randn(3, batch.size, 5)
    lj = model.log_joint(hc, batch)
    assert lj.shape == (3, batch.size)
    torch.testing.assert_close(lj[1], model.log_joint(hc[1], batch))


def _mean_loss(history, stage, first):
    losses = [h["loss"] for h in history if h["stage"] == stage]
    return float(np.mean(losses[:30] if first else losses[-30:]))


def test_vae_training_improves_elbo_on_boston(boston_split):
    ds = load_dataset("boston")
    model = VAE(ds.schema, latent_dim=5)
    history = Trainer(model, seed=0, progress=False).fit(boston_split.train, 400)
    first, last = _mean_loss(history, "elbo", True), _mean_loss(history, "elbo", False)
    assert last < first - 1.0, (first, last)
    metrics = evaluate_split(model, boston_split, num_samples=100)
    assert all(math.isfinite(metrics[k]) for k in ("imputation_nll", "target_nll", "rmse"))
    assert metrics["rows_without_hidden"] == 0 and metrics["num_rows"] == len(boston_split.test)


def test_vaem_stages_freeze_marginals(boston_split):
    ds = load_dataset("boston")
    model = VAEM(ds.schema, latent_dim=5, marginal_steps=150)
    trainer = Trainer(model, seed=0, progress=False)
    stages = model.training_stages(300)
    assert [s.name for s in stages] == ["marginal", "dependency"] and stages[0].steps == 150
    history = trainer.fit(boston_split.train, 300)
    marg = [h["loss"] for h in history if h["stage"] == "marginal"]
    assert np.mean(marg[-20:]) < np.mean(marg[:20])
    # a second dependency-stage run leaves the marginal VAEs untouched
    snapshot = {k: v.clone() for k, v in model.marginal.state_dict().items()}
    dep = model.training_stages(300)[1]
    import pyro
    from pyro.infer import SVI
    svi = SVI(dep.model, dep.guide, pyro.optim.Adam({"lr": 1e-2}), dep.loss)
    batch = next(boston_split.train.loader(64, seed=1))
    for t in range(5):
        dep.on_step(t)
        svi.step(batch)
    for k, v in model.marginal.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_fixed_seed_identical_results(boston_split, tmp_path):
    from ppl_vae.pipeline import run_experiment
    ds = load_dataset("yacht")
    a = run_experiment("vae", ds, splits=1, steps=60, num_samples=30, seed=3, progress=False)
    b = run_experiment("vae", ds, splits=1, steps=60, num_samples=30, seed=3, progress=False)
    c = run_experiment("vae", ds, splits=1, steps=60, num_samples=30, seed=4, progress=False)
    for key in ("imputation_nll", "target_nll", "rmse"):
        assert float(a[key][0]) == float(b[key][0])
    assert float(a["imputation_nll"][0]) != float(c["imputation_nll"][0])


def test_checkpoint_round_trip_reproduces_evaluation(tmp_path):
    from ppl_vae.pipeline import evaluate_checkpoint, run_experiment
    ds = load_dataset("yacht")
    res = run_experiment("vaem", ds, splits=1, steps=80, num_samples=40, seed=0, out=tmp_path, progress=False)
    ckpt = tmp_path / "fold0" / "checkpoint.pt"
    again = evaluate_checkpoint(ckpt, num_samples=40)
    for key in ("imputation_nll", "target_nll", "rmse"):
        assert again[key] == pytest.approx(float(res[key][0]), rel=1e-6)
    assert (tmp_path / "results.nc").exists() and (tmp_path / "results.md").exists()
    model = load_model(ckpt)
    assert isinstance(model, VAEM) and model.config["latent_dim"] == 10


def test_redeclared_target_survives_the_checkpoint(tmp_path):
    """A loggaussian target (the reference's VAEM family) is stored in the data spec: re-evaluating the checkpoint
    rebuilds it (same numbers), and a cell trained with the other target is refused, never silently reused."""
    from ppl_vae.errors import StaleCheckpointError
    from ppl_vae.pipeline import evaluate_checkpoint, run_experiment
    ds = load_dataset("yacht", target_likelihood="loggaussian")
    spec = {"name": "yacht", "target_likelihood": "loggaussian"}
    res = run_experiment("vae", ds, splits=1, steps=40, num_samples=20, seed=0, out=tmp_path, progress=False,
                         data_spec=spec)
    again = evaluate_checkpoint(tmp_path / "fold0" / "checkpoint.pt", num_samples=20)
    for key in ("imputation_nll", "target_nll", "rmse"):
        assert again[key] == pytest.approx(float(res[key][0]), rel=1e-6)
    plain = run_experiment("vae", load_dataset("yacht"), splits=1, steps=40, num_samples=20, seed=0,
                           progress=False)
    assert float(plain["target_nll"][0]) != pytest.approx(float(res["target_nll"][0]), abs=1e-3)
    with pytest.raises(StaleCheckpointError):
        run_experiment("vae", load_dataset("yacht"), splits=1, steps=40, num_samples=20, seed=0, out=tmp_path,
                       progress=False)


def test_inference_options_do_not_make_a_checkpoint_stale(tmp_path):
    """An option that only changes evaluation (``test_sweeps``, the code quadrature) may differ from the one a
    finished fold was trained with: the fold is reused (not retrained) and evaluated with the value asked now;
    a training option that differs is refused."""
    from ppl_vae.errors import StaleCheckpointError
    from ppl_vae.models.config import inference_option_names
    from ppl_vae.pipeline import run_experiment
    assert inference_option_names(model_class("hh-vaem").Config) == {"test_sweeps", "code_likelihood",
                                                                      "quadrature_nodes", "quadrature_grid"}
    ds = load_dataset("yacht")
    kw = dict(latent_dim=4, hmc_steps=2, leapfrog_steps=2, sksd_chains=4, test_sweeps=1)
    run = lambda **extra: run_experiment("hmc-vaem", ds, splits=1, steps=30, num_samples=8, seed=0,  # noqa: E731
                                         out=tmp_path, progress=False, model_kwargs={**kw, **extra})
    first = run()
    ckpt = tmp_path / "fold0" / "checkpoint.pt"
    trained_at = ckpt.stat().st_mtime_ns
    again = run(test_sweeps=3, quadrature_grid=False)
    assert ckpt.stat().st_mtime_ns == trained_at                      # reused, not retrained
    assert float(again["imputation_nll"][0]) != pytest.approx(float(first["imputation_nll"][0]), abs=1e-6)
    with pytest.raises(StaleCheckpointError, match="leapfrog_steps"):
        run(leapfrog_steps=3)


def test_checkpoint_from_before_an_option_existed_is_judged_by_its_legacy_value(tmp_path):
    """A finished fold written before a training option existed is compared with the behaviour it was trained with
    (the class's ``legacy_config``), not with today's default: ``code_input`` absent means the encoder means, so
    it is reused when ``"mean"`` is asked and refused, naming the option, when ``"sample"`` is."""
    from ppl_vae.errors import StaleCheckpointError
    from ppl_vae.infer.checkpoint import _atomic_torch_save, load_checkpoint
    from ppl_vae.pipeline import run_experiment
    ds = load_dataset("yacht")
    run = lambda **extra: run_experiment("vaem", ds, splits=1, steps=20, num_samples=8, seed=0,  # noqa: E731
                                         out=tmp_path, progress=False,
                                         model_kwargs={"latent_dim": 3, "marginal_steps": 10, **extra})
    run()
    ckpt = tmp_path / "fold0" / "checkpoint.pt"
    payload = load_checkpoint(ckpt)
    for where in (payload["settings"]["config"], payload["config"]):
        where.pop("code_input", None), where.pop("marginal_lr", None)  # as written before these options existed
    _atomic_torch_save(payload, ckpt)
    trained_at = ckpt.stat().st_mtime_ns
    run()
    assert ckpt.stat().st_mtime_ns == trained_at                      # reused
    with pytest.raises(StaleCheckpointError, match="code_input"):
        run(code_input="sample")


def test_sampled_marginal_codes_are_drawn_once_per_batch(boston_split):
    """``code_input="sample"``: the dependency VAE reads one draw from q(z_d | x_d) per row (the reference code),
    the same draw for the encoder input and the code likelihood of a step; ``"mean"`` reads the encoder mean."""
    ds = load_dataset("boston")
    batch = boston_split.train.batch()[:64]
    means = VAEM(ds.schema, latent_dim=3, marginal_steps=5)
    torch.manual_seed(0)
    sampled = VAEM(ds.schema, latent_dim=3, marginal_steps=5, code_input="sample")
    sampled.marginal.load_state_dict(means.marginal.state_dict())
    loc, scale = means.marginal.encode(means.observation_features_for_predictor(batch), batch.x_mask.bool())
    observed = batch.x_mask.bool()
    assert torch.equal(means.codes(batch)[observed], loc[observed])
    z = sampled.codes(batch)
    assert z is sampled.codes(batch) and z is sampled.observation_features(batch)   # one draw per batch
    std = ((z - loc) / scale)[observed]
    assert abs(float(std.mean())) < 0.1 and float(std.std()) == pytest.approx(1.0, abs=0.1)
    assert torch.all(z[~observed] == 0)
    with pytest.raises(ValueError, match="code_input"):
        VAEM(ds.schema, code_input="draw")


def test_resume_after_crash_matches_uninterrupted_run(boston_split, tmp_path):
    ds = load_dataset("boston")

    def train(steps, ckpt, crash_at=None):
        torch.manual_seed(0)
        model = VAE(ds.schema, latent_dim=4)
        loader = boston_split.train.loader(32, seed=0)

        def batches():
            for i, b in enumerate(loader):
                if crash_at is not None and i == crash_at:
                    raise KeyboardInterrupt("simulated crash")
                yield b
        trainer = Trainer(model, seed=0, progress=False, checkpoint=ckpt, checkpoint_every=50)
        trainer.fit(batches, steps)
        return model

    ref = train(150, None)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train(150, ckpt, crash_at=120)
    assert ckpt.exists()
    resumed = train(150, ckpt)           # picks up at step 100 from the checkpoint
    for (k, v), (_, w) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=0, atol=1e-6, msg=k)


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownNameError, match="vaem"):
        build_model("vaemm", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda(boston_split):
    ds = load_dataset("boston")
    model = VAEM(ds.schema, latent_dim=5, marginal_steps=20)
    Trainer(model, device="cuda", progress=False).fit(boston_split.train, 40)
    assert next(model.parameters()).device.type == "cuda"
    metrics = evaluate_split(model, boston_split, num_samples=50)
    assert math.isfinite(metrics["target_nll"])


def test_hmc_model_posterior_uses_test_sweeps(boston_split):
    ds = load_dataset("boston")
    model = build_model("hmc-vae", ds.schema, latent_dim=4, hmc_steps=3, leapfrog_steps=2, test_sweeps=2)
    stages = model.training_stages(100)
    assert [s.name for s in stages] == ["elbo", "hmc"] and stages[1].steps == 10
    assert set(stages[1].param_lrs) == {"hmc_guide", "decoder", "predictor"}
    batch = boston_split.test_input()[:5]
    h = model.posterior_latents(batch, 7)
    assert h.shape == (7, 5, 4) and torch.isfinite(h).all() and not h.requires_grad
    assert model.hmc_guide.last_trace.accept_prob.shape == (6, 7, 5)   # 2 sweeps x T=3 transitions
    with pytest.raises(ValueError, match="test_sweeps"):
        build_model("hmc-vae", ds.schema, test_sweeps=0)


@pytest.mark.parametrize("base", ["vae", "vaem"])
def test_hmc_model_pretrains_like_its_base(base, boston_split):
    """The ELBO pre-training of hmc-X is X's training: same defaults (KL warm-up included) and, before the joint
    stage starts, identical parameters for the same seed."""
    from ppl_vae.pipeline import DEFAULT_MODEL_KWARGS, fit_split

    assert DEFAULT_MODEL_KWARGS["hmc-" + base] == DEFAULT_MODEL_KWARGS[base]
    assert DEFAULT_MODEL_KWARGS[base]["kl_warmup"] > 0
    ds = load_dataset("boston")
    small = {"latent_dim": 3, "hidden": [16, 16], "kl_warmup": 5, **({"marginal_steps": 10} if base == "vaem" else {})}
    # hmc-X at 30 steps: its last ELBO stage is split 90% / 10% into pre-training and the joint stage
    plain_steps = 27 if base == "vae" else 10 + 18
    plain, _ = fit_split(base, ds, boston_split, steps=plain_steps, progress=False, model_kwargs=small)
    hmc, _ = fit_split("hmc-" + base, ds, boston_split, steps=30, progress=False,
                       model_kwargs={**small, "hmc_fraction": 0.1, "joint_lr_scale": 0.0, "hmc_lr": 0.0})
    for name, p in plain.named_parameters():
        if name.startswith("encoder"):
            continue  # the encoder keeps training by the ELBO in the joint stage
        torch.testing.assert_close(p, dict(hmc.named_parameters())[name], msg=name)

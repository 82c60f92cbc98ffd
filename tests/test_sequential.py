"""Moving-digit sequences, the SVG-LP sequential VAE (pyro.markov time loop) and its next-frame experiment."""
import time

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from ppl_vae.data.sequences import bounce, moving_digits, sequence_batch
from ppl_vae.errors import UnknownNameError
from ppl_vae.models.base import Batch
from ppl_vae.models.image.sequential import SequentialVAE


def small_model(T=4, canvas=12, **kw):
    return SequentialVAE(seq_len=T, frame_dim=canvas * canvas, hidden=32, rnn_hidden=32, dim_z=4, **kw)


def traces(model, batch):
    guide_tr = poutine.trace(model.guide).get_trace(batch)
    model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(batch)
    return guide_tr, model_tr


# ---------------------------------------------------------------------------------------------------- data
def test_moving_digits_shapes_range_seed_and_speed():
    moving_digits(1)                                                 # load (and cache) the scikit-learn digits
    t0 = time.perf_counter()
    frames = moving_digits(2000, seq_len=10, canvas=20, seed=0)
    assert time.perf_counter() - t0 < 1.0
    assert frames.shape == (2000, 10, 400) and frames.dtype == torch.float32
    assert frames.min() == 0 and frames.max() == 1.0
    assert torch.equal(frames, moving_digits(2000, seed=0))
    assert not torch.equal(frames, moving_digits(2000, seed=1))
    # grey levels are multiples of 1/16 (load_digits / 16)
    assert torch.allclose(frames * 16, (frames * 16).round())


def test_digits_bounce_and_never_leave_the_canvas():
    frames = moving_digits(500, seq_len=30, canvas=14, seed=3).reshape(500, 30, 14, 14)
    ink = frames.sum((2, 3))
    assert torch.allclose(ink, ink[:, :1].expand_as(ink))          # the whole digit is on the canvas at every frame
    rows = torch.arange(14.0)
    com = (frames.sum(3) * rows).sum(2) / ink                        # centre of mass, row axis: (N, T)
    step = com[:, 1:] - com[:, :-1]
    assert step.abs().max() <= 2 + 1e-4                             # |v| <= max_speed
    reversals = (step[:, 1:] * step[:, :-1] < -1e-6).any(1)
    assert reversals.float().mean() > 0.5                           # most digits bounce within 30 frames (L = 6)
    assert np.array_equal(bounce(np.arange(-3, 10), 3), [3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3])
    assert np.array_equal(bounce(np.array([-1, 13, 24, 25]), 12), [1, 11, 0, 1])


def test_moving_digits_bad_inputs():
    with pytest.raises(ValueError, match="canvas"):
        moving_digits(3, canvas=8)
    with pytest.raises(ValueError, match="max_speed"):
        moving_digits(3, canvas=10, max_speed=3)
    with pytest.raises(ValueError, match="digit_rows"):
        moving_digits(3, digit_rows=[5000])
    with pytest.raises(UnknownNameError, match="sklearn"):
        moving_digits(3, source="mnist")
    a = moving_digits(50, canvas=12, digit_rows=[7])
    assert torch.allclose(a.sum(-1), a[0, 0].sum())                 # one digit image for every sequence


def test_sequence_batch_masks_missing_frames_and_nan():
    frames = moving_digits(3, seq_len=4, canvas=10)
    frames[0, 1, 5] = float("nan")
    observed = torch.ones(3, 4, dtype=torch.bool)
    observed[2, 3] = False
    b = sequence_batch(frames, observed)
    assert b.x.shape == (3, 400) and b.x_mask.shape == (3, 400)
    assert not b.x_mask[2, 300:].any() and b.x_mask[2, :300].all()
    assert not b.x_mask[0, 105] and b.x[0, 105] == 0 and b.x_mask.sum() == 3 * 400 - 100 - 1
    assert torch.isfinite(b.x).all()
    b.validate()
    with pytest.raises(ValueError, match="frames must be"):
        sequence_batch(frames.reshape(3, -1))
    with pytest.raises(ValueError, match="observed must be"):
        sequence_batch(frames, observed[:, :2])


# ---------------------------------------------------------------------------------------------------- model
def test_trace_has_one_latent_and_one_observed_frame_site_per_time_step():
    model = small_model(T=4)
    batch = sequence_batch(moving_digits(5, seq_len=4, canvas=12))
    guide_tr, model_tr = traces(model, batch)
    for t in range(4):
        assert model_tr.nodes[f"z_{t}"]["value"].shape == (5, 4)
        assert guide_tr.nodes[f"z_{t}"]["value"] is model_tr.nodes[f"z_{t}"]["value"]
        x = model_tr.nodes[f"x_{t}"]
        assert x["is_observed"] and x["fn"].event_shape == (144,) and x["fn"].batch_shape == (5,)
        assert torch.equal(x["value"], batch.x[:, t * 144:(t + 1) * 144])
    assert "z_4" not in model_tr.nodes and "x_4" not in model_tr.nodes
    # teacher forcing and causality: with the same z, p(x_2 | ...) reads frame x_1 but never x_2 or x_3
    for changed, affected in ((1, {2, 3}), (2, {3}), (3, set())):
        edited = batch.x.clone()
        edited[:, changed * 144:(changed + 1) * 144] = torch.rand(5, 144)
        edited_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(batch.replace(x=edited))
        moved = {t for t in range(4)
                 if not torch.allclose(edited_tr.nodes[f"x_{t}"]["fn"].mean, model_tr.nodes[f"x_{t}"]["fn"].mean)}
        assert moved == affected, (changed, moved)
    assert [f.name for f in model_tr.nodes["z_0"]["cond_indep_stack"]] == ["data"]
    with pytest.raises(ValueError, match="T\\*144"):
        model.model(sequence_batch(torch.zeros(2, 3, 100)))


def test_missing_frame_pixels_do_not_affect_the_likelihood():
    model = small_model(T=4)
    frames = moving_digits(6, seq_len=4, canvas=12, seed=2)
    observed = torch.ones(6, 4, dtype=torch.bool)
    observed[:, 2] = False
    nan_frames, noise_frames = frames.clone(), frames.clone()
    nan_frames[:, 2] = float("nan")
    noise_frames[:, 2] = torch.rand(6, 144)
    pyro.set_rng_seed(1)
    nan_batch = Batch(x=nan_frames.reshape(6, -1), x_mask=sequence_batch(nan_frames).x_mask)
    guide_tr, model_tr = traces(model, nan_batch)                     # NaN pixels in x, masked
    lp_nan = model_tr.log_prob_sum()
    assert torch.isfinite(lp_nan)
    assert model_tr.nodes["x_2"]["fn"].log_prob(model_tr.nodes["x_2"]["value"]).abs().max() == 0
    pyro.set_rng_seed(1)
    _, model_tr2 = traces(model, sequence_batch(noise_frames, observed))
    assert torch.equal(model_tr2.log_prob_sum(), lp_nan)
    pyro.set_rng_seed(1)
    _, model_tr3 = traces(model, sequence_batch(noise_frames))          # the same frame observed: it counts
    assert not torch.allclose(model_tr3.log_prob_sum(), lp_nan)
    # gradients of the ELBO stay finite with NaN in the missing frame
    loss = pyro.infer.Trace_ELBO().differentiable_loss(model.model, model.guide, nan_batch)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_particles_broadcast_rollout_and_iw_likelihood():
    from ppl_vae.infer.likelihood import iw_log_likelihood

    model = small_model(T=4)
    frames = moving_digits(3, seq_len=4, canvas=12)
    ll = iw_log_likelihood(model.model, model.guide, sequence_batch(frames), num_particles=7)
    assert ll.shape == (3,) and torch.isfinite(ll).all() and (ll < 0).all()
    paths = model.rollout(frames[:, :2], horizon=5, num_samples=4)
    assert paths.shape == (4, 3, 5, 144) and 0 <= paths.min() and paths.max() <= 1
    assert paths.std(0).max() > 0                                     # future z drawn from the learned prior
    nxt = model.predict_next(frames[:, :2], num_samples=4)
    assert nxt.shape == (3, 144)
    with pytest.raises(ValueError, match="frames must be"):
        model.rollout(frames[:, :0], 1)


def test_config_typo_and_bad_options():
    with pytest.raises(TypeError, match="rnn_hidden"):
        SequentialVAE(rnn_hiden=16)
    with pytest.raises(ValueError, match="dim_z"):
        SequentialVAE(dim_z=0)
    with pytest.raises(UnknownNameError):
        SequentialVAE(likelihood="poisson")
    m = SequentialVAE(seq_len=3, frame_dim=10, likelihood="gaussian", pixel_scale=0.1)
    assert m.x_dim == 30 and type(m)(**m.config).config == m.config
    assert np.isfinite(pyro.infer.Trace_ELBO().loss(m.model, m.guide, sequence_batch(torch.rand(2, 3, 10))))


def test_training_reduces_loss_and_beats_last_frame():
    from ppl_vae.experiments.lectures.common import labelled_batches, train_model
    from ppl_vae.experiments.lectures.sequential import constant_velocity_prediction

    frames = moving_digits(256, seq_len=5, canvas=12, seed=0, max_speed=1, digit_rows=range(20))
    test = moving_digits(100, seq_len=5, canvas=12, seed=1, max_speed=1, digit_rows=range(20))
    model = SequentialVAE(seq_len=5, frame_dim=144, hidden=64, rnn_hidden=64, dim_z=4)
    losses = train_model(model, labelled_batches(frames.reshape(256, -1), None, 32, seed=0), 250, lr=5e-3)
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:5])
    pred = model.predict_next(test[:, :3], num_samples=5)
    model_mse = ((pred - test[:, 3]) ** 2).mean()
    last_mse = ((test[:, 2] - test[:, 3]) ** 2).mean()
    assert model_mse < 0.8 * last_mse, (model_mse, last_mse)
    cv = constant_velocity_prediction(test[:, :3], 12)
    assert ((cv - test[:, 3]) ** 2).mean() < 0.5 * last_mse


def test_constant_velocity_is_exact_away_from_the_walls():
    from ppl_vae.experiments.lectures.sequential import constant_velocity_prediction

    frames = moving_digits(300, seq_len=3, canvas=20, seed=4)
    pred = constant_velocity_prediction(frames[:, :2], 20)
    exact = (pred - frames[:, 2]).abs().amax(-1) < 1e-6
    assert exact.float().mean() > 0.7
    with pytest.raises(ValueError, match="t >= 2"):
        constant_velocity_prediction(frames[:, :1], 20)


def test_smoke_experiment_runs(tmp_path):
    from ppl_vae.experiments.lectures.sequential import run

    out = run(tmp_path, smoke=True)
    for key in ("model_mse", "last_frame_mse", "constant_velocity_mse", "model_mse_avg", "last_frame_mse_avg",
                "constant_velocity_mse_avg", "model_nll", "train_rows", "steps", "seconds"):
        assert isinstance(out[key], (int, float)), key
    assert out["model"] == "seq-vae" and 0 < out["model_mse"] < 1
    assert out["constant_velocity_mse"] < out["last_frame_mse"]
    assert (tmp_path / "sequential_predictions.png").stat().st_size > 1000

"""Multimodal PoE VAE (Wu & Goodman 2018) and VampPrior VAE (Tomczak & Welling 2018): the product-of-experts
arithmetic, masked modalities, cross-modal generation, the VampPrior density and its gain over N(0, I)."""
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from ppl_vae.errors import UnknownNameError
from ppl_vae.models.base import Batch
from ppl_vae.models.image.poe import PoEVAE, product_of_experts
from ppl_vae.models.image.vampprior import VampPriorVAE


def _batch(b=6, x_dim=20, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, x_dim, generator=g)
    y = torch.randint(k, (b, 1), generator=g).float()
    return Batch(x=x, x_mask=torch.ones_like(x, dtype=torch.bool), y=y, y_mask=torch.ones_like(y, dtype=torch.bool))


def _small_poe(**kw):
    return PoEVAE(x_dim=20, hidden=16, dim_z=3, num_classes=4, **kw)


@pytest.fixture(scope="module")
def poe_smoke():
    from ppl_vae.experiments.lectures import poe
    return poe.run(smoke=True)


@pytest.fixture(scope="module")
def vamp_smoke():
    from ppl_vae.experiments.lectures import vampprior
    return vampprior.run(smoke=True)


def test_product_of_experts_matches_hand_computation():
    locs = torch.tensor([[[1.0, -2.0]], [[3.0, 0.5]]])            # (M=2, B=1, D=2)
    scales = torch.tensor([[[1.0, 2.0]], [[0.5, 1.0]]])
    loc, scale = product_of_experts(locs, scales, torch.ones(2, 1, 1))
    # T = 1 + 1/1 + 1/0.25 = 6, mean = (1 + 3*4)/6 ; dim 2: T = 1 + 1/4 + 1 = 2.25, mean = (-2/4 + 0.5)/2.25 = 0
    assert torch.allclose(loc, torch.tensor([[13 / 6, 0.0]]), atol=1e-6)
    assert torch.allclose(scale, torch.tensor([[6 ** -0.5, 2.25 ** -0.5]]), atol=1e-6)
    loc, scale = product_of_experts(locs, scales, torch.tensor([[[1.0]], [[0.0]]]))   # second expert absent
    assert torch.allclose(loc, torch.tensor([[0.5, -0.4]]), atol=1e-6)              # 1/2, (-2/4)/1.25
    assert torch.allclose(scale, torch.tensor([[0.5 ** 0.5, 1.25 ** -0.5]]), atol=1e-6)


def test_poe_posterior_uses_experts_and_one_modality_is_broader():
    model, batch = _small_poe(), _batch()
    with torch.no_grad():
        loc, scale = model.posterior(batch)
        mi, si = model.image_expert(model.encoder(batch.x))
        ml, sl = model.label_expert(model.label_encoder(batch.y[:, 0].long()))
        t = 1 + si ** -2 + sl ** -2
        assert torch.allclose(scale, t.rsqrt(), atol=1e-6)
        assert torch.allclose(loc, (mi * si ** -2 + ml * sl ** -2) / t, atol=1e-5)
        s_image = model.posterior(batch.replace(y_mask=torch.zeros_like(batch.y_mask)))[1]
        s_label = model.posterior(batch.replace(x_mask=torch.zeros_like(batch.x_mask)))[1]
        assert (s_image > scale).all() and (s_label > scale).all()          # every row and dim
        assert torch.allclose(s_image, (1 + si ** -2).rsqrt(), atol=1e-6)
        none = batch.replace(x_mask=torch.zeros_like(batch.x_mask), y_mask=torch.zeros_like(batch.y_mask))
        l0, s0 = model.posterior(none)
        assert torch.equal(l0, torch.zeros_like(l0)) and torch.equal(s0, torch.ones_like(s0))   # prior expert


def test_absent_modalities_add_zero_and_loss_is_finite():
    model, batch = _small_poe(), _batch()
    mixed = batch.replace(x_mask=batch.x_mask & (torch.arange(6) % 3 != 0)[:, None],
                          y_mask=batch.y_mask & (torch.arange(6) % 3 != 1)[:, None])
    guide_tr = poutine.trace(model.guide).get_trace(mixed)
    tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(mixed)
    tr.compute_log_prob()
    assert torch.equal(tr.nodes["x"]["log_prob"][0::3], torch.zeros(2))   # image absent -> 0
    assert torch.equal(tr.nodes["y"]["log_prob"][1::3], torch.zeros(2))   # label absent -> 0
    assert (tr.nodes["x"]["log_prob"][1::3] < 0).all() and (tr.nodes["y"]["log_prob"][0::3] < 0).all()
    # values behind a False mask are never read: changing them leaves the loss unchanged
    other = mixed.replace(y=torch.where(mixed.y_mask, mixed.y, torch.full_like(mixed.y, 3.0)),
                          x=torch.where(mixed.x_mask, mixed.x, torch.full_like(mixed.x, 0.7)))
    stage = model.training_stages(1)[0]
    losses = []
    for b in (mixed, other):
        pyro.set_rng_seed(1)
        losses.append(stage.loss.loss(stage.model, stage.guide, b))
    assert math.isfinite(losses[0]) and losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_subsampled_objective_copies():
    batch = _batch(3)
    batch = batch.replace(y_mask=torch.tensor([[True], [False], [True]]),
                          x_mask=batch.x_mask & torch.tensor([[True], [True], [False]]))
    sub = PoEVAE.subsampled(batch)
    has_x, has_y = sub.x_mask.any(-1).tolist(), sub.y_mask[:, 0].tolist()
    # paired copy keeps only row 0; image copy rows 0, 1; label copy rows 0, 2
    assert has_x == [True, False, False, True, True, False, False, False, False]
    assert has_y == [True, False, False, False, False, False, True, False, True]
    plain_model = _small_poe(subsample_elbo=False)
    assert plain_model.training_stages(5)[0].model == plain_model.model
    seen = []
    model = _small_poe()
    model.guide = lambda b: seen.append(b.size)     # the stage wraps whatever guide the base stage holds
    model.training_stages(5)[0].guide(batch)
    assert seen == [9]


def test_cross_generation_and_label_prediction(poe_smoke):
    r = poe_smoke
    for key in ("posterior_std_image_only", "posterior_std_both", "posterior_std_label_only",
                "label_accuracy_from_image", "cross_generation_accuracy", "seconds"):
        assert isinstance(r[key], float), key
    assert r["posterior_std_image_only"] > r["posterior_std_both"]
    assert r["posterior_std_label_only"] > r["posterior_std_both"]
    assert r["fraction_dims_broader_image_only"] == 1.0
    assert r["label_accuracy_from_image"] > 0.4 and r["cross_generation_accuracy"] > 0.4   # chance 0.1
    model = _small_poe()
    images = model.cross_generate_image(torch.tensor([0, 1, 3]))
    assert images.shape == (3, 20) and ((images > 0) & (images < 1)).all()
    probs = model.predict_label(torch.rand(5, 20))
    assert probs.shape == (5, 4) and torch.allclose(probs.sum(-1), torch.ones(5))
    with pytest.raises(ValueError, match="labels"):
        model.cross_generate_image(torch.tensor([4]))


def test_vampprior_density_is_logsumexp_over_pseudo_inputs():
    model = VampPriorVAE(x_dim=20, hidden=16, dim_z=3, num_pseudo=5)
    z = torch.randn(7, 3)
    with torch.no_grad():
        u = model.pseudo_inputs
        assert u.shape == (5, 20) and (u >= 0).all() and (u <= 1).all()
        loc, scale = model.z_head(model.encoder(u))
        comp = torch.distributions.Normal(loc, scale).log_prob(z[:, None, :]).sum(-1)     # (7, 5)
        hand = torch.logsumexp(comp, -1) - math.log(5)
        assert torch.allclose(model.prior(z).log_prob(z), hand, atol=1e-5)
        normal = VampPriorVAE(x_dim=20, hidden=16, dim_z=3, prior="normal")
        assert normal.pseudo_inputs is None
        assert torch.allclose(normal.prior(z).log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1))
    tr = poutine.trace(model.model).get_trace(_batch(4))
    assert tr.nodes["z"]["value"].shape == (4, 3) and not tr.nodes["z"]["fn"].has_enumerate_support
    assert model.sample(6, torch.Generator().manual_seed(0)).shape == (6, 20)
    model.init_pseudo_inputs((torch.rand(10, 20) > 0.5).float(), torch.Generator().manual_seed(0))
    u = model.pseudo_inputs
    assert (((u - 0.05).abs() < 1e-6) | ((u - 0.95).abs() < 1e-6)).all()      # inside hardtanh's linear part


def test_vampprior_beats_normal_prior(vamp_smoke):
    r = vamp_smoke
    assert set(r) >= {"iw_ll_vamp", "iw_ll_normal", "iw_ll_difference", "num_particles", "steps", "seconds"}
    assert -250 < r["iw_ll_normal"] < r["iw_ll_vamp"] < 0
    assert r["iw_ll_difference"] > 1.0                          # nats per image, same networks/steps/seed


def test_config_typos_and_bad_values():
    with pytest.raises(TypeError, match="dim_z"):
        PoEVAE(dim_zz=3)
    with pytest.raises(TypeError, match="num_pseudo"):
        VampPriorVAE(num_pseudos=3)
    with pytest.raises(UnknownNameError):
        VampPriorVAE(prior="vampp")
    with pytest.raises(ValueError, match="label_weight"):
        PoEVAE(label_weight=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        PoEVAE(num_classes=1)
    with pytest.raises(ValueError, match=r"batch\.y"):
        PoEVAE(x_dim=20).posterior(Batch(x=torch.rand(2, 20), x_mask=torch.ones(2, 20, dtype=torch.bool)))

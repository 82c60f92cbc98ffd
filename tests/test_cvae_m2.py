"""CVAE (Sohn et al. 2015) and semi-supervised M2 (Kingma et al. 2014) as Pyro programs; their smoke experiments."""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from ppl_vae.errors import PplVaeError
from ppl_vae.experiments.lectures.common import label_batch, labelled_batches, mnist_data, train_model
from ppl_vae.models.base import Batch
from ppl_vae.models.image.cvae import CVAE, with_onehot
from ppl_vae.models.image.m2 import M2


@pytest.fixture(scope="module")
def digits():
    """3,000 vendored MNIST digits: 2,500 training and 500 held-out rows."""
    return mnist_data(n_test=500, seed=0, limit=3000)


def _tiny_m2(**kw) -> M2:
    torch.manual_seed(0)
    return M2(hidden=16, dim_z=3, **kw)


def _mixed(digits, n: int = 12, labelled=(1, 4, 5)) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    x, y = digits[0][:n], digits[1][:n]
    lab = torch.zeros(n, dtype=torch.bool)
    lab[list(labelled)] = True
    return label_batch(x, y, lab), y, lab


# ------------------------------------------------------------------------------------------ CVAE
def test_cvae_conditional_samples_show_their_class(digits):
    """After 200 SVI steps on 2,500 digits, conditional samples are classified as the class they were drawn for far
    above chance (0.1). Judge: nearest class mean of the real training images (fast; 0.8 on real held-out rows)."""
    train_x, train_y, test_x, test_y = digits
    means = torch.stack([train_x[train_y == k].mean(0) for k in range(10)])

    def judge(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, means).argmin(-1)

    assert float((judge(test_x) == test_y).float().mean()) > 0.75          # the judge itself is sound
    model = CVAE(hidden=128, dim_z=2)
    train_model(model, labelled_batches(train_x, train_y, 64, seed=0), 200, lr=3e-3, seed=0)
    c = torch.arange(10).repeat_interleave(30)
    images = model.sample(c, torch.Generator().manual_seed(0))
    assert images.shape == (300, 784) and float(images.min()) >= 0 and float(images.max()) <= 1
    acc = float((judge(images) == c).float().mean())
    assert acc > 0.6, acc
    # the condition, not the noise, sets the class: the same z with another c gives another digit
    z = torch.randn(300, model.dim_z, generator=torch.Generator().manual_seed(1))
    shifted = (c + 3) % 10
    assert float((judge(model.generate(z, shifted)) == shifted).float().mean()) > 0.6


def test_cvae_needs_every_label(digits):
    x, y = digits[0][:6], digits[1][:6]
    model = CVAE(hidden=16, dim_z=2)
    assert math.isfinite(Trace_ELBO().loss(model.model, model.guide, label_batch(x, y)))
    with pytest.raises(PplVaeError, match="6 row"):
        model.model(label_batch(x, None))
    with pytest.raises(PplVaeError, match="1 row"):
        model.guide(label_batch(x, y, torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)))
    with pytest.raises(PplVaeError, match="no label"):
        model.guide(Batch(x=x, x_mask=torch.ones_like(x, dtype=torch.bool)))
    with pytest.raises(PplVaeError, match="integer class codes"):
        model.model(label_batch(x, y).replace(y=torch.full((6, 1), 10.0)))
    with pytest.raises(ValueError, match="classes in 0..9"):
        model.sample(torch.tensor([0, 11]))


def test_config_typos_and_bad_values_raise():
    with pytest.raises(TypeError, match="'alpha'"):
        M2(alhpa=1.0)
    with pytest.raises(TypeError, match="num_classes"):
        CVAE(num_clases=3)
    with pytest.raises(ValueError, match="alpha"):
        M2(alpha=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        CVAE(num_classes=0)
    assert M2(M2.Config(alpha=0.5)).alpha == 0.5 and CVAE(dim_z=3).config["dim_z"] == 3


# ------------------------------------------------------------------------------------------ M2
def _hand_m2_loss(m: M2, batch: Batch, y: torch.Tensor, lab: torch.Tensor, seed: int) -> torch.Tensor:
    """-(sum_labelled L(x, y) + sum_unlabelled U(x)) of Kingma et al. eqs. 6-7, the sum over y written out, with
    the z draws TraceEnum_ELBO makes under ``pyro.set_rng_seed(seed)`` (one (K, B, dim_z) draw)."""
    K, B = m.num_classes, batch.size
    with torch.no_grad():
        h = m.encoder(batch.x)
        log_q = m.classifier(h).log_softmax(-1).T                                  # (K, B)
        ks = torch.where(lab, y, torch.arange(K)[:, None].expand(K, B))            # labelled rows: their label
        loc, scale = m.z_head(with_onehot(h, ks, K))
        pyro.set_rng_seed(seed)
        z = dist.Normal(loc, scale).rsample()                                      # (K, B, dim_z)
        log_px = m.pixel_distribution(m.decoder(with_onehot(z, ks, K)), batch.x_mask).log_prob(batch.x)
        elbo_y = (log_px - math.log(K) + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
                  - dist.Normal(loc, scale).log_prob(z).sum(-1))                   # L(x, y) per (y, row)
        unlabelled = (log_q.exp() * (elbo_y - log_q)).sum(0)                       # U(x)
        labelled = elbo_y.gather(0, y[None])[0]
        return -torch.where(lab, labelled, unlabelled).sum()


@pytest.mark.parametrize("labelled", [(), (1, 4, 5)], ids=["unlabelled", "mixed"])
def test_m2_enumeration_sums_over_the_missing_labels_exactly(digits, labelled):
    m = _tiny_m2()
    batch, y, lab = _mixed(digits, labelled=labelled)
    if not labelled:
        batch = label_batch(batch.x, None)
    pyro.set_rng_seed(3)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(m.model, m.guide, batch)
    assert loss == pytest.approx(float(_hand_m2_loss(m, batch, y, lab, seed=3)), rel=1e-5)


def test_m2_guide_never_samples_an_observed_label(digits):
    m = _tiny_m2()
    batch, y, lab = _mixed(digits)
    guide = pyro.poutine.trace(m.guide).get_trace(batch)
    assert "y_observed" not in guide.nodes and guide.nodes["y_unobserved"]["value"].shape == (12,)
    assert torch.equal(guide.nodes["y_unobserved"]["value"][lab], y[lab])   # point mass on the label
    model = pyro.poutine.trace(pyro.poutine.replay(m.model, trace=guide)).get_trace(batch)
    assert model.nodes["y_observed"]["is_observed"] and torch.equal(model.nodes["y"]["value"][lab], y[lab])
    # every discrete latent has a guide site, so the importance-weighted bound is defined and above the ELBO
    from ppl_vae.infer.likelihood import iw_log_likelihood

    iw = iw_log_likelihood(m.model, m.guide, batch, num_particles=64)
    elbo = -TraceEnum_ELBO(max_plate_nesting=1, num_particles=64, vectorize_particles=True).loss(
        m.model, m.guide, batch) / batch.size
    assert iw.shape == (12,) and torch.isfinite(iw).all() and float(iw.mean()) > elbo


def test_m2_classification_term_is_alpha_weighted_cross_entropy(digits):
    """SemiSupervisedELBO = TraceEnum_ELBO + alpha * B / B_l * sum_labelled -log q(y|x) (Kingma et al. eq. 9)."""
    m = _tiny_m2(alpha=0.7)
    batch, y, lab = _mixed(digits)
    objective = m.training_stages(10)[0].loss
    pyro.set_rng_seed(5)
    total = objective.loss(m.model, m.guide, batch)
    pyro.set_rng_seed(5)
    elbo = TraceEnum_ELBO(max_plate_nesting=1).loss(m.model, m.guide, batch)
    with torch.no_grad():
        ce = -m.class_logits(batch.x).log_softmax(-1)[lab, y[lab]].sum()
    assert total - elbo == pytest.approx(0.7 * 12 / 3 * float(ce), rel=1e-5)
    assert float(m.class_probs(batch.x).sum(-1).sub(1).abs().max()) < 1e-6


def test_m2_learns_from_few_labels(digits):
    """150 steps with 20 labels per class and the rest unlabelled: q(y|x) classifies far above chance (0.1)."""
    from ppl_vae.experiments.lectures.m2 import labelled_subset, semi_supervised_batches

    train_x, train_y, test_x, test_y = digits
    lab = labelled_subset(train_y, 20, seed=0)
    torch.manual_seed(0)
    m = M2(hidden=64, dim_z=4, alpha=2.0)
    history = train_model(m, semi_supervised_batches(train_x, train_y, lab, 64, 16, seed=0), 150, lr=3e-3)
    assert all(math.isfinite(h) for h in history)
    acc = float((m.classify(test_x) == test_y).float().mean())
    assert acc > 0.55, acc


# ------------------------------------------------------------------------------------------ experiments
def test_smoke_experiments(tmp_path):
    from ppl_vae.experiments.lectures import cvae, m2

    out = cvae.run(tmp_path, smoke=True)
    assert {"conditional_accuracy", "chance", "test_elbo", "test_iw_log_lik", "steps", "seconds"} <= set(out)
    assert out["model"] == "cvae" and out["chance"] == 0.1 and (tmp_path / "cvae_samples.png").stat().st_size > 0
    assert 0 <= out["conditional_accuracy"] <= 1 and math.isfinite(out["test_elbo"])
    out = m2.run(smoke=True)
    assert {"m2_accuracy", "baseline_accuracy", "gain", "labelled_rows", "test_elbo"} <= set(out)
    assert out["model"] == "m2" and out["labelled_rows"] == 100 and math.isfinite(out["test_elbo"])
    assert all(isinstance(v, (int, float, str)) for v in out.values())

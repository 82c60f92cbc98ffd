"""VaDE (Jiang et al. 2017) and the clustering metrics: Hungarian accuracy, NMI, responsibilities (eq. 16), the
enumerated ELBO, the pre-training + GMM initialisation, clustering of separated blobs and the smoke experiment."""
import math

import numpy as np
import pyro
import pyro.infer
import pytest
import torch

from ppl_vae.experiments.lectures.clustering import (cluster_accuracy, cluster_matching, kmeans_clusters,
                                                     normalized_mutual_info)
from ppl_vae.models.base import Batch
from ppl_vae.models.image.vade import VaDE


def _batch(x):
    return Batch(x=x, x_mask=torch.ones_like(x, dtype=torch.bool))


def _blobs(n_per=150, k=4, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(k, d, generator=g)
    labels = torch.arange(k).repeat_interleave(n_per)
    x = centres[labels] + 0.3 * torch.randn(k * n_per, d, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return x[perm], labels[perm]


def _train(model, x, steps, lr=5e-3, batch_size=100):
    from ppl_vae.experiments.lectures.common import train_model

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            for rows in torch.randperm(x.shape[0], generator=g).split(batch_size):
                if rows.numel() == batch_size:
                    yield _batch(x[rows])
    return train_model(model, batches(), steps, lr=lr, seed=0)


# ---------------------------------------------------------------- metrics
def test_cluster_accuracy_permutation_and_hand_example():
    y = np.array([0, 1, 2, 3, 1, 2, 0, 3])
    perm = np.array([2, 0, 3, 1])
    assert cluster_accuracy(y, perm[y]) == 1.0
    assert normalized_mutual_info(y, perm[y]) == pytest.approx(1.0)
    # contingency: cluster 1 = {0, 0}, cluster 0 = {0, 1, 1}, cluster 2 = {2}: best map 1->0, 0->1, 2->2, 5 of 6
    labels, clusters = [0, 0, 0, 1, 1, 2], [1, 1, 0, 0, 0, 2]
    assert cluster_accuracy(labels, clusters) == pytest.approx(5 / 6)
    assert list(cluster_matching(labels, clusters)) == [1, 0, 2]
    # more clusters than classes: the unmatched cluster's points are errors
    assert cluster_accuracy([0, 0, 1, 1], [0, 1, 2, 2]) == pytest.approx(0.75)
    assert cluster_accuracy(torch.tensor([0, 1]), torch.tensor([0, 0])) == 0.5
    with pytest.raises(ValueError, match="equal length"):
        cluster_accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="integer"):
        cluster_accuracy([0, 1], [0.5, 1])
    with pytest.raises(ValueError, match="1-D"):
        normalized_mutual_info(np.zeros((2, 2), dtype=int), np.zeros((2, 2), dtype=int))


def test_kmeans_on_blobs():
    x, y = _blobs()
    assert cluster_accuracy(y, kmeans_clusters(x, 4)) == 1.0


# ---------------------------------------------------------------- model pieces
def test_config_errors():
    with pytest.raises(TypeError, match="num_cluster"):
        VaDE(num_cluster=3)
    with pytest.raises(ValueError, match="pretrain_fraction"):
        VaDE(pretrain_fraction=1.0)
    with pytest.raises(KeyError, match="pretrain"):
        VaDE(pretrain="sae")
    with pytest.raises(ValueError, match="num_clusters"):
        VaDE(num_clusters=0)


def test_responsibilities_are_bayes_rule():
    m = VaDE(x_dim=3, dim_z=2, num_clusters=3, likelihood="gaussian", hidden=8)
    pi = torch.tensor([0.5, 0.3, 0.2])
    mu = torch.tensor([[0.0, 0.0], [1.0, -1.0], [3.0, 2.0]])
    sigma = torch.tensor([[1.0, 0.5], [2.0, 1.0], [0.7, 0.7]])
    with torch.no_grad():
        m.pi_logits.copy_(pi.log() + 1.7)                         # softmax is shift invariant
        m.cluster_loc.copy_(mu)
        m.cluster_raw_scale.copy_(torch.log(torch.expm1(sigma - 1e-3)))
    z = torch.tensor([[0.5, -0.2], [2.0, 1.0]])
    hand = np.zeros((2, 3))
    for i in range(2):
        for c in range(3):
            dens = 1.0
            for j in range(2):
                s, d = sigma[c, j].item(), z[i, j].item() - mu[c, j].item()
                dens *= math.exp(-0.5 * (d / s) ** 2) / (s * math.sqrt(2 * math.pi))
            hand[i, c] = pi[c].item() * dens
    hand /= hand.sum(1, keepdims=True)
    gamma = m.cluster_log_posterior(z).exp()
    np.testing.assert_allclose(gamma.detach().numpy(), hand, rtol=1e-5)
    x = torch.randn(7, 3)
    r = m.responsibilities(x)
    assert r.shape == (7, 3)
    torch.testing.assert_close(r.sum(-1), torch.ones(7))
    torch.testing.assert_close(r, m.cluster_log_posterior(m.z_head(m.encoder(x))[0]).exp())
    torch.testing.assert_close(m.cluster(x), r.argmax(-1))


def test_enumerated_elbo_is_the_mixture_marginal_and_detaching_gamma_changes_no_gradient():
    """With q(c | z) = p(c | z) the enumerated ELBO equals log p(x | z) + log sum_c pi_c N(z | mu_c, sigma_c) -
    log q(z | x); and at that q(c | z) the ELBO is stationary in q(c | z), so the detached gamma gives the same
    gradients as a differentiable one."""
    m = VaDE(x_dim=5, dim_z=3, num_clusters=4, likelihood="gaussian", hidden=16)
    with torch.no_grad():
        m.pi_logits.copy_(torch.randn(4))
    batch = _batch(torch.randn(6, 5))
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)

    class Differentiable(VaDE):
        def guide(self, batch):
            pyro.module(self.pyro_name, self)
            loc, scale = self.z_head(self.encoder(batch.x))
            with pyro.plate("data", batch.size):
                z = pyro.sample("z", pyro.distributions.Normal(loc, scale).to_event(1))
                pyro.sample("c", pyro.distributions.Categorical(logits=self.cluster_log_posterior(z)),
                            infer={"enumerate": "parallel"})

    grads = []
    for guide in (m.guide, Differentiable.guide.__get__(m)):
        pyro.set_rng_seed(3)
        m.zero_grad()
        loss = elbo.differentiable_loss(m.model, guide, batch)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
        # the same z drawn by hand
        pyro.set_rng_seed(3)
        with torch.no_grad():
            loc, scale = m.z_head(m.encoder(batch.x))
            z = pyro.distributions.Normal(loc, scale).sample()
            log_pi, mu, sigma = m.cluster_params()
            log_pz = (log_pi + pyro.distributions.Normal(mu, sigma).log_prob(z[:, None]).sum(-1)).logsumexp(-1)
            log_px = m.pixel_distribution(m.decoder(z), batch.x_mask).log_prob(batch.x)
            log_q = pyro.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        assert loss.item() == pytest.approx(-(log_px + log_pz - log_q).sum().item(), rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and "pi_logits" in grads[0] and "cluster_loc" in grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-5)


def test_stages_sample_and_iw_likelihood():
    from ppl_vae.infer.likelihood import iw_log_likelihood

    m = VaDE(x_dim=5, dim_z=2, num_clusters=3, likelihood="gaussian", hidden=8, pretrain_fraction=0.25)
    stages = m.training_stages(100)
    assert [(s.name, s.steps) for s in stages] == [("pretrain", 25), ("vade", 75)]
    assert isinstance(stages[1].loss, pyro.infer.TraceEnum_ELBO) and stages[1].on_step is not None
    assert [s.name for s in VaDE(pretrain_fraction=0.0).training_stages(10)] == ["vade"]
    annealed = VaDE(x_dim=5, dim_z=2, num_clusters=3, likelihood="gaussian", hidden=8, kl_schedule="linear",
                    kl_warmup=10).training_stages(20)[1]
    annealed.on_step(0)                                          # no kept rows: no GMM fit, the schedule still runs
    tr = pyro.poutine.trace(annealed.guide).get_trace(_batch(torch.randn(3, 5)))
    assert tr.nodes["z"]["scale"] == pytest.approx(0.1) and tr.nodes["c"]["scale"] == 1.0
    assert [s.steps for s in VaDE(pretrain_fraction=0.9).training_stages(1)] == [1]
    assert m.sample(2, 4).shape == (2, 4, 5)
    with pytest.raises(ValueError, match="init_from_data"):
        m.init_from_data(torch.randn(2, 5))
    batch = _batch(torch.randn(4, 5))
    ll = iw_log_likelihood(m.model, m.guide, batch, num_particles=200)
    assert ll.shape == (4,) and torch.isfinite(ll).all()
    elbo = -pyro.infer.TraceEnum_ELBO(max_plate_nesting=1, num_particles=200,
                                      vectorize_particles=True).loss(m.model, m.guide, batch) / 4
    assert ll.mean().item() >= elbo - 0.05                      # the IW bound is at least the ELBO


def test_init_from_data_copies_the_diagonal_gmm_fit():
    from sklearn.mixture import GaussianMixture

    x, _ = _blobs(n_per=40, k=3)
    x = torch.cat([x, x[:60]])                                   # unequal cluster sizes
    m = VaDE(x_dim=6, dim_z=2, num_clusters=3, likelihood="gaussian", hidden=16)
    m.init_from_data(x, seed=5)
    with torch.no_grad():
        z = m.z_head(m.encoder(x))[0].double().numpy()
    gmm = GaussianMixture(3, covariance_type="diag", n_init=5, random_state=5).fit(z)
    log_pi, mu, sigma = m.cluster_params()
    np.testing.assert_allclose(log_pi.exp().detach().numpy(), gmm.weights_, atol=1e-5)
    np.testing.assert_allclose(mu.detach().numpy(), gmm.means_, atol=1e-5)
    np.testing.assert_allclose(sigma.detach().numpy(), np.sqrt(gmm.covariances_), rtol=1e-4)
    assert not np.allclose(gmm.weights_, 1 / 3, atol=1e-3)       # the weights are not uniform: pi is really set


# ---------------------------------------------------------------- training
def test_blobs_are_clustered_after_pretraining_and_gmm_init():
    x, y = _blobs()
    m = VaDE(x_dim=6, dim_z=2, num_clusters=4, likelihood="gaussian", hidden=32, pretrain_fraction=0.5)
    seen = {}
    hook_of = m.training_stages

    def stages(steps, lr):
        st = hook_of(steps, lr)
        init = st[-1].on_step

        def probe(t):
            before = m.cluster_loc.detach().clone()
            init(t)
            if t == 0:
                seen["moved"] = (m.cluster_loc - before).abs().max().item()
                seen["pi"] = m.cluster_params()[0].exp().detach()
        st[-1].on_step = probe
        return st

    m.training_stages = stages
    losses = _train(m, x, 300)
    assert seen["moved"] > 0.1                                   # the GMM fit set the mixture at the stage start
    torch.testing.assert_close(seen["pi"], torch.full((4,), 0.25), atol=0.05, rtol=0)
    vade = losses[150:]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(vade[-30:]) < np.mean(vade[:30]) - 0.5        # the VaDE ELBO improves
    assert cluster_accuracy(y, m.cluster(x)) > 0.97
    assert (m.responsibilities(x).max(-1).values > 0.9).float().mean() > 0.9


def test_smoke_experiment(tmp_path):
    from ppl_vae.experiments.lectures.vade import run

    out = run(tmp_path, smoke=True)
    for key in ("vade_accuracy", "vade_nmi", "vade_init_accuracy", "gmvae_accuracy", "gmvae_nmi",
                "kmeans_accuracy", "kmeans_nmi", "chance", "train_rows", "steps", "seconds"):
        assert key in out
    assert out["chance"] == 0.1 and out["train_rows"] == 1500 and out["steps"] == 200
    assert out["vade_accuracy"] > 0.3                            # clearly above chance after 200 steps on 1.5k digits
    assert all(isinstance(v, (int, float, str)) for v in out.values())
    assert (tmp_path / "vade_samples.png").stat().st_size > 1000

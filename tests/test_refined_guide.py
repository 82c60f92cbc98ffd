"""The generic inference core: a potential derived from any Pyro program's trace, the HMC-refined guide built from a
user's model/guide pair, and the three-group HMC objective under plain ``pyro.infer.SVI``.

Reference model (per datapoint): z ~ N(0, I_2), x | z ~ N(W z + b, σ² I_3), written as a plain Pyro program on a raw
tensor. Exact posterior: Λ = I + Wᵀ W / σ², mean = Λ⁻¹ Wᵀ (x − b) / σ², covariance Λ⁻¹.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

from ppl_vae.infer.potential import PotentialError, TracePotential
from ppl_vae.infer.refined_guide import HMCObjective, HMCRefinedGuide

W = torch.tensor([[1.0, 0.5], [-0.3, 1.2], [0.8, -0.7]])
B = torch.tensor([0.1, -0.2, 0.3])
SIGMA = 0.5
PREC = torch.eye(2) + W.T @ W / SIGMA**2
COV = torch.linalg.inv(PREC)


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + B, SIGMA).to_event(1), obs=x)


def posterior_mean(x):
    return (x - B) @ W / SIGMA**2 @ COV


def misspecified_guide(x):
    """The exact posterior's mean shifted by 1 and its marginal scales times 0.25."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(posterior_mean(x) + 1.0, 0.25 * COV.diagonal().sqrt()).to_event(1))


def gaussian_kl(m1, c1, m0, c0):
    """KL(N(m1, c1) || N(m0, c0)) per row: m (n, d), c (n, d, d) or (d, d)."""
    c0 = c0.expand(m1.shape[0], *c0.shape[-2:])
    ic0 = torch.linalg.inv(c0)
    d = m0 - m1
    tr = torch.einsum("nij,nji->n", ic0, c1)
    quad = torch.einsum("ni,nij,nj->n", d, ic0, d)
    return 0.5 * (tr + quad - m1.shape[-1] + torch.logdet(c0) - torch.logdet(c1))


def sample_moments(s):
    m = s.mean(0)
    c = torch.einsum("cni,cnj->nij", s - m, s - m) / (s.shape[0] - 1)
    return m, c


X = torch.randn(6, 3, generator=torch.Generator().manual_seed(3)) * 2


def test_refined_misspecified_guide_reaches_exact_posterior():
    refined = HMCRefinedGuide(model, misspecified_guide, num_transitions=30, num_leapfrog=5)
    with torch.no_grad():
        refined.bind(X)
        refined.step_sizes.log_step_size.fill_(math.log(0.5))  # relative to the guide's σ
        trace = refined.refine(X, num_chains=4000)
    m, c = sample_moments(trace.position)
    kl_refined = gaussian_kl(m, c, posterior_mean(X), COV)
    guide_cov = torch.diag(0.25**2 * COV.diagonal()).expand(6, 2, 2)
    kl_guide = gaussian_kl(posterior_mean(X) + 1.0, guide_cov, posterior_mean(X), COV)
    assert float(kl_refined.max()) < 0.01
    assert float(kl_guide.min()) > 1.0
    assert trace.diverging.sum() == 0


def test_potential_is_the_exact_log_joint():
    bound = TracePotential(model, misspecified_guide).bind(X)
    z = torch.randn(4, 6, 2)
    expected = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.Normal(z @ W.T + B, SIGMA).log_prob(X).sum(-1)
    torch.testing.assert_close(bound(z), expected)
    loc, scale = bound.proposal()
    torch.testing.assert_close(loc, posterior_mean(X) + 1.0)
    torch.testing.assert_close(scale, (0.25 * COV.diagonal().sqrt()).expand(6, 2))


def test_constrained_latent_uses_bijection_and_jacobian():
    def lognormal_model(x):
        with pyro.plate("data", x.shape[0]):
            s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, s), obs=x)

    x = torch.randn(5)
    bound = TracePotential(lognormal_model).bind(x)
    u = torch.randn(3, 5, 1)
    s = u[..., 0].exp()
    expected = dist.LogNormal(0.0, 1.0).log_prob(s) + dist.Normal(0.0, s).log_prob(x) + u[..., 0]
    torch.testing.assert_close(bound(u), expected)


def test_global_latent_and_missing_guide_site_raise_naming_the_site():
    def model_with_global(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide_with_global(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.7))

    with pytest.raises(PotentialError, match="'mu'"):
        HMCRefinedGuide(model_with_global, guide_with_global).refine(torch.randn(5))

    def model_extra_local(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            extra = pyro.sample("extra", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + extra, 1.0), obs=x)

    def guide_z_only(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.7))

    with pytest.raises(PotentialError, match="'extra'"):
        HMCRefinedGuide(model_extra_local, guide_z_only).refine(torch.randn(5))

    def model_discrete(x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(k, 1.0), obs=x)

    with pytest.raises(PotentialError, match="'k'"):
        TracePotential(model_discrete).bind(torch.randn(5))


def _param_model(x):
    w = pyro.param("W", torch.zeros(3, 2))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ w.T, 1.0).to_event(1), obs=x)


def _param_guide(x):
    loc = pyro.param("loc", torch.zeros(x.shape[0], 2))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def test_plain_svi_with_hmc_objective_trains_pyro_params_of_model_and_guide():
    refined = HMCRefinedGuide(_param_model, _param_guide, num_transitions=2, num_leapfrog=2)
    svi = SVI(_param_model, refined, pyro.optim.Adam({"lr": 0.05}), HMCObjective(sksd_chains=5))
    for _ in range(6):
        svi.step(X)
    store = pyro.get_param_store()
    assert float(store["W"].detach().abs().sum()) > 0.1
    assert float(store["loc"].detach().abs().sum()) > 0.1
    assert "hmc_guide$$$step_sizes.log_step_size" in store.keys()
    assert "hmc_guide$$$log_inflation" in store.keys()


def test_hmc_objective_uses_the_model_svi_passes():
    """The refined guide is built around `model`; SVI passes `_param_model`: the potential must target the latter."""
    refined = HMCRefinedGuide(model, _param_guide, num_transitions=2, num_leapfrog=2)
    svi = SVI(_param_model, refined, pyro.optim.Adam({"lr": 0.05}), HMCObjective(sksd_chains=0))
    svi.step(X)
    assert refined.last_potential.model is _param_model
    assert float(pyro.get_param_store()["W"].detach().abs().sum()) > 0.0


def test_objective_sends_each_group_its_own_gradient():
    """ELBO -> guide parameters only; L_HMC -> model parameters and step sizes; SKSD -> inflation only."""
    refined = HMCRefinedGuide(_param_model, _param_guide, num_transitions=2, num_leapfrog=2, sksd_chains=5)
    objective = HMCObjective()
    _param_model(X), _param_guide(X)
    refined.bind(X)
    store = pyro.get_param_store()
    params = {"W": store["W"].unconstrained(), "loc": store["loc"].unconstrained(),
              "phi": refined.step_sizes.log_step_size, "s": refined.log_inflation}
    pyro.set_rng_seed(1)
    objective.loss_and_grads(_param_model, refined, X)
    grads = {k: p.grad.clone() for k, p in params.items()}
    # the ELBO alone gives `loc` the same gradient; L_HMC alone gives W its gradient (not the ELBO's)
    for p in params.values():
        p.grad = None
    pyro.set_rng_seed(1)  # the same guide draw as the objective's ELBO term
    elbo = Trace_ELBO().differentiable_loss(_param_model, _param_guide, X)
    (g_loc, g_w_elbo) = torch.autograd.grad(elbo, [params["loc"], params["W"]])
    torch.testing.assert_close(grads["loc"], g_loc)
    assert not torch.allclose(grads["W"], g_w_elbo)
    assert float(grads["phi"].abs().sum()) > 0 and float(grads["s"].abs().sum()) > 0


def test_predictive_parallel_and_vectorized_particles():
    refined = HMCRefinedGuide(model, misspecified_guide, num_transitions=3, num_leapfrog=3)
    pred = Predictive(model, guide=refined, num_samples=7, parallel=True)(X)
    assert pred["z"].shape == (7, 6, 2) and pred["x"].shape == (7, 6, 3)
    pred = Predictive(model, guide=refined, num_samples=3)(X)
    assert pred["z"].shape == (3, 6, 2)
    refined2 = HMCRefinedGuide(_param_model, _param_guide, num_transitions=2, num_leapfrog=2)
    elbo = Trace_ELBO(vectorize_particles=True, num_particles=4, max_plate_nesting=1)
    loss = SVI(_param_model, refined2, pyro.optim.Adam({"lr": 0.05}), elbo).step(X)
    assert math.isfinite(loss)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
def test_autoguide_proposals(guide_cls):
    def pos_model(x):
        with pyro.plate("data", x.shape[0]):
            s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, s), obs=x)

    x = torch.randn(5)
    auto = guide_cls(pos_model)
    auto(x)
    refined = HMCRefinedGuide(pos_model, auto, num_transitions=2, num_leapfrog=2)
    out = refined(x)
    assert out["s"].shape == (5,) and bool((out["s"] > 0).all())
    loc, scale = refined.last_potential.proposal()
    assert loc.shape == (5, 1) and bool((scale > 0).all())


def test_nan_inside_a_trajectory_is_a_divergence_not_an_error():
    """A huge step makes exp(z) overflow: Pyro's validation would raise inside the density; it must count."""
    def scale_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, torch.exp(20 * z)), obs=x)

    def scale_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))

    refined = HMCRefinedGuide(scale_model, scale_guide, num_transitions=3, num_leapfrog=3,
                              step_size_scheme="absolute")
    with pyro.validation_enabled(True), torch.no_grad():
        refined.bind(torch.randn(8))
        refined.step_sizes.log_step_size.fill_(math.log(50.0))
        trace = refined.refine(torch.randn(8), num_chains=4)
    assert int(trace.diverging.sum()) > 0
    assert bool(torch.isfinite(trace.position).all())


# ------------------------------------------------------------------ the package's table models on the core
@pytest.fixture(scope="module")
def boston():
    from ppl_vae import load_dataset

    data = load_dataset("boston")
    split = data.splits(n_splits=10, seed=0)[0]
    return data, split.train.batch()[:32]


@pytest.mark.parametrize("name", ["hmc-vae", "hmc-vaem"])
def test_trace_potential_equals_table_fast_path(boston, name):
    from ppl_vae.models import build_model

    data, batch = boston
    torch.manual_seed(0)
    m = build_model(name, data.schema, latent_dim=4).double()
    b64 = type(batch)(x=batch.x.double(), x_mask=batch.x_mask, y=batch.y.double(), y_mask=batch.y_mask)
    bound = TracePotential(m.model, m.guide).bind(b64)
    z = torch.randn(3, batch.size, 4, dtype=torch.float64)
    torch.testing.assert_close(bound(z), m.log_joint(z, b64), rtol=1e-6, atol=1e-6)
    m32 = build_model(name, data.schema, latent_dim=4)
    m32.hmc_guide.bind(batch)(z.float())
    assert m32.hmc_guide.potential.check_report["max_relative_error"] <= 1e-5


def test_hand_written_log_joint_that_disagrees_raises(boston):
    """A subclass that changes the model (Laplace prior) but not the fast path must get an error, not HMC on the
    wrong density."""
    from ppl_vae.models.tabular.hmc import HMCVAE

    class LaplaceHMCVAE(HMCVAE):
        def model(self, batch):
            self.register_modules(self.generative_modules())
            with pyro.plate("data", batch.size, device=batch.device):
                z = pyro.sample("z", dist.Laplace(batch.x.new_zeros(self.latent_dim), 1.0).to_event(1))
                self.observe_x(z, batch)
                y, y_mask = self.target(batch)
                self.predictor.likelihood.observe("y", self.y_params(z, batch), y, y_mask)

    data, batch = boston
    m = LaplaceHMCVAE(data.schema, latent_dim=4)
    with pytest.raises(PotentialError, match="disagrees"):
        m.hmc_guide.refine(batch, num_chains=2)


def test_config_typo_raises_type_error(boston):
    from ppl_vae.models import build_model

    data, _ = boston
    with pytest.raises(TypeError, match="latnet_dim.*latent_dim"):
        build_model("vae", data.schema, latnet_dim=5)
    with pytest.raises(TypeError, match="hmc_stepz"):
        build_model("hmc-vaem", data.schema, hmc_stepz=3)
    m = build_model("hmc-vae", data.schema, latent_dim=3, hmc_steps=2)
    rebuilt = build_model("hmc-vae", **m.config)
    assert rebuilt.cfg == m.cfg


def test_step_sizes_shrink_when_every_proposal_is_rejected():
    """Step sizes far too large (every transition divergent): L_HMC gives φ no gradient; the acceptance floor does,
    and SVI lowers the step sizes until proposals are accepted again; the objective warns while acceptance is low."""
    refined = HMCRefinedGuide(model, misspecified_guide, num_transitions=2, num_leapfrog=3, step_size_range=(30, 30))
    objective = HMCObjective(sksd_chains=0, low_accept_steps=5)
    svi = SVI(model, refined, pyro.optim.Adam({"lr": 0.3}), objective)
    with pytest.warns(RuntimeWarning, match="acceptance"):
        accepts = []
        for _ in range(50):
            svi.step(X)
            accepts.append(objective.last_stats["accept"])
    assert min(accepts[:25]) < 0.05
    assert max(accepts[-10:]) > 0.5
    assert float(refined.step_sizes().detach().max()) < 10.0


def test_compiled_potential_matches_eager_and_is_reused_across_batches():
    eager = HMCRefinedGuide(model, misspecified_guide, num_transitions=3, num_leapfrog=3)
    compiled = HMCRefinedGuide(model, misspecified_guide, num_transitions=3, num_leapfrog=3, compile=True)
    eager.bind(X)
    compiled.bind(X)
    compiled.load_state_dict(eager.state_dict())
    for data in (X, X + 0.5):  # a new batch of the same shape reuses the recorded graph
        pyro.set_rng_seed(5)
        a = eager.refine(data, num_chains=8).position
        pyro.set_rng_seed(5)
        b = compiled.refine(data, num_chains=8).position
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(compiled.potential._graphs) == 1


def test_compiled_potential_falls_back_for_a_program_that_branches_on_data():
    def branching_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            shift = 1.0 if float(x.sum()) > 0 else -1.0  # Python control flow on data values: frozen by a graph
            pyro.sample("x", dist.Normal(z + shift, 1.0), obs=x)

    def simple_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))

    refined = HMCRefinedGuide(branching_model, simple_guide, num_transitions=1, num_leapfrog=1, compile=True)
    with pytest.warns(RuntimeWarning, match="cannot be recorded"):
        refined.refine(torch.ones(4))
    assert not refined.potential.compile and not refined.potential._graphs
    bound = refined.bind(-torch.ones(4))  # the eager trace sees the branch
    z = torch.zeros(1, 4, 1)
    torch.testing.assert_close(bound(z), (dist.Normal(0.0, 1.0).log_prob(z[..., 0]) * 2))

"""HMCRefinedGuide / pyro_log_joint / HMCObjective on a linear-Gaussian latent model with a closed-form posterior.

Model (per datapoint): z ~ N(0, I_2), x | z ~ N(W z + b, σ² I_6), entries of x observed where the mask is 1.
Posterior: Λ = I + W_Oᵀ W_O / σ², mean = Λ⁻¹ W_Oᵀ (x_O − b_O) / σ², covariance Λ⁻¹ (O = observed entries).
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vae.infer.refined_guide import HMCObjective, HMCRefinedGuide, pyro_log_joint
from ppl_vae.models.base import Batch

LATENT, OBS, SIGMA = 2, 6, 0.5


class LinearGaussianLVM(nn.Module):
    """A minimal refinable model: the contract of ppl_vae's LatentVariableModel for HMC refinement."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.decoder = nn.Linear(LATENT, OBS)
        with torch.no_grad():
            self.decoder.weight.copy_(torch.randn(OBS, LATENT, generator=g))
            self.decoder.bias.copy_(0.3 * torch.randn(OBS, generator=g))
        self.encoder = nn.Linear(2 * OBS, 2 * LATENT)

    # --- contract -------------------------------------------------------------------------------------------
    def latent_sites(self):
        return [("z", LATENT)]

    def encoder_parameters(self):
        return list(self.encoder.parameters())

    def proposal(self, batch: Batch):
        m = batch.x_mask.float()
        out = self.encoder(torch.cat([batch.x * m, m], -1))
        loc, log_scale = out.chunk(2, -1)
        return loc, log_scale.clamp(-5, 3).exp()

    def log_joint(self, latent: torch.Tensor, batch: Batch) -> torch.Tensor:
        m = batch.x_mask.float()
        prior = -0.5 * (latent**2).sum(-1) - 0.5 * LATENT * math.log(2 * math.pi)
        loc = self.decoder(latent)
        ll = -0.5 * ((batch.x - loc) / SIGMA) ** 2 - math.log(SIGMA) - 0.5 * math.log(2 * math.pi)
        return prior + (ll * m).sum(-1)

    def model(self, batch: Batch):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", batch.size, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(batch.size, LATENT), 1.0).to_event(1))
            loc = self.decoder(z)
            pyro.sample("x", dist.Normal(loc, SIGMA).mask(batch.x_mask).to_event(1), obs=batch.x)

    def guide(self, batch: Batch):
        pyro.module("encoder", self.encoder)
        loc, scale = self.proposal(batch)
        with pyro.plate("data", batch.size, dim=-1):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # --- exact posterior ------------------------------------------------------------------------------------
    def posterior(self, batch: Batch):
        w, b = self.decoder.weight.detach(), self.decoder.bias.detach()
        means, covs = [], []
        for x, m in zip(batch.x, batch.x_mask.float()):
            wo = w * m[:, None]
            prec = torch.eye(LATENT) + wo.T @ wo / SIGMA**2
            cov = torch.linalg.inv(prec)
            means.append(cov @ (wo.T @ ((x - b) * m)) / SIGMA**2)
            covs.append(cov)
        return torch.stack(means), torch.stack(covs)


def make_batch(model: LinearGaussianLVM, n: int = 8, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, LATENT, generator=g)
    with torch.no_grad():
        x = model.decoder(z) + SIGMA * torch.randn(n, OBS, generator=g)
    mask = torch.rand(n, OBS, generator=g) > 0.3
    mask[:, 0] = True
    return Batch(x=torch.where(mask, x, torch.zeros_like(x)), x_mask=mask)


def test_pyro_log_joint_equals_fast_path():
    model = LinearGaussianLVM()
    batch = make_batch(model)
    latent = torch.randn(5, batch.size, LATENT, dtype=torch.float64)
    model = model.double()
    batch = Batch(x=batch.x.double(), x_mask=batch.x_mask)
    fast = model.log_joint(latent, batch)
    ref = pyro_log_joint(model, latent, batch)
    assert ref.shape == (5, batch.size)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-10)
    # float32 too, and the 2-D form
    model32 = LinearGaussianLVM()
    b32 = make_batch(model32)
    z = torch.randn(b32.size, LATENT)
    torch.testing.assert_close(model32.log_joint(z, b32), pyro_log_joint(model32, z, b32), rtol=1e-5, atol=1e-4)


def test_pyro_log_joint_rejects_wrong_size():
    model = LinearGaussianLVM()
    batch = make_batch(model)
    with pytest.raises(ValueError):
        pyro_log_joint(model, torch.randn(2, batch.size, 3), batch)


def test_refined_chains_approach_exact_posterior():
    torch.manual_seed(0)
    model = LinearGaussianLVM()
    batch = make_batch(model, n=4)
    mean, cov = model.posterior(batch)
    # deliberately bad proposal: shifted by +2 and three times too wide
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.copy_(torch.tensor([2.0, 2.0, math.log(3.0), math.log(3.0)]))
    # posterior sds are 0.17-0.42; 30 transitions of 5 x 0.05 (a fixed integration time near half the
    # Gaussian's period would only reflect the chains around the mean, so keep it well below)
    guide = HMCRefinedGuide(model, num_steps=30, num_leapfrog=5)
    with torch.no_grad():
        guide.step_sizes.log_step_size.fill_(math.log(0.05))
        trace = guide.refine(batch, num_chains=2000)
    x0, xt = trace.initial_position, trace.position  # (C, B, 2)
    err0 = (x0.mean(0) - mean).norm(dim=-1)
    errt = (xt.mean(0) - mean).norm(dim=-1)
    assert (errt < 0.1 * err0).all(), (err0, errt)
    cov0 = torch.stack([torch.cov(x0[:, b].T) for b in range(batch.size)])
    covt = torch.stack([torch.cov(xt[:, b].T) for b in range(batch.size)])
    assert ((covt - cov).flatten(1).norm(dim=-1) < (cov0 - cov).flatten(1).norm(dim=-1)).all()
    assert trace.accept_rate > 0.5
    assert trace.num_divergent == 0


def test_grads_reach_step_sizes_and_decoder_not_encoder():
    model = LinearGaussianLVM()
    batch = make_batch(model)
    guide = HMCRefinedGuide(model, num_steps=3, num_leapfrog=4)
    trace = guide.refine(batch, num_chains=4)
    loss = -model.log_joint(trace.position, batch).mean()
    params = [guide.step_sizes.log_step_size, model.decoder.weight, guide.log_inflation] + model.encoder_parameters()
    g_step, g_w, g_s, *g_enc = torch.autograd.grad(loss, params, allow_unused=True)
    assert torch.isfinite(g_step).all() and (g_step.abs() > 0).all()
    assert torch.isfinite(g_w).all() and g_w.abs().sum() > 0
    assert g_s is not None and torch.isfinite(g_s).all()  # L_HMC depends on s (only its own group is updated)
    assert all(g is None for g in g_enc)  # proposal detached from the encoder


def test_sksd_loss_reaches_inflation_only():
    model = LinearGaussianLVM()
    batch = make_batch(model)
    guide = HMCRefinedGuide(model, num_steps=2, num_leapfrog=3, inflation="layer", sksd_chains=20)
    loss = guide.sksd_loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    params = [guide.log_inflation, guide.step_sizes.log_step_size] + list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert grads[0] is not None and torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    assert all(g is None for g in grads[1:])
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards


def test_guide_under_trace_elbo_is_expected_log_joint():
    model = LinearGaussianLVM()
    batch = make_batch(model)
    guide = HMCRefinedGuide(model, num_steps=2, num_leapfrog=2)
    pyro.set_rng_seed(3)
    loss = pyro.infer.Trace_ELBO().differentiable_loss(model.model, guide, batch)
    pyro.set_rng_seed(3)
    z = guide.refine(batch, 1).position[0]
    torch.testing.assert_close(loss, -model.log_joint(z, batch).sum(), rtol=1e-5, atol=1e-4)
    loss.backward()
    assert guide.step_sizes.log_step_size.grad is not None
    assert torch.isfinite(guide.step_sizes.log_step_size.grad).all()


def test_guide_rejects_several_chains():
    model = LinearGaussianLVM()
    guide = HMCRefinedGuide(model, num_chains=3)
    with pytest.raises(ValueError):
        guide(make_batch(model))


def test_hmc_objective_with_svi_updates_each_group():
    torch.manual_seed(0)
    model = LinearGaussianLVM()
    batch = make_batch(model, n=16)
    guide = HMCRefinedGuide(model, num_steps=3, num_leapfrog=3, inflation="scalar", sksd_chains=10)
    objective = HMCObjective()
    svi = pyro.infer.SVI(model.model, guide, pyro.optim.Adam({"lr": 0.05}), objective)
    before = {
        "enc": model.encoder.weight.detach().clone(),
        "dec": model.decoder.weight.detach().clone(),
        "step": guide.step_sizes.log_step_size.detach().clone(),
        "infl": guide.log_inflation.detach().clone(),
    }
    loss = svi.step(batch)
    assert math.isfinite(loss)
    names = set(pyro.get_param_store().keys())
    assert {"hmc_guide$$$step_sizes.log_step_size", "hmc_guide$$$log_inflation", "encoder$$$weight",
            "decoder$$$weight"} <= names
    after = {
        "enc": model.encoder.weight, "dec": model.decoder.weight,
        "step": guide.step_sizes.log_step_size, "infl": guide.log_inflation,
    }
    for k in before:
        assert not torch.equal(before[k], after[k].detach()), f"{k} was not updated"
    stats = objective.last_stats
    for key in ("elbo", "log_p_T", "sksd", "accept", "divergent", "inflation", "step_size"):
        assert key in stats and math.isfinite(stats[key])
    # grads were zeroed by SVI after the step
    assert guide.step_sizes.log_step_size.grad is None or (guide.step_sizes.log_step_size.grad == 0).all()
    assert math.isfinite(objective.loss(model.model, guide, batch))


def test_hmc_objective_group_gradients_are_separate():
    """The encoder's gradient is the ELBO's; the decoder's is L_HMC's (not the ELBO's)."""
    torch.manual_seed(0)
    model = LinearGaussianLVM()
    batch = make_batch(model)
    guide = HMCRefinedGuide(model, num_steps=2, num_leapfrog=2, sksd_chains=5)
    objective = HMCObjective(model, guide)
    pyro.set_rng_seed(5)
    objective.loss_and_grads(model.model, guide, batch)
    g_dec = model.decoder.weight.grad.clone()
    g_enc = model.encoder.weight.grad.clone()
    for p in list(model.parameters()) + list(guide.parameters()):
        p.grad = None
    pyro.set_rng_seed(5)
    elbo = pyro.infer.Trace_ELBO().differentiable_loss(model.model, model.guide, batch)
    ref_enc, ref_dec = torch.autograd.grad(elbo, [model.encoder.weight, model.decoder.weight])
    torch.testing.assert_close(g_enc, ref_enc)
    assert not torch.allclose(g_dec, ref_dec)


def test_objective_when_guide_is_a_submodule_of_the_model():
    """As in the HMC table models: the guide is registered inside the model; its parameters must still get only
    their own objectives (no L_HMC gradient on the inflation, step sizes not counted twice)."""
    torch.manual_seed(0)
    model = LinearGaussianLVM()
    model.hmc_guide = HMCRefinedGuide(model, num_steps=2, num_leapfrog=3)
    guide = model.hmc_guide
    batch = make_batch(model)
    objective = HMCObjective(model, guide, sksd_chains=0)
    pyro.set_rng_seed(11)
    objective.loss_and_grads(model.model, guide, batch)
    assert guide.log_inflation.grad is None
    got = guide.step_sizes.log_step_size.grad.clone()
    pyro.set_rng_seed(11)
    pyro.infer.Trace_ELBO().differentiable_loss(model.model, model.guide, batch)  # same RNG consumption
    trace = guide.refine(batch, 1)
    (want,) = torch.autograd.grad(-model.log_joint(trace.position, batch).mean(), guide.step_sizes.log_step_size)
    torch.testing.assert_close(got, want)

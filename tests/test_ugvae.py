"""UG-VAE (Peis et al. 2023) and its baselines as Pyro programs; the experiment pipeline in smoke mode."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from ppl_vae.errors import UnknownNameError
from ppl_vae.models.base import Batch
from ppl_vae.models.image.betavae import BetaVAE
from ppl_vae.models.image.gmvae import GMVAE
from ppl_vae.models.image.mlvae import MLVAE, group_index
from ppl_vae.models.image.ugvae import UGVAE, product_of_gaussian_experts


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: one thread is fastest and immune to a busy 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _batch(n: int, d: int, seed: int = 0, binary: bool = True, dtype=torch.float32) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=dtype)
    if binary:
        x = (x > 0.5).to(dtype)
    return Batch(x=x, x_mask=torch.ones_like(x, dtype=torch.bool))


def _tiny(**kw) -> UGVAE:
    torch.manual_seed(0)
    return UGVAE(x_dim=20, dim_z=3, dim_beta=2, num_components=4, hidden=8, **kw).double()


# ------------------------------------------------------------------------------------------ the ELBO
def _hand_elbo(m: UGVAE, batch: Batch, z: torch.Tensor, beta: torch.Tensor, mode: str) -> torch.Tensor:
    """The UG-VAE ELBO (Peis et al. 2023) at fixed (z, beta) draws, the sum over d written out."""
    x = batch.x
    K = m.num_components
    h, z_loc, z_scale = m.local_posterior(x)
    pi = m.component_probs(z)                                             # (B, K)
    beta_loc, beta_scale = m.global_posterior(h, pi)
    comp_loc, comp_scale = m.component_params(beta)                       # (K, dim_z)
    logits = m.decoder(torch.cat([z, beta.expand(x.shape[0], -1)], -1))
    log_px = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    log_pz_k = dist.Normal(comp_loc, comp_scale).log_prob(z.unsqueeze(1)).sum(-1)     # (B, K)
    log_qz = dist.Normal(z_loc, z_scale).log_prob(z).sum()
    log_pb = dist.Normal(0.0, 1.0).log_prob(beta).sum()
    log_qb = dist.Normal(beta_loc, beta_scale).log_prob(beta).sum()
    if mode == "guide":
        kl_d = (pi * (pi.log() + math.log(K))).sum()                      # KL(q(d|z) || Cat(1/K))
        weighted = (pi * log_pz_k).sum()                                  # E_q(d|z) log p(z | d, beta)
        return log_px - kl_d - (log_qz - weighted) + log_pb - log_qb
    marginal = torch.logsumexp(log_pz_k - math.log(K), dim=-1).sum()      # log sum_d p(d) p(z | d, beta)
    return log_px + marginal - log_qz + log_pb - log_qb


@pytest.mark.parametrize("mode", ["guide", "model"])
def test_enumerated_elbo_equals_hand_sum_over_d(mode):
    m = _tiny(enumerate_d=mode)
    batch = _batch(6, 20, dtype=torch.float64)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        loss = TraceEnum_ELBO(max_plate_nesting=1).loss(m.model, m.guide, batch)
        # the same draws of z and beta: the guide under the same enumeration (d consumes no randomness)
        pyro.set_rng_seed(seed)
        tr = poutine.trace(poutine.enum(m.guide, first_available_dim=-2)).get_trace(batch)
        z, beta = tr.nodes["z"]["value"], tr.nodes["beta"]["value"]
        if mode == "guide":
            assert tr.nodes["d"]["value"].shape == (4, 1)                 # enumerated in parallel
        else:
            assert "d" not in tr.nodes
        with torch.no_grad():
            expected = -_hand_elbo(m, batch, z, beta, mode).item()
        assert loss == pytest.approx(expected, rel=1e-12, abs=1e-9)


def test_model_enumeration_indexes_components():
    m = _tiny(enumerate_d="model")
    batch = _batch(5, 20, dtype=torch.float64)
    guide_tr = poutine.trace(m.guide).get_trace(batch)
    model_tr = poutine.trace(poutine.replay(poutine.enum(m.model, first_available_dim=-2), trace=guide_tr)
                             ).get_trace(batch)
    model_tr.compute_log_prob()
    assert model_tr.nodes["d"]["value"].shape == (4, 1)
    assert model_tr.nodes["z"]["log_prob"].shape == (4, 5)             # one row per component
    assert model_tr.nodes["x"]["log_prob"].shape == (5,)               # x does not depend on d
    assert model_tr.nodes["beta"]["value"].shape == (2,)               # one global draw per batch


# ------------------------------------------------------------------------------------------ global encoder
def test_product_of_gaussian_experts_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(5, 3, generator=g, dtype=torch.float64)
    scale = torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.3
    for prior in (0.0, 1.0):
        mu, sd = product_of_gaussian_experts(loc, scale, prior_precision=prior)
        # the product of densities is proportional to N(mu, sd): the log ratio is constant in beta
        grid = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None].expand(-1, 3)
        log_prod = dist.Normal(loc, scale).log_prob(grid[:, None, :]).sum(1)
        if prior:
            log_prod = log_prod + dist.Normal(0.0, prior ** -0.5).log_prob(grid)
        ratio = log_prod - dist.Normal(mu, sd).log_prob(grid)
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-10)
        lam = scale.pow(-2)
        assert torch.allclose(sd.pow(-2), lam.sum(0) + prior)
        assert torch.allclose(mu, (lam * loc).sum(0) / (lam.sum(0) + prior))
    # grouped products equal the per-group products
    group = torch.tensor([0, 1, 0, 2, 1])
    gm, gs = product_of_gaussian_experts(loc, scale, group=group, num_groups=3)
    for k in range(3):
        mk, sk = product_of_gaussian_experts(loc[group == k], scale[group == k])
        assert torch.allclose(gm[k], mk) and torch.allclose(gs[k], sk)
    with pytest.raises(ValueError):
        product_of_gaussian_experts(loc, scale[:, :2])


def test_beta_posterior_sharpens_with_batch_size_and_is_exchangeable():
    torch.manual_seed(0)
    m = UGVAE(x_dim=64, hidden=32)
    batch = _batch(128, 64, seed=1, binary=False)
    precisions = [m.encode_global(batch[:n])[1].pow(-2) for n in (1, 8, 32, 128)]
    for small, big in zip(precisions, precisions[1:]):
        assert bool((big > small).all())                        # each added point adds precision
    assert bool((precisions[0] > 1.0).all())                    # the N(0, I) prior expert is included
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(2))
    loc, scale = m.encode_global(batch)
    loc_p, scale_p = m.encode_global(batch[perm])
    assert torch.allclose(loc, loc_p, atol=1e-5) and torch.allclose(scale, scale_p, atol=1e-6)
    no_prior = UGVAE(x_dim=64, hidden=32, prior_expert=False)
    no_prior.load_state_dict(m.state_dict())
    diff = m.encode_global(batch)[1].pow(-2) - no_prior.encode_global(batch)[1].pow(-2)
    assert torch.allclose(diff, torch.ones_like(diff), atol=1e-2)


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def digits28():
    from ppl_vae.data.batches import load_sklearn_digits28

    return load_sklearn_digits28()


def test_training_decreases_the_loss_on_digits(digits28):
    from ppl_vae.data.batches import StructuredBatchSampler
    from ppl_vae.experiments.ugvae.common import train_svi

    x, y = digits28
    torch.manual_seed(0)
    m = UGVAE(hidden=64)
    losses = train_svi(m, StructuredBatchSampler(x, y, 32, "random", seed=0), steps=300, lr=5e-3, seed=0,
                       progress=False)
    assert len(losses) == 300 and all(np.isfinite(losses))
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.85 * first, (first, last)
    # the trained model encodes, generates and samples with the documented shapes
    b = StructuredBatchSampler(x, y, 16, "class", seed=1).sample()
    loc, scale = m.encode_global(b)
    assert loc.shape == scale.shape == (20,) and bool((scale > 0).all())
    z = m.encode_local(b)
    assert z.shape == (16, 10)
    img = m.generate(z, loc)
    assert img.shape == (16, 784) and float(img.min()) >= 0 and float(img.max()) <= 1
    assert m.sample(2, 3).shape == (2, 3, 784)


def test_seeded_training_is_deterministic(digits28):
    from ppl_vae.data.batches import StructuredBatchSampler
    from ppl_vae.experiments.ugvae.common import train_svi

    x, y = digits28
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        m = UGVAE(hidden=16)
        losses = train_svi(m, StructuredBatchSampler(x, y, 16, "random", seed=4), 5, seed=4, progress=False)
        runs.append((losses, [p.detach().clone() for p in m.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_bad_configuration_is_rejected():
    with pytest.raises(UnknownNameError):
        UGVAE(arch="transformer")
    with pytest.raises(UnknownNameError):
        UGVAE(enumerate_d="both")
    with pytest.raises(ValueError, match="784"):
        UGVAE(x_dim=64, arch="conv")
    with pytest.raises(ValueError):
        BetaVAE(beta_kl=0.0)
    with pytest.raises(ValueError, match="dim_beta"):
        UGVAE(dim_beta=0)


def test_conv_and_gaussian_variants_run():
    torch.manual_seed(0)
    batch = _batch(8, 784, binary=False)
    conv = UGVAE(arch="conv", hidden=32)
    assert math.isfinite(TraceEnum_ELBO(max_plate_nesting=1).loss(conv.model, conv.guide, batch))
    gauss = UGVAE(x_dim=5, likelihood="gaussian", pixel_scale=0.2 ** 0.5, hidden=8)
    vec = Batch(torch.randn(7, 5), torch.ones(7, 5, dtype=torch.bool))
    assert math.isfinite(TraceEnum_ELBO(max_plate_nesting=1).loss(gauss.model, gauss.guide, vec))


# ------------------------------------------------------------------------------------------ typed configs
_LATENT = {UGVAE: "dim_z", BetaVAE: "dim_z", GMVAE: "dim_z", MLVAE: "dim_style"}


@pytest.mark.parametrize("cls", [UGVAE, BetaVAE, GMVAE, MLVAE])
def test_typed_config_rebuilds_the_model_and_rejects_typos(cls):
    from ppl_vae.models.config import ModelConfig

    latent = _LATENT[cls]
    m = cls(x_dim=12, hidden=4, **{latent: 3})
    assert isinstance(m.cfg, cls.Config) and isinstance(m.cfg, ModelConfig)
    assert m.config == m.cfg.to_dict() and isinstance(m.config, dict)
    rebuilt = cls(**m.config)                                           # what a checkpoint does
    assert rebuilt.cfg == m.cfg
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    rebuilt.load_state_dict(m.state_dict())
    # a config object (alone, with overrides, or as a dict) builds the same family
    from_obj = cls(cls.Config(x_dim=12, hidden=4, **{latent: 3}))
    assert from_obj.cfg == m.cfg and from_obj.encode_local(_batch(5, 12)).shape == (5, 3)
    assert getattr(cls(cls.Config(**{latent: 3}), **{latent: 2}).cfg, latent) == 2
    assert cls(m.config).cfg == m.cfg
    # a typo is a TypeError naming it (not a silent default), however it is passed
    for bad in (lambda: cls(dim_zz=3), lambda: cls(cls.Config(), dim_zz=3), lambda: cls({"dim_zz": 3})):
        with pytest.raises(TypeError, match="dim_zz"):
            bad()
    other = next(c for c in (UGVAE, MLVAE) if c is not cls)
    with pytest.raises(TypeError, match=cls.Config.__name__):
        cls(other.Config())


# ------------------------------------------------------------------------------------------ baselines
def test_beta_vae_scales_the_kl_term_linearly():
    torch.manual_seed(0)
    batch = _batch(10, 30, dtype=torch.float64)
    m = BetaVAE(x_dim=30, dim_z=4, hidden=8).double()
    losses = []
    for b in (0.5, 1.0, 1.5):
        m.beta_kl = b
        pyro.set_rng_seed(0)                                        # the same z draw for every beta
        losses.append(Trace_ELBO().loss(m.model, m.guide, batch))
    # loss(beta) = -log p(x|z) + beta * [log q(z|x) - log p(z)] at the same z draw: affine in beta
    assert losses[2] - losses[1] == pytest.approx(losses[1] - losses[0], rel=1e-10)
    pyro.set_rng_seed(0)
    tr = poutine.trace(m.guide).get_trace(batch)
    z = tr.nodes["z"]["value"]
    loc, scale = m.z_head(m.encoder(batch.x))
    log_ratio = (dist.Normal(loc, scale).log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z)).sum().item()
    assert losses[1] - losses[0] == pytest.approx(0.5 * log_ratio, rel=1e-10)


def test_ml_vae_groups_share_one_content_latent():
    torch.manual_seed(0)
    m = MLVAE(x_dim=30, dim_style=3, dim_content=4, hidden=8)
    batch = _batch(9, 30).replace(group=torch.tensor([5, 5, 2, 2, 2, 9, 9, 9, 9]))
    idx, G = group_index(batch)
    assert G == 3 and idx.tolist() == [1, 1, 0, 0, 0, 2, 2, 2, 2]
    tr = poutine.trace(m.guide).get_trace(batch)
    assert tr.nodes["content"]["value"].shape == (3, 4)
    assert tr.nodes["style"]["value"].shape == (9, 3)
    model_tr = poutine.trace(poutine.replay(m.model, trace=tr)).get_trace(batch)
    model_tr.compute_log_prob()
    assert model_tr.nodes["content"]["log_prob"].shape == (3,)         # one KL term per group
    assert math.isfinite(Trace_ELBO().loss(m.model, m.guide, batch))
    whole = batch.replace(group=None)
    loc, scale, idx1 = m.content_posterior(whole)
    assert loc.shape == (1, 4) and bool((idx1 == 0).all())
    # the content posterior of a group only depends on that group's members
    loc3, _, _ = m.content_posterior(batch)
    loc_only, _, _ = m.content_posterior(batch[torch.tensor([2, 3, 4])].replace(group=None))
    assert torch.allclose(loc3[0], loc_only[0], atol=1e-6)


def test_gmvae_elbo_runs_and_enumerates():
    torch.manual_seed(0)
    m = GMVAE(x_dim=30, dim_z=3, num_components=5, hidden=8)
    batch = _batch(7, 30)
    tr = poutine.trace(poutine.enum(m.guide, first_available_dim=-2)).get_trace(batch)
    assert tr.nodes["d"]["value"].shape == (5, 1)
    assert math.isfinite(TraceEnum_ELBO(max_plate_nesting=1).loss(m.model, m.guide, batch))
    assert m.sample(2, 4).shape == (2, 4, 30)


# ------------------------------------------------------------------------------------------ experiments
def test_frechet_distance_closed_form():
    from ppl_vae.experiments.ugvae.frechet import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, 2.0, 0.0, -1.0])
    assert frechet_distance(a, a + shift) == pytest.approx(6.0, rel=1e-8)
    # scaling by 2: ||mean(a)||^2 + tr(S + 4S - 2 * 2S) = ||mean(a)||^2 + tr(S)
    expected = (a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)


def test_experiment_pipeline_smoke(tmp_path):
    from ppl_vae.experiments import ugvae as exp

    parser = exp.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--smoke", "--steps", "4", "--out", str(tmp_path), "--no-progress", "--no-tsne"])
    res = exp.run(args)
    assert set(res) >= {"interpolation", "global", "domain", "fid", "losses"}
    for row in res["global"]["table"] + res["domain"]["table"]:
        assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["train_acc"] <= 1.0
    fids = {r["model"]: r["frechet_distance"] for r in res["fid"]["table"]}
    assert set(fids) >= {"ug-vae", "ml-vae", "beta-vae"} and all(v >= -1e-6 for v in fids.values())
    for p in [*res["interpolation"]["figures"].values(), *res["global"]["figures"].values()]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.md").read_text().count("|") > 50
    assert json.loads((tmp_path / "results.json").read_text())["config"]["steps"] == 4


def test_benchmark_script_smoke(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ugvae_experiments.py"
    spec = importlib.util.spec_from_file_location("ugvae_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    res = module.main(["--smoke", "--steps", "2", "--experiment", "interpolation", "--out", str(tmp_path),
                       "--no-progress"])
    assert set(res["interpolation"]["figures"]) == {"beta_grid", "beta_components_grid", "z_grid"}
    assert (tmp_path / "interpolation_beta.png").is_file() and (tmp_path / "results.md").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_ugvae_trains_on_cuda():
    from ppl_vae.data.batches import StructuredBatchSampler
    from ppl_vae.experiments.ugvae.common import train_svi

    x = torch.rand(256, 784)
    y = torch.randint(10, (256,))
    torch.manual_seed(0)
    m = UGVAE()
    losses = train_svi(m, StructuredBatchSampler(x, y, 64, "random", seed=0), 20, device="cuda", seed=0,
                       progress=False)
    assert all(np.isfinite(losses))
    assert next(m.parameters()).is_cuda
    b = StructuredBatchSampler(x, y, 64, "random", seed=1, device="cuda").sample()
    loc, scale = m.encode_global(b)
    assert loc.is_cuda and scale.is_cuda
    g = torch.Generator(device="cuda").manual_seed(0)
    assert m.sample(2, 8, generator=g).is_cuda
    for M in (MLVAE, BetaVAE, GMVAE):
        mm = M().cuda()
        st = mm.training_stages(1)[0]
        assert math.isfinite(st.loss.loss(st.model, st.guide, b))

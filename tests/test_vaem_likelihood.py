"""VAEM's imputation likelihood p(x_d | h) integrates the marginal code out (Ma et al. 2020's generative model)."""
import math

import pytest
import torch

from ppl_vae.data import load_dataset
from ppl_vae.infer import Trainer, evaluate_split
from ppl_vae.models import VAEM, build_model


@pytest.fixture(scope="module")
def boston():
    data = load_dataset("boston")
    return data, data.splits(n_splits=10, seed=0)[0]


def _inputs(model, split, rows=6, samples=3):
    batch = split.test_input()[:rows]
    truth = split.test.batch()[:rows]
    hidden = split.test_mask[:rows] & truth.x_mask.bool()
    torch.manual_seed(0)
    h = model.posterior_latents(batch, samples)                            # (K, B, L)
    return batch, truth, hidden, h


def test_quadrature_equals_monte_carlo_over_codes(boston):
    data, split = boston
    torch.manual_seed(1)
    model = VAEM(data.schema, latent_dim=4).eval()
    batch, truth, hidden, h = _inputs(model, split)
    with torch.no_grad():
        quad = model.imputation_log_prob(h, batch, truth.x, hidden)       # (K, B, D)
        codes = model.code_distribution(h)
        z = codes.sample((20000,))                                         # (S, K, B, D)
        lp = model.x_likelihood.log_prob_entries(model.marginal.decode(z), truth.x, hidden)
        mc = (torch.logsumexp(lp, 0) - math.log(z.shape[0])).masked_fill(~hidden, 0.0)
    assert quad.shape == hidden.shape[:0] + h.shape[:-1] + hidden.shape[-1:]
    assert hidden.any() and (quad[..., ~hidden] == 0).all()
    assert torch.allclose(quad, mc, atol=0.02), (quad - mc).abs().max()


@pytest.mark.parametrize("gaussian_scale", [0.1 ** 0.5, "learned"])
def test_grid_quadrature_equals_gauss_hermite_on_a_trained_model(boston, gaussian_scale):
    """The shared-grid fast path (K = 200 samples) computes the Gauss–Hermite integral of the same model, for the
    paper's fixed code std and for a learned one; a grid that would be too fine falls back to Gauss–Hermite."""
    data, split = boston
    torch.manual_seed(2)
    model = VAEM(data.schema, latent_dim=4, gaussian_scale=gaussian_scale, marginal_steps=150)
    Trainer(model, seed=0, progress=False, batch_size=64).fit(split.train, 400)
    model.eval()
    batch, truth, hidden, h = _inputs(model, split, rows=40, samples=200)
    with torch.no_grad():
        codes = model.code_distribution(h)
        grid = model._grid_quadrature(codes.loc, codes.scale.expand_as(codes.loc), truth.x, hidden)
        assert grid is not None                                          # the fast path is taken at this K
        assert torch.equal(model.imputation_log_prob(h, batch, truth.x, hidden), grid)
        model.cfg.quadrature_grid = False
        gh = model.imputation_log_prob(h, batch, truth.x, hidden)
        assert grid.shape == gh.shape and (grid[..., ~hidden] == 0).all()
        diff = (grid - gh)[..., hidden].abs()
        assert diff.mean() < 1e-3 and diff.max() < 0.03, (diff.mean(), diff.max())
        assert gh[..., hidden].std() > 0.3                               # a trained model: entries differ
        tiny = model._grid_quadrature(codes.loc, torch.full_like(codes.loc, 1e-3), truth.x, hidden)
    assert tiny is None


def test_mean_option_decodes_the_code_mean(boston):
    data, split = boston
    torch.manual_seed(1)
    model = VAEM(data.schema, latent_dim=4, code_likelihood="mean").eval()
    batch, truth, hidden, h = _inputs(model, split)
    with torch.no_grad():
        got = model.imputation_log_prob(h, batch, truth.x, hidden)
        want = model.x_likelihood.log_prob_entries(model.marginal.decode(model.code_distribution(h).loc), truth.x,
                                                   hidden)
    assert torch.equal(got, want)


def test_unknown_code_likelihood_is_an_error(boston):
    with pytest.raises(ValueError, match="code_likelihood 'sample'"):
        VAEM(boston[0].schema, code_likelihood="sample")
    with pytest.raises(ValueError, match="quadrature_nodes"):
        VAEM(boston[0].schema, quadrature_nodes=0)


def test_trained_vaem_imputation_nll_with_the_code_integrated(boston):
    """Dropping the code's uncertainty (the reference's evaluation) makes the learned-variance VAEM's imputation
    NLL far worse than the model's own likelihood; the hierarchical VAEM inherits the integral."""
    data, split = boston
    scores = {}
    for name, option in (("vaem", "quadrature"), ("vaem", "mean"), ("h-vaem", "quadrature")):
        torch.manual_seed(0)
        model = build_model(name, data.schema, latent_dim=4, kl_warmup=100, code_likelihood=option)
        Trainer(model, seed=0, progress=False).fit(split.train, 600)
        result = evaluate_split(model, split, num_samples=50)
        scores[name, option] = result["imputation_nll"]
        scores[name, option, "code mean"] = result["imputation_nll_code_mean"]   # the reference's, always reported
    assert scores["vaem", "mean"] == pytest.approx(scores["vaem", "mean", "code mean"], abs=1e-6)
    assert scores["vaem", "quadrature", "code mean"] > scores["vaem", "quadrature"] + 0.5, scores
    assert scores["vaem", "quadrature"] < 1.6, scores
    assert scores["vaem", "quadrature"] < scores["vaem", "mean"] - 0.5, scores
    assert scores["h-vaem", "quadrature"] < 1.8, scores


def test_vae_has_no_code_mean_metric(boston):
    data, split = boston
    torch.manual_seed(0)
    model = build_model("vae", data.schema, latent_dim=4)
    Trainer(model, seed=0, progress=False).fit(split.train, 20)
    result = evaluate_split(model, split, num_samples=5)
    assert math.isnan(result["imputation_nll_code_mean"]) and math.isfinite(result["imputation_nll"])


def test_code_likelihood_std_is_bounded_or_fixed_as_the_table_says(boston):
    """The dependency VAE's code std: fixed at gaussian_scale in the paper protocol (the reference shares the fixed
    variance with its code likelihood), learned and >= code_min_scale otherwise; every code-decoder parameter is
    trained."""
    data, split = boston
    batch = split.train.batch()[:16]
    h = 50.0 * torch.randn(4, 16, 10)                                      # far out: the softplus saturates low
    learned = VAEM(data.schema, latent_dim=10)
    scale = learned.code_distribution(h).scale
    assert scale.min() >= 0.3 - 1e-6 and scale.std() > 0
    fixed = VAEM(data.schema, latent_dim=10, gaussian_scale=0.1 ** 0.5)
    assert torch.allclose(fixed.code_distribution(h).scale, torch.tensor(0.1 ** 0.5))
    assert VAEM(data.schema, latent_dim=10, gaussian_scale=0.1 ** 0.5, code_scale="learned").fixed_code_scale is None
    assert VAEM(data.schema, latent_dim=10, code_scale=0.5).code_distribution(h).scale.unique().tolist() == [0.5]
    for model in (learned, fixed):
        model.zero_grad()
        (-model.log_lik_x(model.posterior_latents(batch, 2), batch).sum()).backward()
        grads = [p.grad for p in model.code_decoder.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    for bad in ({"code_scale": "wide"}, {"code_scale": 0.0}, {"code_min_scale": 0.0}):
        with pytest.raises(ValueError, match="code_"):
            VAEM(data.schema, **bad)


def test_a_checkpoint_written_before_the_code_std_options_rebuilds_its_own_model(boston, tmp_path):
    """A config without code_scale / code_min_scale is the model with the old unbounded (1e-3 floor) code std,
    not today's default; its outputs are reproduced exactly."""
    from ppl_vae.infer.checkpoint import load_checkpoint, load_model, save_checkpoint
    data, split = boston
    torch.manual_seed(0)
    old = VAEM(data.schema, latent_dim=4, code_scale="learned", code_min_scale=1e-3).eval()
    path = save_checkpoint(tmp_path / "old.pt", old)
    payload = load_checkpoint(path)
    for key in ("code_scale", "code_min_scale"):
        payload["config"].pop(key)
    rebuilt = load_model(payload).eval()
    h = 30.0 * torch.randn(3, 5, 4)
    assert rebuilt.code_decoder[-1].min_scale == 1e-3
    assert torch.equal(rebuilt.code_distribution(h).scale, old.code_distribution(h).scale)
    assert VAEM(data.schema, latent_dim=4).code_decoder[-1].min_scale == 0.3      # today's default differs

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

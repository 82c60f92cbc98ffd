"""Each likelihood head's log-prob equals torch.distributions on the same numbers and ignores masked entries."""
import pyro
import pytest
import torch
import torch.distributions as td
from pyro import poutine

from ppl_vae.data import Column
from ppl_vae.errors import UnknownNameError
from ppl_vae.likelihoods import MixedLikelihood

COLUMNS = [Column("g", "gaussian"), Column("c", "categorical", categories=(0, 1, 2)),
           Column("b", "bernoulli", categories=(0, 1)), Column("l", "loggaussian"),
           Column("c5", "categorical", categories=tuple(range(5))), Column("p", "poisson")]


@pytest.fixture
def setup():
    torch.manual_seed(0)
    lik = MixedLikelihood(COLUMNS)
    B = 6
    params = torch.randn(3, B, lik.param_dim)
    x = torch.stack([torch.randn(B), torch.randint(0, 3, (B,)).float(), torch.randint(0, 2, (B,)).float(),
                     torch.randn(B), torch.randint(0, 5, (B,)).float(), torch.randint(0, 6, (B,)).float()], 1)
    mask = torch.rand(B, 6) > 0.4
    return lik, params, x, mask


def reference_log_probs(lik, params, x):
    """Per-column torch.distributions log-probs, built by hand from the documented parameter layout."""
    lo, hi = lik.min_scale, lik.max_scale
    g = td.Normal(params[..., 0], lo + (hi - lo) * torch.sigmoid(params[..., 1])).log_prob(x[:, 0])
    c = td.Categorical(logits=params[..., 2:5]).log_prob(x[:, 1].long())
    b = td.Bernoulli(logits=params[..., 5]).log_prob(x[:, 2])
    lg = td.Normal(params[..., 6], lo + (hi - lo) * torch.sigmoid(params[..., 7])).log_prob(x[:, 3])
    c5 = td.Categorical(logits=params[..., 8:13]).log_prob(x[:, 4].long())
    p = td.Poisson(params[..., 13].exp()).log_prob(x[:, 5])
    return torch.stack([g, c, b, lg, c5, p], -1)


def test_log_prob_matches_torch_distributions(setup):
    lik, params, x, mask = setup
    assert lik.param_dim == 14 and lik.feature_dim == 1 + 3 + 1 + 1 + 5 + 1
    ref = reference_log_probs(lik, params, x)
    got = lik.log_prob_entries(params, x)
    torch.testing.assert_close(got, ref)
    masked = lik.log_prob_entries(params, x, mask)
    torch.testing.assert_close(masked, torch.where(mask, ref, torch.zeros(())))
    torch.testing.assert_close(lik.log_prob(params, x, mask), (ref * mask).sum(-1))


def test_masked_entries_are_never_read(setup):
    lik, params, x, mask = setup
    poisoned = x.masked_fill(~mask, float("nan"))
    out = lik.log_prob_entries(params, poisoned, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, lik.log_prob_entries(params, x, mask))


def test_pyro_sites_equal_fast_path(setup):
    lik, params, x, mask = setup
    def model():
        with pyro.plate("data", x.shape[0], dim=-1):
            lik.observe("x", params[0], x, mask)
    tr = poutine.trace(model).get_trace()
    tr.compute_log_prob()
    total = sum(s["log_prob"] for s in tr.nodes.values() if s["type"] == "sample")
    torch.testing.assert_close(total, lik.log_prob(params[0], x, mask))
    assert {n for n in tr.nodes if n.startswith("x_")} == {"x_gaussian", "x_loggaussian", "x_bernoulli",
                                                           "x_categorical", "x_poisson"}


def test_impute_sample_and_features(setup):
    lik, params, x, mask = setup
    imp = lik.impute(params)
    assert imp.shape == (3, 6, 6)
    torch.testing.assert_close(imp[..., 0], params[..., 0])                      # gaussian mean
    torch.testing.assert_close(imp[..., 1], params[..., 2:5].argmax(-1).float())  # categorical mode
    torch.testing.assert_close(imp[..., 2], (params[..., 5] > 0).float())         # bernoulli mode
    s = lik.sample(params)
    assert ((s[..., 1] >= 0) & (s[..., 1] <= 2)).all() and ((s[..., 4] >= 0) & (s[..., 4] <= 4)).all()
    enc = lik.encode(x, mask)
    assert enc.shape == (6, lik.feature_dim)
    onehot = enc[:, 1:4]
    assert torch.equal(onehot.sum(-1), mask[:, 1].float())                       # one-hot only where observed
    feats = lik.expected_features(params)
    torch.testing.assert_close(feats[..., 1:4].sum(-1), torch.ones(3, 6))       # class probabilities
    filled = lik.fill_features(params, x, mask)
    fmask = lik.feature_mask(mask)
    torch.testing.assert_close(filled[:, fmask], enc.expand(3, -1, -1)[:, fmask])


def test_unknown_likelihood_lists_choices():
    class Bad:
        name, likelihood, num_categories = "price", "lognormal", None
    with pytest.raises(UnknownNameError, match="price.*lognormal.*gaussian"):
        MixedLikelihood([Bad()])

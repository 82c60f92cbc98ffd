"""The model-agnostic tools the lecture models use: IW log-likelihood from traces, KL annealing of any program,
the posterior-collapse report, latent interpolation / decoding, OOD AUROC, and the ``ppl-vae zoo`` command."""
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.infer.collapse import collapse_report
from ppl_vae.infer.latents import decode_mean, interpolate, latent_interpolation, posterior_mean
from ppl_vae.infer.likelihood import LikelihoodError, iw_log_likelihood
from ppl_vae.infer.ood import auroc
from ppl_vae.models.base import Batch
from ppl_vae.models.schedules import CyclicalKL, KLAnnealing, LinearKL

D = 3


def _batch(x):
    return Batch(x=x, x_mask=torch.ones_like(x, dtype=torch.bool))


def gaussian_model(b):
    """z ~ N(0, I), x | z ~ N(z, I): p(x) = N(0, 2 I); p(z | x) = N(x / 2, I / 2)."""
    with pyro.plate("data", b.size, dim=-1):
        z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=b.x)


def gaussian_guide(b, scale=math.sqrt(0.5), shift=0.0):
    with pyro.plate("data", b.size, dim=-1):
        pyro.sample("z", dist.Normal(b.x / 2 + shift, scale).to_event(1))


def test_iw_log_likelihood_is_exact_with_the_exact_posterior_and_tightens_with_k():
    pyro.set_rng_seed(0)
    x = torch.randn(6, D)
    truth = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).sum(-1)
    exact = iw_log_likelihood(gaussian_model, gaussian_guide, _batch(x), num_particles=3)
    assert torch.allclose(exact, truth, atol=1e-5)
    poor = lambda b: gaussian_guide(b, scale=1.5, shift=0.5)                       # noqa: E731
    k1 = torch.stack([iw_log_likelihood(gaussian_model, poor, _batch(x), 1) for _ in range(200)]).mean(0)
    k2000 = iw_log_likelihood(gaussian_model, poor, _batch(x), 2000, chunk=500)
    assert (k1 < truth - 0.5).all()                         # the ELBO is loose for this guide
    assert (k2000 - truth).abs().max() < 0.15               # the IW bound closes the gap
    assert (k2000 > k1).all()


def mixture_model(b, guide_site=True):
    """c ~ Cat(π), z | c ~ N(μ_c, 1), x | z ~ N(z, 1): p(x) = Σ_c π_c N(x; μ_c, 2)."""
    pi, mu = torch.tensor([0.3, 0.7]), torch.tensor([-2.0, 2.0])
    with pyro.plate("data", b.size, dim=-1):
        c = pyro.sample("c", dist.Categorical(pi), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(mu[c], 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=b.x[:, 0])


def mixture_guide(b, with_c=True):
    with pyro.plate("data", b.size, dim=-1):
        z = pyro.sample("z", dist.Normal(b.x[:, 0] / 2, 1.0))
        if with_c:
            pyro.sample("c", dist.Categorical(logits=torch.stack([-z, z], -1)), infer={"enumerate": "parallel"})


@pytest.mark.parametrize("with_c", [True, False], ids=["c-in-guide", "c-from-prior"])
def test_iw_log_likelihood_samples_enumerated_sites(with_c):
    pyro.set_rng_seed(1)
    x = torch.tensor([[-2.5], [0.1], [3.0]])
    truth = torch.logsumexp(torch.log(torch.tensor([0.3, 0.7])) +
                            dist.Normal(torch.tensor([-2.0, 2.0]), math.sqrt(2.0)).log_prob(x), -1)
    est = iw_log_likelihood(mixture_model, lambda b: mixture_guide(b, with_c), _batch(x), 20000, chunk=5000)
    assert (est - truth).abs().max() < 0.05


def test_iw_log_likelihood_refuses_a_global_latent():
    def model(b):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", b.size):
            pyro.sample("x", dist.Normal(w, 1.0).expand([b.size, D]).to_event(1), obs=b.x)

    def guide(b):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(LikelihoodError, match="'w'"):
        iw_log_likelihood(model, guide, _batch(torch.zeros(2, D)), 4)


def test_kl_annealing_scales_latents_only_and_the_loss_is_linear_in_the_weight():
    sched = CyclicalKL(total=100, cycles=2, ratio=0.5)
    assert [round(sched(s), 3) for s in (0, 12, 30, 50, 100)] == [0.0, 0.48, 1.0, 0.0, 1.0]
    annealing = KLAnnealing(LinearKL(warmup=10))
    annealing.set_step(4)
    assert annealing.weight == pytest.approx(0.5)
    x = torch.randn(8, D)
    tr = pyro.poutine.trace(annealing(gaussian_model)).get_trace(_batch(x))
    assert tr.nodes["z"]["scale"] == pytest.approx(0.5) and tr.nodes["x"]["scale"] == 1.0

    def loss_at(weight):
        a = KLAnnealing(lambda step: weight)
        pyro.set_rng_seed(3)
        return pyro.infer.Trace_ELBO().loss(a(gaussian_model), a(lambda b: gaussian_guide(b, 0.9, 0.3)), _batch(x))

    assert loss_at(0.5) == pytest.approx(0.5 * (loss_at(1e-8) + loss_at(1.0)), rel=1e-5)
    assert abs(loss_at(1.0) - loss_at(1e-8)) > 1.0         # the KL term really moved


def test_image_models_take_a_kl_schedule_option():
    from ppl_vae.models.image.betavae import BetaVAE

    stage = BetaVAE(kl_schedule="linear", kl_warmup=10).training_stages(50)[0]
    stage.on_step(0)
    tr = pyro.poutine.trace(stage.model).get_trace(_batch(torch.rand(4, 784)))
    assert tr.nodes["z"]["scale"] == pytest.approx(0.1)
    assert BetaVAE().training_stages(5)[0].on_step is None  # constant: the plain ELBO, untouched
    with pytest.raises(ValueError, match="kl_schedule"):
        BetaVAE(kl_schedule="cosine")


def test_collapse_report_finds_the_collapsed_units():
    def guide(b):                         # dims 0, 1 follow the data; dim 2 is the prior for every x (collapsed)
        loc = torch.cat([b.x[:, :2] / 2, torch.zeros(b.size, 1)], -1)
        scale = torch.tensor([math.sqrt(0.5), math.sqrt(0.5), 1.0])
        with pyro.plate("data", b.size):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    x = torch.randn(400, D, generator=torch.Generator().manual_seed(0)) * math.sqrt(2.0)
    report = collapse_report(gaussian_model, guide, _batch(x))
    assert report["active"].tolist() == [True, True, False]
    assert report.attrs["z"]["num_active"] == 2
    kl = report["kl"].to_numpy()
    expected = 0.5 * (0.5 + float((x[:, 0] / 2).pow(2).mean()) - 1 - math.log(0.5))
    assert kl[0] == pytest.approx(expected, rel=1e-4) and kl[2] == pytest.approx(0.0, abs=1e-6)


def test_interpolation_and_decoding_from_traces():
    from ppl_vae.models.image.betavae import BetaVAE

    a, b = torch.randn(4, 10), torch.randn(4, 10)
    b = b / b.norm(dim=-1, keepdim=True) * a.norm(dim=-1, keepdim=True)
    lin, sl = interpolate(a, b, 7, "linear"), interpolate(a, b, 7, "slerp")
    assert torch.allclose(sl[0], a, atol=1e-5) and torch.allclose(sl[-1], b, atol=1e-5)
    assert torch.allclose(sl.norm(dim=-1), a.norm(dim=-1).expand(7, 4), rtol=1e-4)   # slerp keeps the norm
    assert (lin[3].norm(dim=-1) < a.norm(dim=-1)).all()                                  # linear cuts inside
    with pytest.raises(ValueError, match="interpolation"):
        interpolate(a, b, 4, "cubic")
    model = BetaVAE()
    xa, xb = _batch(torch.rand(3, 784)), _batch(torch.rand(3, 784))
    z = posterior_mean(model.guide, xa)
    assert torch.allclose(z, model.z_head(model.encoder(xa.x))[0])
    assert torch.allclose(decode_mean(model.model, xa, {"z": z}), model.generate(z), atol=1e-6)
    grid = latent_interpolation(model.model, model.guide, xa, xb, num=5, kind="slerp")
    assert grid.shape == (3, 5, 784)
    assert torch.allclose(grid[:, -1], model.generate(posterior_mean(model.guide, xb)), atol=1e-5)


def test_auroc():
    assert auroc([0.1, 0.2, 0.3], [1.0, 2.0]) == 1.0
    assert auroc([1.0, 2.0], [0.1, 0.2]) == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        auroc([float("nan")], [1.0])


def test_zoo_covers_every_lecture_model_and_runs_from_the_cli(tmp_path, capsys):
    from ppl_vae.cli import main
    from ppl_vae.experiments.lectures import ZOO
    from ppl_vae.models import MODELS

    trained = {m for e in ZOO.values() for m in e.models}
    for name in ("cvae", "m2", "poe-vae", "vampprior", "vade", "seq-vae"):
        assert name in MODELS and name in trained
    assert main(["zoo", "nope"]) == 2
    assert main(["zoo", "interpolation", "--smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["experiment"] == "interpolation"
    assert result["midpoint_norm_ratio_slerp"] > result["midpoint_norm_ratio_linear"] - 1e-6
    assert (tmp_path / "interpolation_slerp.png").exists()
    from ppl_vae.infer import load_model

    model = load_model(tmp_path / "beta-vae-interpolation.pt")
    assert model.name == "beta-vae"

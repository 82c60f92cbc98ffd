"""Cost of the trace-derived HMC potential, and of :class:`HMCRefinedGuide.refine`, against hand-written code.

Two ratios, measured in one run:

- *trace / fast path*: ``refine`` on the potential derived from the model's Pyro trace
  (:class:`ppl_vae.infer.potential.TracePotential`) against ``refine`` with the model's hand-written log joint
  (checked equal to the trace on first use);
- *fast path / bare loop*: ``refine`` against the same HMC arithmetic written as a bare torch loop.

Setting (VAEM-sized): latent 10, decoder MLP 10 -> 64 -> 14 Gaussian outputs (fixed σ = 0.3, ~30 % of the entries
missing), batch 128, T = 5 transitions, L = 5 leapfrog steps, one chain per datapoint (training) and 30 (SKSD
chains). Both versions draw ``ε_0 = μ + s σ ξ``, evaluate ``∇log p*`` with ``torch.autograd.grad`` (detached), keep
the positions differentiable in the step sizes, and accept/reject per element with ``torch.where``. The bare loop
records ``position = position + step * momentum`` directly (the reference formulation); the guide simulates without
recording and rebuilds the differentiable end point from its closed form. Timed: the refine call alone, and refine
plus the backward pass of ``-mean log p*(ε_T)`` into the decoder and step sizes (one ``L_HMC`` step).

Usage: ``python benchmarks/refined_guide_overhead.py [--smoke] [--device cpu] [--threads 1] [--repeats 50]``.
Prints the times and both ratios (target ≤ 1.3 each) and writes ``benchmarks/results/refined_guide_overhead.md``
(not in smoke mode).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppl_vae.infer.refined_guide import HMCRefinedGuide  # noqa: E402
from ppl_vae.models.base import Batch  # noqa: E402

LATENT, HIDDEN, OUT, SIGMA = 10, 64, 14, 0.3


class ToyVAEM(nn.Module):
    """A refinable model of VAEM size: Gaussian decoder 10 -> 64 -> 14, linear encoder."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
        self.encoder = nn.Linear(2 * OUT, 2 * LATENT)

    def proposal(self, batch):
        m = batch.x_mask.float()
        loc, log_scale = self.encoder(torch.cat([batch.x * m, m], -1)).chunk(2, -1)
        return loc, log_scale.clamp(-5, 2).exp()

    def model(self, batch):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", batch.size):
            z = pyro.sample("z", dist.Normal(batch.x.new_zeros(LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), SIGMA).mask(batch.x_mask).to_event(1), obs=batch.x)

    def guide(self, batch):
        pyro.module("encoder", self.encoder)
        loc, scale = self.proposal(batch)
        with pyro.plate("data", batch.size):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def log_joint(self, latent, batch):
        m = batch.x_mask.float()
        ll = -0.5 * ((batch.x - self.decoder(latent)) / SIGMA) ** 2 - math.log(SIGMA) - 0.5 * math.log(2 * math.pi)
        return -0.5 * (latent**2).sum(-1) - 0.5 * LATENT * math.log(2 * math.pi) + (ll * m).sum(-1)


def bare_refine(model, batch, log_step, log_infl, num_chains, num_leapfrog, threshold=1000.0):
    """The HMC refinement as a bare loop: recorded leapfrog, per-element MH with torch.where."""
    loc, scale = model.proposal(batch)
    loc, scale = loc.detach(), scale.detach()
    x = loc + log_infl.exp() * scale * torch.randn((num_chains,) + tuple(loc.shape))
    step = log_step.exp()

    def vg(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            lp = model.log_joint(z, batch)
            (g,) = torch.autograd.grad(lp.sum(), z)
        return lp.detach(), g

    lp, g = vg(x)
    for t in range(step.shape[0]):
        r = torch.randn_like(x)
        h0 = 0.5 * (r * r).sum(-1) - lp
        p = x
        mom = r + 0.5 * step[t] * g
        for l in range(num_leapfrog):
            p = p + step[t] * mom
            lp1, g1 = vg(p)
            mom = mom + (step[t] if l < num_leapfrog - 1 else 0.5 * step[t]) * g1
        h1 = 0.5 * (mom.detach() ** 2).sum(-1) - lp1
        delta = h1 - h0
        div = ~torch.isfinite(delta) | (delta > threshold)
        acc = (torch.rand_like(delta).log() < -delta) & ~div
        x = torch.where(acc.unsqueeze(-1), p, x)
        lp = torch.where(acc, lp1, lp)
        g = torch.where(acc.unsqueeze(-1), g1, g)
    return x


def timeit(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]  # median, ms


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    repeats = args.repeats or (5 if args.smoke else 50)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = ToyVAEM().to(dev)
    x = torch.randn(128, OUT, device=dev)
    mask = torch.rand(128, OUT, device=dev) > 0.3
    batch = Batch(x=torch.where(mask, x, torch.zeros_like(x)), x_mask=mask)
    fast = HMCRefinedGuide(model.model, model.guide, num_transitions=5, num_leapfrog=5, latent_dim=LATENT,
                           step_size_scheme="absolute", fast_log_joint=model.log_joint).to(dev)
    traced = HMCRefinedGuide(model.model, model.guide, num_transitions=5, num_leapfrog=5, latent_dim=LATENT,
                             step_size_scheme="absolute").to(dev)
    traced.load_state_dict(fast.state_dict())
    compiled = HMCRefinedGuide(model.model, model.guide, num_transitions=5, num_leapfrog=5, latent_dim=LATENT,
                               step_size_scheme="absolute", compile=True).to(dev)
    compiled.load_state_dict(fast.state_dict())
    log_step = fast.step_sizes.log_step_size
    log_infl = fast.log_inflation

    results = {}
    for chains in (1, 16):
        def fast_fwd():
            return fast.refine(batch, num_chains=chains).position

        def trace_fwd():
            return traced.refine(batch, num_chains=chains).position

        def compiled_fwd():
            return compiled.refine(batch, num_chains=chains).position

        def bare_fwd():
            return bare_refine(model, batch, log_step, log_infl, chains, 5)

        compiled_fwd()  # records the graph once per signature (about a second), verified against the trace

        def step(fwd, steps_param):
            def run():
                z = fwd()
                loss = -model.log_joint(z, batch).mean()
                torch.autograd.grad(loss, list(model.decoder.parameters()) + [steps_param])
            return run

        tf, tt, tb = timeit(fast_fwd, repeats), timeit(trace_fwd, repeats), timeit(bare_fwd, repeats)
        tc = timeit(compiled_fwd, repeats)
        tfs = timeit(step(fast_fwd, log_step), repeats)
        tts = timeit(step(trace_fwd, traced.step_sizes.log_step_size), repeats)
        tbs = timeit(step(bare_fwd, log_step), repeats)
        results[chains] = dict(trace_ms=tt, compiled_ms=tc, fast_ms=tf, bare_ms=tb, trace_over_fast=tt / tf,
                               compiled_over_fast=tc / tf, fast_over_bare=tf / tb,
                               trace_step_ms=tts, fast_step_ms=tfs, bare_step_ms=tbs,
                               step_trace_over_fast=tts / tfs, step_fast_over_bare=tfs / tbs)
    lines = [f"# HMC refinement cost: latent {LATENT}, decoder {LATENT}->{HIDDEN}->{OUT}, batch 128, T=5, L=5, "
             f"device {args.device}, threads {torch.get_num_threads()}, median of {repeats} (ms)", "",
             "| chains | trace-derived | trace-derived, compiled | fast path | bare loop | trace / fast "
             "| compiled / fast | fast / bare | step: trace / fast | step: fast / bare |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for chains, r in results.items():
        lines.append(f"| {chains} | {r['trace_ms']:.2f} | {r['compiled_ms']:.2f} | {r['fast_ms']:.2f} | "
                     f"{r['bare_ms']:.2f} | {r['trace_over_fast']:.2f} | {r['compiled_over_fast']:.2f} | "
                     f"{r['fast_over_bare']:.2f} | {r['step_trace_over_fast']:.2f} | "
                     f"{r['step_fast_over_bare']:.2f} |")
    lines += ["", "step = refine + backward of -mean log p*(z_T) into the decoder and step sizes (one L_HMC step)."]
    print("\n".join(lines))
    if not args.smoke:
        out = Path(__file__).resolve().parent / "results" / "refined_guide_overhead.md"
        out.write_text("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()

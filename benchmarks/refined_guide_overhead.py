"""Overhead of :class:`HMCRefinedGuide.refine` against the same HMC arithmetic written as a bare torch loop.

Setting (VAEM-sized): latent 10, decoder MLP 10 -> 64 -> 14 Gaussian outputs (fixed σ = 0.3, ~30 % of the entries
missing), batch 128, T = 5 transitions, L = 5 leapfrog steps, one chain per datapoint (training) and 30 (SKSD
chains). Both versions draw ``ε_0 = μ + s σ ξ``, evaluate ``∇log p*`` with ``torch.autograd.grad`` (detached), keep
the positions differentiable in the step sizes, and accept/reject per element with ``torch.where``. The bare loop
records ``position = position + step * momentum`` directly (the reference formulation); the guide simulates without
recording and rebuilds the differentiable end point from its closed form. Timed: the refine call alone, and refine
plus the backward pass of ``-mean log p*(ε_T)`` into the decoder and step sizes (one ``L_HMC`` step).

Usage: ``python benchmarks/refined_guide_overhead.py [--smoke] [--device cpu] [--threads 1] [--repeats 50]``.
Prints the times and the ratio guide / bare loop (target ≤ 1.3).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

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

    def latent_sites(self):
        return [("z", LATENT)]

    def encoder_parameters(self):
        return list(self.encoder.parameters())

    def proposal(self, batch):
        m = batch.x_mask.float()
        loc, log_scale = self.encoder(torch.cat([batch.x * m, m], -1)).chunk(2, -1)
        return loc, log_scale.clamp(-5, 2).exp()

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
    guide = HMCRefinedGuide(model, num_steps=5, num_leapfrog=5).to(dev)
    log_step = guide.step_sizes.log_step_size
    log_infl = guide.log_inflation

    results = {}
    for chains in (1, 30):
        def guide_fwd():
            return guide.refine(batch, chains).position

        def bare_fwd():
            return bare_refine(model, batch, log_step, log_infl, chains, 5)

        def guide_step():
            z = guide_fwd()
            loss = -model.log_joint(z, batch).mean()
            torch.autograd.grad(loss, list(model.decoder.parameters()) + [log_step])

        def bare_step():
            z = bare_fwd()
            loss = -model.log_joint(z, batch).mean()
            torch.autograd.grad(loss, list(model.decoder.parameters()) + [log_step])

        tg, tb = timeit(guide_fwd, repeats), timeit(bare_fwd, repeats)
        tgs, tbs = timeit(guide_step, repeats), timeit(bare_step, repeats)
        results[chains] = dict(guide_ms=tg, bare_ms=tb, ratio=tg / tb, guide_step_ms=tgs, bare_step_ms=tbs,
                               step_ratio=tgs / tbs)
    lines = [f"refine overhead: latent {LATENT}, decoder {LATENT}->{HIDDEN}->{OUT}, batch 128, T=5, L=5, "
             f"device {args.device}, threads {torch.get_num_threads()}, median of {repeats}"]
    for chains, r in results.items():
        lines.append(f"  chains={chains:>2}: refine {r['guide_ms']:.2f} ms vs bare loop {r['bare_ms']:.2f} ms "
                     f"(ratio {r['ratio']:.2f}); refine+backward {r['guide_step_ms']:.2f} ms vs "
                     f"{r['bare_step_ms']:.2f} ms (ratio {r['step_ratio']:.2f})")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()

"""``ppl-vae diagnose CHECKPOINT --dataset NAME``: MCMC diagnostics of a trained table model's posterior.

For a handful of test rows (the checkpoint's own test split, 50% of x hidden, y unobserved), run ``--chains``
independent HMC chains per row from over-dispersed starts (the guide's proposal inflated ×2), each draw being one
sweep of the model's tuned schedule of ``T`` transitions (HMC models; other models get a constant step size), and
report R-hat, bulk/tail ESS, MCSE, acceptance rate, divergences and BFMI with ArviZ; trace, rank and energy plots
are written next to the summary table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

HELP = "MCMC diagnostics (R-hat, ESS, MCSE, acceptance, divergences, BFMI + plots) of a checkpoint's posterior"

__all__ = ["collect_chains", "add_arguments", "run", "HELP"]


def collect_chains(model, batch, num_chains: int = 4, num_draws: int = 200, warmup: int = 50,
                   step_size: float = 0.05, num_leapfrog: Optional[int] = None, init_scale: float = 2.0,
                   seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Run HMC chains on ``model.log_joint`` for every row of ``batch``.

    Args:
        model: a table model (``proposal``, ``log_joint``); an HMC model's tuned ``(T, latent_dim)`` step sizes
            and ``L`` are used, one draw per sweep of the T transitions.
        batch: the rows to diagnose (``Batch``), normalised domain.
        num_chains, num_draws, warmup: chains per row, kept draws, discarded warm-up draws.
        step_size, num_leapfrog: used when the model has no tuned sampler (``L`` defaults to 5).
        init_scale: over-dispersion of the chains' starts relative to the guide's scale.
        seed: seeds the starts, momenta and accept/reject draws.

    Returns:
        ``(chains, stats)``: chains ``(num_chains, num_draws, batch, latent_dim)``; stats ``energy``,
        ``accept_prob``, ``diverging`` ``(num_chains, num_draws, batch)`` (energy after, mean acceptance over and
        any divergence within each sweep) and ``step_size`` ``(num_draws, latent_dim)`` (the sweep's mean step
        size per dimension), all on the CPU.
    """
    from ppl_vae.infer.mcmc import run_hmc

    gen = torch.Generator(device=batch.device).manual_seed(seed)
    guide = getattr(model, "hmc_guide", None)
    with torch.no_grad():
        loc, scale = model.proposal(batch)
        if guide is not None:
            schedule = guide.step_sizes().detach()
            L = guide.num_leapfrog if num_leapfrog is None else num_leapfrog
        else:
            schedule = torch.full((1, loc.shape[-1]), float(step_size), device=loc.device)
            L = num_leapfrog or 5
        xi = torch.randn((num_chains,) + loc.shape, generator=gen, device=loc.device, dtype=loc.dtype)
        init = loc + init_scale * scale * xi
    T = schedule.shape[0]
    sweeps = warmup + num_draws
    with torch.enable_grad():
        trace = run_hmc(lambda h: model.log_joint(h, batch), init, schedule.repeat(sweeps, 1), L,
                        generator=gen, keep_chain=True)
    keep = slice(warmup * T + T, None, T)                      # the state after each full sweep
    chains = trace.positions[keep].movedim(0, 1)               # (C, draws, B, L)

    def per_draw(x):                                            # (sweeps*T, C, B) -> (draws, T, C, B)
        return x.reshape(sweeps, T, *x.shape[1:])[warmup:]

    stats = {"energy": per_draw(trace.energy)[:, -1].movedim(0, 1),
             "accept_prob": per_draw(trace.accept_prob).mean(1).movedim(0, 1),
             "diverging": per_draw(trace.diverging).any(1).movedim(0, 1),
             "step_size": schedule.mean(0).expand(num_draws, schedule.shape[-1])}
    return chains.detach().cpu(), {k: v.detach().cpu() for k, v in stats.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``ppl-vae diagnose``."""
    p.add_argument("checkpoint", help="a checkpoint written by `ppl-vae run|fit`")
    p.add_argument("--dataset", help="data set name (default: the one recorded in the checkpoint)")
    p.add_argument("--rows", type=int, default=5, help="test rows to diagnose (default 5)")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: next to the checkpoint, diagnostics/)")


def run(args) -> int:
    """Run the diagnostics; prints the summary table and writes ``summary.csv``, ``summary.md`` and plots."""
    from ppl_vae import diagnostics
    from ppl_vae.infer.svi import load_checkpoint, load_model
    from ppl_vae.pipeline import resolve_dataset, resolve_device

    device = resolve_device(args.device)
    payload = load_checkpoint(args.checkpoint, map_location=device)
    meta = payload.get("metadata") or {}
    spec = meta.get("data") or {}
    name = args.dataset or spec.get("name")
    data = resolve_dataset(None if spec.get("csv") and not args.dataset else name,
                           csv=None if args.dataset else spec.get("csv"), target=spec.get("target"))
    split = data.splits(n_splits=spec.get("folds", 10), seed=spec.get("seed", 0))[meta.get("fold", 0)]
    model = load_model(payload, map_location=device)
    batch = split.test_input(device=device)[: args.rows]
    chains, stats = collect_chains(model, batch, args.chains, args.draws, args.warmup, seed=args.seed)
    tree = diagnostics.to_arviz(chains, stats)
    table = diagnostics.summary(tree)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    frame = table if hasattr(table, "to_csv") else table.to_dataframe()
    frame.to_csv(out / "summary.csv")
    overall = {"accept_rate": float(stats["accept_prob"].mean()), "divergences": int(stats["diverging"].sum()),
               "chains": args.chains, "draws": args.draws, "rows": int(batch.size), "model": payload["model_name"]}
    (out / "summary.md").write_text(f"# Diagnostics of {payload['model_name']} on {name}\n\n"
                                    f"{json.dumps(overall)}\n\n```\n{frame.to_string()}\n```\n")
    diagnostics.plot_trace(tree, out / "trace.png")
    diagnostics.plot_rank(tree, out / "rank.png")
    diagnostics.plot_energy(tree, out / "energy.png")
    print(frame.to_string(max_rows=40))
    print(f"\nacceptance rate {overall['accept_rate']:.3f}, divergences {overall['divergences']}; "
          f"written to {out}/ (summary.csv, summary.md, trace.png, rank.png, energy.png)")
    return 0

"""``ppl-vae diagnose CHECKPOINT --dataset NAME``: MCMC diagnostics of a trained table model's posterior.

For a handful of test rows (the checkpoint's own test split, 50% of x hidden, y unobserved), run ``--chains``
independent HMC chains per row from over-dispersed starts (the guide's proposal inflated ×2), each draw being one
sweep of the model's tuned schedule of ``T`` transitions (HMC models; other models get a constant step size), and
report R-hat, bulk/tail ESS and MCSE (one row per datapoint and latent dimension), and per chain the mean acceptance
probability (``accept_prob``, Stan's ``accept_stat__``), the fraction of accepted proposals (``accept_rate``),
divergences and BFMI, with ArviZ; trace, rank and energy plots are written next to the summary tables.

The chains come from the inference core: :meth:`ppl_vae.infer.HMCRefinedGuide.sample_chains` on the log joint
derived from the model's Pyro trace (:mod:`ppl_vae.infer.potential`), the HMC-refined model's own guide or, for
other models, a one-transition guide with a fixed step size (:func:`fixed_step_guide`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

HELP = "MCMC diagnostics (R-hat, ESS, MCSE, acceptance, divergences, BFMI + plots) of a checkpoint's posterior"

__all__ = ["collect_chains", "fixed_step_guide", "add_arguments", "run", "HELP"]


def fixed_step_guide(model, step_size: float = 0.05, num_leapfrog: int = 5):
    """An :class:`~ppl_vae.infer.HMCRefinedGuide` for a table model without a tuned sampler: ``T = 1`` transition
    of ``num_leapfrog`` leapfrog steps with the constant absolute step size ``step_size`` in every latent dimension,
    on the potential derived from ``model.model``'s trace (checked against ``model.log_joint`` when it has one).

    Args:
        model: a table model (``model``, ``guide``, ``latent_dim``; optionally ``log_joint``).
        step_size: the fixed step size (> 0).
        num_leapfrog: ``L`` (>= 1).

    Returns:
        the guide, its ``(1, latent_dim)`` step sizes filled with ``step_size``.

    Raises:
        ValueError: ``step_size <= 0`` or ``num_leapfrog < 1``.
    """
    import math

    from ppl_vae.infer.refined_guide import HMCRefinedGuide

    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    guide = HMCRefinedGuide(model.model, model.guide, num_transitions=1, num_leapfrog=int(num_leapfrog),
                            step_size_scheme="absolute", latent_dim=model.latent_dim,
                            fast_log_joint=getattr(model, "log_joint", None), name="diagnose_guide")
    with torch.no_grad():
        guide.step_sizes.log_step_size.data.fill_(math.log(float(step_size)))
    return guide


def _moved_fraction(chains: torch.Tensor) -> torch.Tensor:
    """Fallback of ``accepted`` for a kernel that does not report its decisions: 1 where the kept state differs from
    the previous kept state (a rejected transition keeps the state exactly), ``(C, draws, N)``; the first draw copies
    the second. Exact for one transition per sweep; with ``T > 1`` it is whether *any* transition of the sweep was
    accepted."""
    from ppl_vae.diagnostics import accepted_from_positions

    moved = accepted_from_positions(chains.movedim(1, 0)).movedim(0, 1).to(chains.dtype)   # (C, draws-1, N)
    if moved.shape[1] == 0:
        return torch.ones(chains.shape[:3], dtype=chains.dtype)
    return torch.cat([moved[:, :1], moved], 1)


def collect_chains(model, batch, num_chains: int = 4, num_draws: int = 200, warmup: int = 50,
                   step_size: float = 0.05, num_leapfrog: Optional[int] = None, init_scale: float = 2.0,
                   seed: int = 0) -> tuple[torch.Tensor, dict]:
    """HMC chains on a table model's posterior for every row of ``batch``, through the inference core.

    An HMC-refined model (one with ``hmc_guide``) is sampled with its own tuned schedule of ``T`` transitions,
    one draw per sweep (:meth:`~ppl_vae.infer.HMCRefinedGuide.sample_chains`); any other table model gets
    :func:`fixed_step_guide` (one transition per draw, constant ``step_size``). The target is the per-datapoint log
    joint derived from the model's Pyro trace (:class:`~ppl_vae.infer.potential.TracePotential`); the chains start
    from the guide's Gaussian with its scale multiplied by ``init_scale`` (over-dispersed starts for R-hat).

    Args:
        model: a table model (``model``, ``guide``, ``latent_dim``; optionally ``hmc_guide``).
        batch: the rows to diagnose (``Batch``), normalised domain.
        num_chains, num_draws, warmup: chains per row, kept draws, discarded warm-up draws.
        step_size: the fixed step size of a model without a tuned sampler.
        num_leapfrog: ``L`` (default: the tuned model's own, else 5).
        init_scale: over-dispersion of the chains' starts relative to the guide's scale.
        seed: seeds the starts, momenta and accept/reject draws.

    Returns:
        ``(chains, stats)``: chains ``(num_chains, num_draws, batch, latent_dim)``; stats ``energy``,
        ``accept_prob``, ``accepted``, ``diverging`` ``(num_chains, num_draws, batch)`` (energy after, mean
        acceptance probability over, fraction of accepted transitions in, and any divergence within each sweep) and
        ``step_size`` ``(num_draws, latent_dim)`` (the sweep's mean step size per dimension, relative to the
        guide's σ for a ``"relative"`` step-size scheme), all on the CPU.

    Raises:
        ppl_vae.infer.potential.PotentialError: the model's potential cannot be derived (names the site).
    """
    guide = getattr(model, "hmc_guide", None)
    saved_l = None
    if guide is None:
        guide = fixed_step_guide(model, step_size, 5 if num_leapfrog is None else num_leapfrog).to(batch.device)
    elif num_leapfrog is not None:
        saved_l, guide.num_leapfrog = guide.num_leapfrog, int(num_leapfrog)
    try:
        chains, stats = guide.sample_chains(batch, num_chains=num_chains, num_draws=num_draws, warmup=warmup,
                                            init_scale=init_scale, seed=seed)
    finally:
        if saved_l is not None:
            guide.num_leapfrog = saved_l
    if "accepted" not in stats:
        stats["accepted"] = _moved_fraction(chains)
    return chains, stats


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
    """Run the diagnostics; prints the summary table and writes ``summary.csv`` (one row per datapoint and latent
    dimension), ``sampler.csv`` (one row per chain and datapoint), ``summary.md`` and the plots.

    Raises: :class:`~ppl_vae.errors.CheckpointError` (unreadable, crafted or foreign checkpoint),
    :class:`~ppl_vae.errors.PplVaeError` (bad data set / device)."""
    from ppl_vae import diagnostics
    from ppl_vae.infer.checkpoint import load_checkpoint, load_model
    from ppl_vae.pipeline import dataset_from_spec, resolve_device

    device = resolve_device(args.device)
    payload = load_checkpoint(args.checkpoint, map_location=device)
    meta = payload.get("metadata") or {}
    spec = meta.get("data") or {}
    data = dataset_from_spec(spec, name=args.dataset)
    split = data.splits(n_splits=spec.get("folds", 10), seed=spec.get("seed", 0))[meta.get("fold", 0)]
    model = load_model(payload, map_location=device)
    batch = split.test_input(device=device)[: args.rows]
    chains, stats = collect_chains(model, batch, args.chains, args.draws, args.warmup, seed=args.seed)
    tree = diagnostics.to_arviz(chains, stats)
    frame = diagnostics.summary_table(tree)          # one row per (datapoint, latent_dim)
    sampler = diagnostics.sampler_table(tree)        # one row per (chain, datapoint)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "summary.csv")
    sampler.to_csv(out / "sampler.csv")
    overall = {"accept_prob": float(stats["accept_prob"].mean()), "accept_rate": float(stats["accepted"].mean()),
               "divergences": int(stats["diverging"].sum()), "chains": args.chains, "draws": args.draws,
               "rows": int(batch.size), "model": payload["model_name"]}
    (out / "summary.md").write_text(f"# Diagnostics of {payload['model_name']} on {data.name}\n\n"
                                    f"{json.dumps(overall)}\n\n```\n{frame.to_string()}\n```\n\n"
                                    f"Per chain:\n\n```\n{sampler.to_string()}\n```\n")
    diagnostics.plot_trace(tree, out / "trace.png")
    diagnostics.plot_rank(tree, out / "rank.png")
    diagnostics.plot_energy(tree, out / "energy.png")
    print(frame.to_string(max_rows=40))
    print(f"\nmean acceptance probability (accept_prob) {overall['accept_prob']:.3f}, accepted proposals "
          f"(accept_rate) {overall['accept_rate']:.3f}, divergences {overall['divergences']}; written to {out}/ "
          "(summary.csv, sampler.csv, summary.md, trace.png, rank.png, energy.png)")
    return 0

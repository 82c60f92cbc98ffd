"""``ppl-vae zoo NAME``: train a lecture model (CVAE, M2, PoE, VampPrior, VaDE, sequential VAE) or run a VAE
utility experiment (KL annealing, OOD detection, interpolation) and report its measured property.

    ppl-vae zoo list                               the experiments, their papers and what each measures
    ppl-vae zoo cvae --steps 3000 --out runs/cvae  train, measure, write results.json, figures and checkpoints
    ppl-vae zoo vade --smoke                       a fast run (seconds) to check the set-up

The checkpoints written to ``--out`` load with ``ppl_vae.infer.load_model``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "train a lecture model (cvae, m2, poe-vae, vampprior, vade, seq-vae) or run kl-annealing / ood / interpolation"

__all__ = ["HELP", "add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``ppl-vae zoo``."""
    p.add_argument("name", help="an experiment of `ppl-vae zoo list`, or `list`")
    p.add_argument("--steps", type=int, default=None, help="SVI steps per model (default: the experiment's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--smoke", action="store_true", help="tiny data and few steps: checks the set-up in seconds")
    p.add_argument("--out", default=None, help="folder for results.json, figures and checkpoints")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    """Run ``ppl-vae zoo``; prints the result as JSON; returns the exit status."""
    from ppl_vae.errors import PplVaeError
    from ppl_vae.experiments import lectures
    from ppl_vae.pipeline import resolve_device

    if args.name == "list":
        for name, e in lectures.ZOO.items():
            print(f"{name:14s} {e.paper:42s} {e.measures}")
        return 0
    if args.steps is not None and args.steps < 1:
        raise PplVaeError(f"--steps must be >= 1, got {args.steps}")
    options = {"seed": args.seed, "device": str(resolve_device(args.device)), "smoke": args.smoke,
               "progress": not args.no_progress}
    if args.steps is not None:
        options["steps"] = args.steps
    result = lectures.run(args.name, args.out, **options)      # an unknown name: UnknownNameError, exit 2
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(text + "\n")
    return 0

"""``ppl-vae predict CHECKPOINT --csv IN --out OUT.csv``: predict the target of every row of a CSV.

Each row's target is predicted from its features as given (missing features are marginalised, the target column
is ignored if present) with K posterior-predictive draws (:func:`ppl_vae.infer.frames.predict`). The output is the
input table followed by ``<target>_mean``, ``<target>_std`` and, with ``--intervals LEVEL`` (default 0.9),
``<target>_lower`` / ``<target>_upper`` in the target's original units (regression), or ``<target>_prob_<label>``
per class and ``<target>_predicted`` (classification).
"""
from __future__ import annotations

import argparse

from ppl_vae.cli.impute import add_io_arguments, read_input, write_csv

HELP = "predict the target of every row of a CSV (mean, std, interval or class probabilities)"

__all__ = ["HELP", "add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``ppl-vae predict`` (``--intervals`` defaults to 0.9 here)."""
    add_io_arguments(p)
    p.set_defaults(intervals=0.9)


def run(args) -> int:
    """Run ``ppl-vae predict``; returns the exit status."""
    import pandas as pd

    from ppl_vae.errors import PplVaeError
    from ppl_vae.infer.frames import predict

    trained, frame = read_input(args)
    try:
        pred = predict(trained, frame, args.num_samples, interval=args.intervals, seed=args.seed)
    except ValueError as exc:
        raise PplVaeError(str(exc)) from None
    out = pd.concat([frame, pred], axis=1)
    path = write_csv(out, args.out)
    t = trained.schema.target
    kind = "class probabilities" if t.is_discrete else f"mean, std, {args.intervals:g} interval"
    print(f"predicted {t.name!r} ({kind}) for {len(frame)} row(s) with K={args.num_samples} draws: {path}")
    return 0

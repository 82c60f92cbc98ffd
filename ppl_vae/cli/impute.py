"""``ppl-vae impute CHECKPOINT --csv IN --out OUT.csv``: fill the missing cells of a CSV with a trained model.

The CSV is read like ``run --csv`` (delimiter sniffed unless ``--sep``; empty cells and ``--na-values`` tokens are
missing), mapped with the checkpoint's normaliser, and every missing cell of the model's columns is filled with the
posterior-predictive mean (``--point median``: median) of K draws, or the most frequent sampled level for category
columns, in the CSV's own units and labels (:func:`ppl_vae.infer.frames.impute`). Observed cells and other columns
are written back unchanged. ``--intervals 0.9`` adds ``<col>_lower`` / ``<col>_upper`` (central 90% of the draws)
after each numeric column and ``<col>_prob`` after each category column; ``--draws FILE`` also writes the K
multiple imputations (``.nc``: an xarray Dataset with a ``draw`` dimension; else a long CSV with a ``draw``
column).
"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "fill the missing cells of a CSV with a trained model (original units, intervals, multiple imputations)"

__all__ = ["HELP", "add_arguments", "run", "add_io_arguments", "read_input", "write_csv"]


def add_io_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``impute`` and ``predict``."""
    p.add_argument("checkpoint", help="checkpoint.pt written by `ppl-vae run` or `ppl-vae fit`")
    p.add_argument("--csv", required=True, help="input table (same columns as the training data; empty = missing)")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--num-samples", type=int, default=100, help="posterior-predictive draws K (default 100)")
    p.add_argument("--intervals", type=float, default=None, metavar="LEVEL",
                   help="add central interval columns at this level, e.g. 0.9")
    p.add_argument("--sep", default=None, help="field delimiter (default: sniffed among , ; tab |)")
    p.add_argument("--na-values", default=None, metavar="TOKENS",
                   help="comma-separated extra tokens meaning missing, e.g. 'NA,missing,?'")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``ppl-vae impute``."""
    add_io_arguments(p)
    p.add_argument("--point", choices=("auto", "mean", "median"), default="auto",
                   help="summary of real/count columns: auto = median of log-Gaussian columns, mean of the others "
                        "(category columns get the most frequent level)")
    p.add_argument("--draws", default=None, metavar="FILE",
                   help="also write the K multiple imputations: FILE.nc (xarray, dims draw x row) or a long CSV")


def read_input(args):
    """``(trained model, input DataFrame)`` of the shared arguments; raises PplVaeError subclasses on bad input
    (``--num-samples`` < 1, ``--intervals`` outside (0, 1), an unreadable checkpoint or CSV)."""
    from ppl_vae.data.dataset import read_table_csv
    from ppl_vae.errors import PplVaeError

    if args.num_samples < 1:
        raise PplVaeError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.intervals is not None and not 0 < args.intervals < 1:
        raise PplVaeError(f"--intervals must be in (0, 1), e.g. 0.9, got {args.intervals}")

    from ppl_vae.infer.frames import load_trained
    from ppl_vae.pipeline import resolve_device

    device = resolve_device(args.device)
    trained = load_trained(args.checkpoint, map_location=device)
    frame = read_table_csv(args.csv, sep=args.sep, na_values=args.na_values)
    return trained, frame


def write_csv(frame, path) -> Path:
    """Write ``frame`` to ``path`` atomically (no index), creating the parent directory."""
    from ppl_vae.pipeline import _atomic_write

    path = Path(path)
    _atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return path


def run(args) -> int:
    """Run ``ppl-vae impute``; returns the exit status."""
    from ppl_vae.infer.frames import impute

    trained, frame = read_input(args)
    cols = [c for c in trained.schema.feature_names + ([trained.schema.target.name] if trained.schema.target
                                                          else []) if c in frame.columns]
    n_missing = int(frame[cols].isna().to_numpy().sum())
    out = impute(trained, frame, args.num_samples, point=args.point, interval=args.intervals, seed=args.seed)
    path = write_csv(out, args.out)
    print(f"imputed {n_missing} missing cell(s) in {len(frame)} row(s) x {len(cols)} model column(s) with "
          f"K={args.num_samples} draws ({args.point}; mode for categories): {path}")
    if args.draws:
        draws = impute(trained, frame, args.num_samples, draws="xarray" if args.draws.endswith(".nc") else "long",
                       seed=args.seed)
        from ppl_vae.pipeline import _atomic_write

        target = Path(args.draws)
        if args.draws.endswith(".nc"):
            for name in list(draws.data_vars):
                if draws[name].dtype == object:
                    draws[name] = draws[name].astype(str)
            _atomic_write(target, lambda tmp: draws.to_netcdf(tmp, engine="scipy"))
        else:
            _atomic_write(target, lambda tmp: draws.reset_index().to_csv(tmp, index=False))
        print(f"{args.num_samples} multiple imputations: {target}")
    return 0

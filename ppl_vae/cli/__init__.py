"""``ppl-vae`` command line.

    ppl-vae datasets                                   list data sets with shapes and column types
    ppl-vae run MODEL --dataset NAME [--splits N] [--steps N] [--device cpu|cuda] [--out DIR] [--seed S]
    ppl-vae fit MODEL --dataset NAME [--fold K] --out DIR     train one split, write a resumable checkpoint
    ppl-vae evaluate CHECKPOINT [--num-samples K]      metrics of a checkpoint on its own test split
    ppl-vae zoo NAME [--steps N] [--smoke] [--out DIR]  a lecture model (cvae, m2, poe-vae, vampprior, vade, seq-vae)
                                                       or kl-annealing / ood / interpolation; `ppl-vae zoo list`

Exit status: 0 on success; 2 on bad input (unknown data set/model, malformed CSV, a crafted or foreign checkpoint,
a checkpoint trained with other settings, a diverging loss) with a one-line message naming the fault; 130 / 143 when
SIGINT (Ctrl-C) / SIGTERM stopped training, after the current step was finished and a checkpoint written (running
the same command again resumes). Nothing already written is removed, except by ``--overwrite``.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="named data set (see `ppl-vae datasets`)")
    g.add_argument("--csv", help="a CSV file of your own (empty/NaN cells are missing values)")
    g.add_argument("--target", help="target column of --csv (optional)")
    g.add_argument("--target-likelihood", default=None, choices=("gaussian", "loggaussian", "poisson"),
                   help="re-declare a real-valued target (e.g. loggaussian: log1p then standardised, as the "
                        "reference code of Peis et al. 2022 does for the VAEM family)")
    g.add_argument("--sep", default=None, help="field delimiter of --csv (default: sniffed among , ; tab |)")
    g.add_argument("--na-values", default=None, metavar="TOKENS",
                   help="comma-separated extra tokens meaning missing in --csv, e.g. 'NA,missing,?'")
    g.add_argument("--schema", default=None, metavar="FILE",
                   help="JSON (or YAML with PyYAML) schema for --csv: a full schema, or overrides {\"columns\": "
                        "{name: likelihood}, \"target\": name, \"drop\": [names]}")
    g.add_argument("--drop", default=None, metavar="COLS", help="comma-separated columns of --csv to ignore")
    g.add_argument("--folds", type=int, default=10, help="K of the seeded K-fold partition (default 10)")
    g.add_argument("--seed", type=int, default=0, help="seed of splits, masks, training, evaluation (default 0)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=3000, help="SVI steps per split, all stages (default 3000)")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=3e-3, help="base Adam learning rate (default 3e-3)")
    g.add_argument("--latent-dim", type=int, default=None, help="override the model's latent size")
    g.add_argument("--beta", type=float, default=None, help="KL weight of the table models (beta-VAE; default 1)")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoint writes (default 500)")
    g.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="data-parallel training processes (gloo on CPU, NCCL with --device cuda; --batch-size is the "
                        "global batch; the same as `torchrun --nproc-per-node N -m ppl_vae.cli ...`; default 1)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete this output's checkpoints and results first and retrain (default: resume, refusing "
                        "checkpoints trained with other settings)")


def build_parser() -> argparse.ArgumentParser:
    """The ``ppl-vae`` argument parser (built-in subcommands plus the extension modules' ones)."""
    from ppl_vae.models import TABLE_MODELS

    parser = argparse.ArgumentParser(prog="ppl-vae", description="VAEs as Pyro programs: train, impute, predict, "
                                     "diagnose.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("datasets", help="list the named data sets with shapes and column types")

    run = sub.add_parser("run", help="train + evaluate a model on K-fold splits (Peis et al. 2022 protocol)")
    run.add_argument("model", help=f"a table model: {', '.join(TABLE_MODELS)} (image models: `ppl-vae "
                                   "ugvae-experiment`)")
    _add_data_args(run)
    run.add_argument("--splits", type=int, default=None, help="how many of the folds to run (default: all)")
    _add_train_args(run)
    run.add_argument("--num-samples", type=int, default=1000, help="posterior samples K for the metrics")
    run.add_argument("--out", default=None, help="output directory (default runs/<model>-<dataset>)")

    fit = sub.add_parser("fit", help="train a model on one split and write a resumable checkpoint")
    fit.add_argument("model", help=f"a table model: {', '.join(TABLE_MODELS)}")
    _add_data_args(fit)
    fit.add_argument("--fold", type=int, default=0)
    _add_train_args(fit)
    fit.add_argument("--out", required=True, help="output directory (checkpoint.pt is written there)")

    ev = sub.add_parser("evaluate", help="metrics of a checkpoint on its own test split")
    ev.add_argument("checkpoint")
    ev.add_argument("--num-samples", type=int, default=1000)
    ev.add_argument("--device", default="cpu")

    for name, module in _EXTENSIONS.items():
        ext = _load_extension(module)
        if ext is not None:
            p = sub.add_parser(name, help=getattr(ext, "HELP", None) or (ext.__doc__ or "").strip().split("\n")[0])
            ext.add_arguments(p)
    for p in sub.choices.values():  # every command: --threads (ppl_vae.threads policy)
        _add_threads_arg(p)
    return parser


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    if any("--threads" in a.option_strings for a in p._actions):
        return
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1, or $PPL_VAE_THREADS: fastest for these small tensors)")


#: subcommands contributed by other modules: name -> module exposing add_arguments(parser) and run(args)
_EXTENSIONS = {"diagnose": "ppl_vae.cli.diagnose", "ugvae-experiment": "ppl_vae.experiments.ugvae",
               "impute": "ppl_vae.cli.impute", "predict": "ppl_vae.cli.predict",
               "acquire": "ppl_vae.cli.acquire", "zoo": "ppl_vae.cli.zoo"}


def _load_extension(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None
        raise


def _cmd_datasets(args) -> int:
    from ppl_vae.data import list_datasets, load_dataset

    print(f"{'name':<18}{'rows':>7}{'cols':>6}  {'target':<22}column likelihoods")
    for name in list_datasets():
        d = load_dataset(name).describe()
        counts = ", ".join(f"{k} {v}" for k, v in d.get("likelihoods", {}).items())
        target = d.get("target_likelihood") or "-"
        print(f"{name:<18}{d['rows']:>7}{d['num_features']:>6}  {target:<22}{counts}")
    return 0


def _csv_options(args) -> dict:
    """``--sep``, ``--na-values``, ``--schema`` (read now: the checkpoint keeps its content), ``--drop``."""
    from ppl_vae.data.dataset import load_schema_file
    from ppl_vae.errors import PplVaeError

    given = [f for f in ("sep", "na_values", "schema", "drop") if getattr(args, f, None) is not None]
    if given and not args.csv:
        raise PplVaeError(f"--{given[0].replace('_', '-')} applies to --csv only")
    opts = {}
    if args.sep is not None:
        opts["sep"] = "\t" if args.sep in ("\\t", "tab") else args.sep
    if args.na_values is not None:
        opts["na_values"] = [t for t in (v.strip() for v in args.na_values.split(",")) if t]
    if args.schema is not None:
        opts["schema"] = load_schema_file(args.schema)
    if args.drop is not None:
        opts["drop"] = [t for t in (v.strip() for v in args.drop.split(",")) if t]
    return opts


def _dataset_from_args(args):
    """The data set of ``run``/``fit``; prints the schema-inference warnings and the schema it trains on."""
    import warnings

    from ppl_vae.data.schema import SchemaWarning, format_schema
    from ppl_vae.pipeline import resolve_dataset

    opts = _csv_options(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SchemaWarning)
        ds = resolve_dataset(args.dataset, csv=args.csv, target=args.target, csv_options=opts or None)
    if args.target_likelihood is not None:
        ds = ds.with_target_likelihood(args.target_likelihood)
    for w in caught:
        if issubclass(w.category, SchemaWarning):
            print(f"ppl-vae: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    task = ds.task or "no target"
    print(f"{ds.name}: {len(ds)} rows, {ds.num_features} feature column(s), {task}; schema:")
    print(format_schema(ds.schema))
    spec = {"name": ds.name, "csv": str(Path(args.csv).resolve()) if args.csv else None, "target": args.target}
    if opts:
        spec["csv_options"] = opts
    if args.target_likelihood is not None:
        spec["target_likelihood"] = args.target_likelihood
    return ds, spec


def _check_model_data(model: str, ds) -> None:
    """Refuse a table model on a large image data set (every pixel a column: minutes per step on a CPU)."""
    from ppl_vae.errors import PplVaeError

    if ds.image_shape is not None and ds.num_features > 256:
        h, w = ds.image_shape
        raise PplVaeError(f"{ds.name} is an image data set ({h}x{w} = {ds.num_features} pixel columns): the table "
                          f"model {model!r} would treat every pixel as a column; train image models with `ppl-vae "
                          "ugvae-experiment`, or use --dataset digits (8x8) for a table model on images")


def _model_kwargs(args) -> dict:
    out = {} if args.latent_dim is None else {"latent_dim": args.latent_dim}
    if getattr(args, "beta", None) is not None:
        out["beta"] = args.beta
    return out


def _cmd_run(args) -> int:
    from ppl_vae.infer.evaluation import format_table
    from ppl_vae.pipeline import run_experiment

    from ppl_vae.pipeline import _check_table_model

    _check_table_model(args.model)
    ds, spec = _dataset_from_args(args)
    _check_model_data(args.model, ds)
    out = Path(args.out or f"runs/{args.model}-{ds.name}")
    res = run_experiment(args.model, ds, splits=args.splits, folds=args.folds, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, num_samples=args.num_samples, device=args.device,
                         seed=args.seed, out=out, progress=not args.no_progress, model_kwargs=_model_kwargs(args),
                         data_spec=spec, checkpoint_every=args.checkpoint_every, overwrite=args.overwrite,
                         num_processes=args.num_processes)
    print(f"\n{args.model} on {ds.name}: {len(res.split)} split(s), {args.steps} steps, K={args.num_samples}")
    print("NLLs in the normalised domain (lower is better); RMSE in original target units\n")
    print(format_table(res))
    print(f"\nresults: {out / 'results.nc'}  checkpoints: {out}/fold*/checkpoint.pt")
    return 0


def _cmd_fit(args) -> int:
    from ppl_vae.pipeline import fit_split

    from ppl_vae.pipeline import _check_table_model

    _check_table_model(args.model)
    ds, spec = _dataset_from_args(args)
    _check_model_data(args.model, ds)
    splits = ds.splits(n_splits=args.folds, seed=args.seed)
    if not 0 <= args.fold < len(splits):
        from ppl_vae.errors import PplVaeError

        raise PplVaeError(f"--fold must be in 0..{len(splits) - 1}, got {args.fold}")
    spec.update({"folds": args.folds, "seed": args.seed})
    out = Path(args.out)
    ckpt = out / "checkpoint.pt"
    _, history = fit_split(args.model, ds, splits[args.fold], steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           device=args.device, seed=args.seed + args.fold, checkpoint=ckpt,
                           progress=not args.no_progress, model_kwargs=_model_kwargs(args), data_spec=spec,
                           checkpoint_every=args.checkpoint_every, overwrite=args.overwrite,
                           num_processes=args.num_processes)
    last = history[-1]["loss"] if history else float("nan")
    print(f"trained {args.model} on {ds.name} fold {args.fold}: final loss {last:.4f}; checkpoint {ckpt}")
    return 0


def _cmd_evaluate(args) -> int:
    from ppl_vae.pipeline import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, num_samples=args.num_samples, device=args.device)
    for key, value in metrics.items():
        print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0


_COMMANDS = {"datasets": _cmd_datasets, "run": _cmd_run, "fit": _cmd_fit, "evaluate": _cmd_evaluate}


def _raise_interrupted(signum, frame):  # noqa: ARG001 - signal handler signature
    from ppl_vae.errors import TrainingInterrupted

    raise TrainingInterrupted(signum)


def _threads_of(args):
    from ppl_vae.errors import PplVaeError

    n = getattr(args, "threads", None)
    if n is not None and n < 1:
        raise PplVaeError(f"--threads must be >= 1, got {n}")
    return n


def _launch_data_parallel(args, argv: Optional[Sequence[str]]) -> Optional[int]:
    """``--num-processes N > 1`` outside a launcher: start N ranks of the same command (torchrun's environment,
    :func:`ppl_vae.infer.distributed.spawn_cli`) and return the exit status; ``None`` when there is nothing to
    launch."""
    import os

    n = getattr(args, "num_processes", 1) or 1
    if n <= 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    from ppl_vae.infer.distributed import spawn_cli

    rest, skip = [], False
    for a in (sys.argv[1:] if argv is None else list(argv)):
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            rest.append(a)
    return spawn_cli(rest, n)


def _join_data_parallel(args) -> None:
    """Under ``torchrun`` / ``--num-processes`` (``WORLD_SIZE > 1``): join the process group (gloo, or NCCL for
    CUDA with this rank's GPU), and silence stdout on ranks other than 0 (rank 0 prints the results)."""
    import os

    from ppl_vae.errors import PplVaeError

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or args.command not in ("run", "fit"):
        return
    if args.num_processes not in (1, size):
        raise PplVaeError(f"--num-processes {args.num_processes} under a launcher with WORLD_SIZE={size}; drop "
                          "--num-processes when using torchrun")
    from ppl_vae.infer.distributed import init_from_env

    args.device = str(init_from_env(args.device))
    args.num_processes = size
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this rank


def _rank() -> int:
    from ppl_vae.infer.distributed import rank

    return rank()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``ppl-vae``; returns the exit status: 0, 2 on bad input (one line on stderr, no traceback),
    130 / 143 after SIGINT / SIGTERM (training checkpoints first; the message says how to resume)."""
    from ppl_vae.errors import PplVaeError, TrainingInterrupted
    from ppl_vae.threads import small_work_threads

    parser = build_parser()
    args = parser.parse_args(argv)
    launched = _launch_data_parallel(args, argv)
    if launched is not None:
        return launched
    installed, previous = False, None
    if threading.current_thread() is threading.main_thread():  # SIGTERM outside training: a clean exit 143
        previous, installed = signal.signal(signal.SIGTERM, _raise_interrupted), True
    try:
        _join_data_parallel(args)
        with small_work_threads(_threads_of(args)):
            if args.command in _COMMANDS:
                return _COMMANDS[args.command](args)
            result = _load_extension(_EXTENSIONS[args.command]).run(args)
        report = Path(getattr(args, "out", None) or ".") / "results.md"
        if not isinstance(result, int) and getattr(args, "out", None) and report.exists():
            print(report.read_text())
            print(f"written to {report.parent}/")
        return result if isinstance(result, int) else 0
    except PplVaeError as exc:
        if _rank() == 0:  # data-parallel replicas raise the same error: rank 0 says it once
            print(f"ppl-vae: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        resume = ("run the same command again to resume" if exc.checkpoint else
                  "run the same command again to resume from the last checkpoint, if any")
        if _rank() == 0:
            print(f"ppl-vae: {exc}; {resume}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ppl-vae: interrupted (SIGINT); run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 128 + int(signal.SIGINT)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        from ppl_vae.infer.distributed import shutdown

        shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

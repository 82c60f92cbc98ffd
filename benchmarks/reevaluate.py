"""Re-evaluate saved runs (``DIR/fold*/checkpoint.pt``) with the current inference code and print UCI-table rows.

Evaluation is deterministic given the checkpoint (seeded), so this reproduces a run's metrics, or measures the
effect of an inference-only change (e.g. ``test_sweeps`` of the HMC models) without retraining.

    python benchmarks/reevaluate.py runs/hmc-vae-boston runs/hmc-vaem-boston [--num-samples 1000]
    python benchmarks/reevaluate.py uci/paper/vaem-yacht --set code_likelihood=quadrature --write

``--set FIELD=VALUE`` changes an inference option of the loaded model's typed config (declared with
``ppl_vae.models.config.inference_option``; an unknown field, or a training option such as ``latent_dim``, is an
error); ``--write`` rewrites the run's ``results.nc`` / ``results.md`` with the new metrics (atomically).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


import numpy as np
import xarray as xr

from ppl_vae.infer.checkpoint import load_checkpoint, load_model
from ppl_vae.infer.evaluation import evaluate_split, format_table, results_dataset
from ppl_vae.pipeline import dataset_from_spec


def _overridden(payload: dict, assignments) -> dict:
    """The checkpoint payload with ``FIELD=VALUE`` applied to its stored config, so that the model is *built* with
    the new value (an option a model reads once at construction, such as ``test_sweeps``, takes effect too).

    Raises: SystemExit naming the field when the model's typed config has no such field, or when it is a training
    option (only :func:`~ppl_vae.models.config.inference_option` fields can change after training)."""
    from ppl_vae.models import model_class
    from ppl_vae.models.config import inference_option_names, option_names, parse_assignment
    cls = model_class(payload["model_name"])
    config = dict(payload["config"])
    for item in assignments:
        try:
            key, value = parse_assignment(item)
        except ValueError as exc:
            raise SystemExit(f"--set: {exc}") from None
        if key not in option_names(cls.Config):
            raise SystemExit(f"--set {item}: {cls.Config.__name__} has no option {key!r}")
        if key not in inference_option_names(cls.Config):
            raise SystemExit(f"--set {item}: {key!r} is a training option of {cls.Config.__name__}, it cannot change "
                             f"after training; inference options: "
                             f"{', '.join(sorted(inference_option_names(cls.Config))) or 'none'}")
        config[key] = value
    return {**payload, "config": config}


def evaluate(path: Path, num_samples: int, assignments) -> tuple[dict, dict]:
    """Metrics of one checkpoint on its own test split, after the ``--set`` overrides; also its metadata."""
    payload = load_checkpoint(path)
    meta = payload.get("metadata") or {}
    spec = meta.get("data") or {}
    dataset = dataset_from_spec(spec)
    split = dataset.splits(n_splits=spec.get("folds", 10), seed=spec.get("seed", 0))[meta["fold"]]
    model = load_model(_overridden(payload, assignments))
    return evaluate_split(model, split, num_samples=num_samples, seed=spec.get("seed", 0)), payload


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories holding fold*/checkpoint.pt")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides (inference options)")
    p.add_argument("--write", action="store_true", help="rewrite DIR/results.nc and results.md")
    args = p.parse_args(argv)
    for run in map(Path, args.runs):
        ckpts = sorted(run.glob("fold*/checkpoint.pt"))
        if not ckpts:
            print(f"| {run.name} | no checkpoints |")
            continue
        evaluated = [evaluate(c, args.num_samples, args.set) for c in ckpts]
        old = run / "results.nc"
        attrs = dict(xr.load_dataset(old, engine="scipy").attrs) if old.exists() else {}
        name, data = attrs.pop("model", run.name), attrs.pop("dataset", "")
        attrs.update(num_samples=args.num_samples, reevaluated_with="; ".join(args.set) or "current code")
        res = results_dataset([m for m, _ in evaluated], name, data, attrs=attrs)
        if args.write:
            tmp = run / "results.nc.tmp"
            res.to_netcdf(tmp, engine="scipy")
            os.replace(tmp, old)
            (run / "results.md").write_text(f"# {name} on {data}\n\n{format_table(res)}\n")
        cells = [f"{float(res[k + '_mean']):.2f} ± {float(res[k + '_std']):.2f}"
                 for k in ("imputation_nll", "target_nll", "rmse", "accuracy") if np.isfinite(res[k].values).any()]
        print(f"| {run.name} | " + " | ".join(cells) + f" | {len(ckpts)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

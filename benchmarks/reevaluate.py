"""Re-evaluate saved runs (``DIR/fold*/checkpoint.pt``) with the current inference code and print UCI-table rows.

Evaluation is deterministic given the checkpoint (seeded), so this reproduces a run's metrics, or measures the
effect of an inference-only change (e.g. ``test_sweeps`` of the HMC models) without retraining.

    python benchmarks/reevaluate.py runs/hmc-vae-boston runs/hmc-vaem-boston [--num-samples 1000]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ppl_vae.infer.evaluation import results_dataset
from ppl_vae.pipeline import evaluate_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories holding fold*/checkpoint.pt")
    p.add_argument("--num-samples", type=int, default=1000)
    args = p.parse_args(argv)
    for run in map(Path, args.runs):
        ckpts = sorted(run.glob("fold*/checkpoint.pt"))
        if not ckpts:
            print(f"| {run.name} | no checkpoints |")
            continue
        res = results_dataset([evaluate_checkpoint(c, num_samples=args.num_samples) for c in ckpts], run.name, "")
        cells = [f"{float(res[k + '_mean']):.2f} ± {float(res[k + '_std']):.2f}"
                 for k in ("imputation_nll", "target_nll", "rmse", "accuracy") if np.isfinite(res[k].values).any()]
        print(f"| {run.name} | " + " | ".join(cells) + f" | {len(ckpts)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reproduce the UG-VAE experiments of Peis et al. (2023) on MNIST batches (Pattern Recognition 134, 109130).

Writes ``results.md`` (markdown tables: training loss, SVM accuracy of the batch category from the global latent,
domain alignment, Fréchet distances of UG-VAE / ML-VAE / β-VAE / GMVAE samples), ``results.json`` and the PNG
figures to ``benchmarks/results/ugvae/`` (or ``--out``).

    python benchmarks/ugvae_experiments.py                 # full length (5000 SVI steps per model; ~8 min CPU)
    python benchmarks/ugvae_experiments.py --smoke         # seconds, used by the tests / CI
    python benchmarks/ugvae_experiments.py --experiment global --steps 2000 --device cuda

Every option of ``ppl-vae ugvae-experiment`` is accepted (see ``--help``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ugvae"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse the options, run :func:`ppl_vae.experiments.ugvae.run`, print the markdown report; returns its dict."""
    from ppl_vae.experiments import ugvae

    parser = ugvae.add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.set_defaults(out=str(DEFAULT_OUT), threads=1)
    args = parser.parse_args(argv)
    if args.smoke and args.out == str(DEFAULT_OUT):
        args.out = str(DEFAULT_OUT.parent / "ugvae-smoke")
    t0 = time.perf_counter()
    results = ugvae.run(args)
    print((Path(args.out) / "results.md").read_text())
    print(f"total {time.perf_counter() - t0:.1f} s; outputs in {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()

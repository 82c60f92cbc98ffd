"""``ppl-vae ugvae-experiment``: options (:func:`add_arguments`), the driver (:func:`run`) that trains the models
once and runs the selected experiments, and the report (``results.md``, ``results.json``)."""
from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ppl_vae.experiments.ugvae.alignment import domain_alignment
from ppl_vae.experiments.ugvae.classification import global_representation
from ppl_vae.experiments.ugvae.common import markdown_table, mnist_split, train_svi
from ppl_vae.experiments.ugvae.frechet import sample_quality, train_digit_classifier
from ppl_vae.experiments.ugvae.interpolation import interpolation_grids
from ppl_vae.models.base import LatentVariableModel
from ppl_vae.pipeline import resolve_device

__all__ = ["DESCRIPTION", "EXPERIMENTS", "add_arguments", "run", "main"]

#: One-line description of the subcommand.
DESCRIPTION = "UG-VAE experiments on MNIST batches (Peis, Olmos, Artés-Rodríguez 2023)"
#: Experiments selectable with ``--experiment`` (``all`` runs every one).
EXPERIMENTS = ("interpolation", "global", "domain", "fid")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``ppl-vae ugvae-experiment`` options to ``parser`` (returns it)."""
    parser.add_argument("--experiment", choices=[*EXPERIMENTS, "all"], default="all",
                        help="which experiment to run (default all)")
    parser.add_argument("--steps", type=int, default=None,
                        help="SVI steps per model (default 5000; 30 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=128, help="rows per batch (default 128, the paper's)")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3, the reference)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    parser.add_argument("--out", default="ugvae-results", help="output folder for tables and PNGs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=["mlp", "conv"], default="mlp", help="network architecture (default mlp)")
    parser.add_argument("--beta-kl", type=float, default=1.0, help="KL weight of the β-VAE baseline (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is fastest for these small nets)")
    parser.add_argument("--no-tsne", action="store_true", help="skip t-SNE embeddings (PCA only)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for tests (seconds)")
    return parser


@dataclass
class _Context:
    """State shared by the experiments of one run: options, data split, trained models, losses and timings."""

    args: argparse.Namespace
    out: Path
    device: torch.device
    steps: int
    smoke: bool
    data: tuple = ()
    models: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @property
    def progress(self) -> bool:
        return not getattr(self.args, "no_progress", False)

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """Record the wall time of the ``with`` block as ``timings[step]`` (seconds)."""
        t0 = time.perf_counter()
        yield
        self.timings[step] = time.perf_counter() - t0

    def train(self, name: str, factory: Callable[[], LatentVariableModel]) -> LatentVariableModel:
        """Train (once) a model on random batches of the training rows."""
        from ppl_vae.data.batches import StructuredBatchSampler

        if name not in self.models:
            seed = self.args.seed
            torch.manual_seed(seed)
            model = factory()
            train_x, train_y = self.data[0], self.data[1]
            sampler = StructuredBatchSampler(train_x, train_y, self.args.batch_size, "random", seed=seed)
            with self.timed(f"train {name}"):
                losses = train_svi(model, sampler, self.steps, self.args.lr, self.device, seed, self.progress, name)
            k = max(1, min(100, len(losses) // 10))
            self.losses[name] = {"first": float(np.mean(losses[:k])), "last": float(np.mean(losses[-k:])),
                                 "steps": len(losses)}
            self.models[name] = model
        return self.models[name]


def _write_outputs(out: Path, results: dict) -> None:
    """Write ``results.json`` and ``results.md`` (markdown tables) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    lines = ["# UG-VAE experiments (MNIST)", "", f"Settings: `{json.dumps(results['config'])}`", ""]
    if results.get("losses"):
        lines += ["## Training loss (negative ELBO per image, nats)", "",
                  markdown_table([{"model": k, **v} for k, v in results["losses"].items()], floatfmt=".2f")]
    if "global" in results:
        lines += ["## Global representation of structured batches (SVM on the posterior mean of beta)", "",
                  markdown_table(results["global"]["table"])]
    if "domain" in results:
        lines += ["## Domain alignment (batch source from beta)", "", markdown_table(results["domain"]["table"])]
    if "fid" in results:
        lines += ["## Sample quality: Fréchet distance on digit-CNN features (lower is better)", "",
                  f"Digit CNN held-out accuracy: {results['fid']['classifier_test_accuracy']:.4f}", "",
                  markdown_table(results["fid"]["table"], floatfmt=".2f")]
    figures = [p for key in ("interpolation", "global", "domain", "fid") if key in results
               for p in (results[key].get("figures", {}) or {}).values()]
    if figures:
        lines += ["## Figures", ""] + [f"- `{Path(p).name}`" for p in figures] + [""]
    if results.get("timings"):
        lines += ["## Timings (s)", "", markdown_table([{"step": k, "seconds": v}
                                                        for k, v in results["timings"].items()], floatfmt=".1f")]
    (out / "results.md").write_text("\n".join(lines))


def run(args: argparse.Namespace) -> dict:
    """Run the selected UG-VAE experiments (``ppl-vae ugvae-experiment``) and write ``results.md``,
    ``results.json`` and the PNG figures to ``args.out``.

    Sizes: with ``--smoke`` every model trains 30 steps on small batches, and few batches are encoded (seconds);
    otherwise ``--steps`` (default 5000) per model, 200 series + 400 random + 200 class batches, 2000 samples
    per model for the Fréchet distance.

    Returns:
        ``{"config", "losses", "timings", and per experiment run: "interpolation" {"figures"}, "global"
        {"table", "figures"}, "domain" {"table", "figures", ...}, "fid" {"table", "classifier_test_accuracy",
        "figures"}}``.

    Raises:
        ValueError: bad device, non-positive steps or batch size.
    """
    from ppl_vae.models.image.betavae import BetaVAE
    from ppl_vae.models.image.gmvae import GMVAE
    from ppl_vae.models.image.mlvae import MLVAE
    from ppl_vae.models.image.ugvae import UGVAE

    smoke = bool(getattr(args, "smoke", False))
    steps = args.steps if args.steps is not None else (30 if smoke else 5000)
    if steps < 1 or args.batch_size < 2:
        raise ValueError("--steps must be >= 1 and --batch-size >= 2")
    device = resolve_device(args.device)
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    experiments = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    arch = getattr(args, "arch", "mlp")
    tsne = not getattr(args, "no_tsne", False)
    bs = args.batch_size
    ctx = _Context(args, out, device, steps, smoke)
    ctx.data = mnist_split(n_test=2000, seed=args.seed)
    train_x, train_y, test_x, test_y = ctx.data
    results: dict[str, Any] = {"config": {"experiments": experiments, "steps": steps, "batch_size": bs,
                                          "lr": args.lr, "device": str(device), "seed": args.seed, "arch": arch,
                                          "smoke": smoke}}

    def ugvae() -> LatentVariableModel:
        return ctx.train("ug-vae", lambda: UGVAE(arch=arch))

    if "interpolation" in experiments:
        model = ugvae()
        with ctx.timed("interpolation"):
            results["interpolation"] = {"figures": interpolation_grids(model, test_x, test_y, out, batch_size=bs,
                                                                       seed=args.seed)}
    if "global" in experiments:
        model = ugvae()
        with ctx.timed("global (encode + SVM + plots)"):
            sizes = dict(n_series_per_kind=6, n_random=12, n_class_per_digit=4) if smoke else {}
            results["global"] = global_representation(model, test_x, test_y, out, batch_size=bs, seed=args.seed,
                                                      tsne=tsne and not smoke, **sizes)
    if "domain" in experiments:
        with ctx.timed("domain (train + encode)"):
            results["domain"] = domain_alignment(out, steps, bs, n_batches=10 if smoke else 100, device=device,
                                                 seed=args.seed, lr=args.lr, progress=ctx.progress,
                                                 tsne=tsne and not smoke, model_kwargs={"arch": arch})
    if "fid" in experiments:
        with ctx.timed("digit classifier"):
            n_clf = 1000 if smoke else train_x.shape[0]
            clf = train_digit_classifier(train_x[:n_clf], train_y[:n_clf], epochs=1 if smoke else 3,
                                         seed=args.seed, device=device, progress=ctx.progress)
            with torch.no_grad():
                acc = float((clf(test_x.to(device)).argmax(-1).cpu() == test_y).float().mean())
        models = {"ug-vae": ugvae(),
                  "ml-vae": ctx.train("ml-vae", lambda: MLVAE(arch=arch)),
                  "beta-vae": ctx.train("beta-vae", lambda: BetaVAE(arch=arch, beta_kl=args.beta_kl)),
                  "gmvae": ctx.train("gmvae", lambda: GMVAE(arch=arch))}
        n_samples = 256 if smoke else 2000
        real = test_x[:n_samples]
        with ctx.timed("fid (sample + features)"):
            table = sample_quality(models, clf, real, n_samples, bs, args.seed,
                                   reference_images=train_x[:n_samples], out_dir=out)
        results["fid"] = {"table": table, "classifier_test_accuracy": acc,
                          "figures": {name: str(out / f"samples_{name}.png") for name in models}}
    results["losses"] = ctx.losses
    results["timings"] = ctx.timings
    _write_outputs(out, results)
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point: ``python -m ppl_vae.experiments.ugvae [options]`` (same options as the CLI subcommand)."""
    parser = add_arguments(argparse.ArgumentParser(prog="ppl-vae ugvae-experiment", description=DESCRIPTION))
    return run(parser.parse_args(argv))

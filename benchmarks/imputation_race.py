"""The imputation race (issue 12): our models against the imputers practitioners reach for, on the same folds.

Protocol (the package's own, Peis et al. 2022 §4): ``dataset.splits(n_splits=10, seed)`` K-fold splits, the first
``--folds`` of them; every method is fitted on the training rows (natural missingness only) and imputes the test
rows with the split's seeded 50% MCAR mask hidden (``split.test_mask``), the target hidden. Scores on the hidden
cells, all in original units:

- ``rmse``: root mean squared error over the hidden *real/count* cells, each column divided by its training-row
  standard deviation (so columns weigh alike; "normalised RMSE" of the issue); ``acc``: accuracy on hidden
  *discrete* cells (bernoulli/categorical; peers that return a number are rounded to the nearest level);
- ``crps``: the continuous ranked probability score per hidden real cell from K draws (same column scaling),
  ``E|X - x| - E|X - X'|/2`` (lower is better), for methods that give draws: ours (``sample_predictive``) and
  ``IterativeImputer(sample_posterior=True)`` (K fits with different seeds);
- ``nll``: our imputation NLL (``evaluate_split``, normalised domain); the peers give no density;
- ``target_rmse``: RMSE of the target in original units with half the test features hidden: ours (posterior-
  predictive mean, ``ppl_vae.predict``) against ``HistGradientBoostingRegressor`` (NaN-native) and the training
  mean;
- ``seconds``: fit + impute time per fold.

Peers: column mean/mode (``SimpleImputer``), ``IterativeImputer`` with ``BayesianRidge`` (MICE), and with
``ExtraTreesRegressor`` (MissForest-style); ``miceforest`` / ``hyperimpute`` only if installed (``pip install
'.[benchmarks]'``; not run here when absent — the table says so).

    python benchmarks/imputation_race.py --datasets boston energy yacht concrete --folds 3 --steps 3000
    python benchmarks/imputation_race.py --smoke          # seconds, for the tests

Writes ``imputation_race.md``, ``imputation_race.nc`` and ``imputation_race.png`` to ``--out``
(default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("rmse", "acc", "crps", "nll", "target_rmse", "seconds")


def crps_from_draws(draws: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """CRPS per cell from ``draws`` ``(K, m)`` and ``truth`` ``(m,)``: ``E|X - y| - E|X - X'| / 2`` with the
    sorted-sample identity ``E|X - X'| = 2 / K^2 * sum_i (2i - K - 1) x_(i)``."""
    k = draws.shape[0]
    term1 = np.abs(draws - truth[None]).mean(0)
    xs = np.sort(draws, 0)
    w = (2 * np.arange(1, k + 1) - k - 1)[:, None]
    term2 = (w * xs).sum(0) / (k * k)
    return term1 - term2


def _split_frames(ds, split):
    """``(train features, train target, test features with the hidden cells NaN, test truth, hidden mask)``."""
    tr, te = split.train_rows, split.test_rows
    ftr = ds.features.iloc[tr].reset_index(drop=True)
    fte = ds.features.iloc[te].reset_index(drop=True)
    hidden = split.hidden_mask.numpy()
    masked = fte.mask(hidden)
    ytr = None if ds.target is None else ds.target.iloc[tr].reset_index(drop=True)
    yte = None if ds.target is None else ds.target.iloc[te].reset_index(drop=True)
    return ftr, ytr, masked, fte, hidden, yte


def _score(ds, truth, hidden, point, draws, scale):
    """rmse / acc / crps of a point imputation ``(N, D)`` (original units) and optional draws ``(K, N, D)``."""
    out = {}
    real = [j for j, c in enumerate(ds.schema.features) if not c.is_discrete]
    disc = [j for j, c in enumerate(ds.schema.features) if c.is_discrete]
    t = truth.to_numpy(dtype=np.float64)
    if real:
        err = ((point[:, real] - t[:, real]) / scale[real]) ** 2
        out["rmse"] = float(np.sqrt(err[hidden[:, real]].mean()))
        if draws is not None:
            cells = np.argwhere(hidden[:, real])
            d = draws[:, cells[:, 0], np.asarray(real)[cells[:, 1]]] / scale[np.asarray(real)[cells[:, 1]]]
            y = t[cells[:, 0], np.asarray(real)[cells[:, 1]]] / scale[np.asarray(real)[cells[:, 1]]]
            out["crps"] = float(crps_from_draws(d, y).mean())
    if disc:
        hits = []
        for j in disc:
            levels = np.asarray(ds.schema.features[j].categories, dtype=np.float64)
            h = hidden[:, j]
            nearest = levels[np.abs(point[h, j][:, None] - levels[None]).argmin(1)]
            hits.append(nearest == t[h, j])
        hits = np.concatenate(hits)
        out["acc"] = float(hits.mean()) if hits.size else float("nan")
    return out


def _ours(name, ds, split, args):
    from ppl_vae.infer.evaluation import evaluate_split
    from ppl_vae.infer.frames import TrainedModel, point_estimate, predict, sample_frame
    from ppl_vae.pipeline import fit_split

    ftr, ytr, masked, fte, hidden, yte = _split_frames(ds, split)
    t0 = time.perf_counter()
    model, _ = fit_split(name, ds, split, steps=args.steps, seed=args.seed + split.fold, progress=False)
    trained = TrainedModel(model, split.normaliser)
    fd = sample_frame(trained, masked, args.num_samples, seed=args.seed, use_target=False)
    draws = np.stack([np.asarray(fd.columns[c], dtype=np.float64) for c in ds.schema.feature_names], -1)
    point = draws.mean(0)
    for j, c in enumerate(ds.schema.features):
        if not c.is_discrete:  # the package's default point imputation (median of log-Gaussian columns)
            point[:, j] = point_estimate(draws[..., j], c.likelihood)
        else:   # most frequent sampled level
            v = draws[..., j]
            levels = np.asarray(c.categories, dtype=np.float64)
            counts = (v[..., None] == levels).sum(0)
            point[:, j] = levels[counts.argmax(-1)]
    out = {"seconds": time.perf_counter() - t0}
    if ds.target is not None and not ds.schema.target.is_discrete:
        pred = predict(trained, masked, args.num_samples, interval=None, seed=args.seed)
        known = yte.notna().to_numpy()
        out["target_rmse"] = float(np.sqrt(((pred.iloc[:, 0].to_numpy() - yte.to_numpy())[known] ** 2).mean()))
    out["nll"] = evaluate_split(model, split, num_samples=args.num_samples, seed=args.seed)["imputation_nll"]
    return point, draws, out


def _sklearn_imputer(kind, seed):
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.ensemble import ExtraTreesRegressor
    from sklearn.impute import IterativeImputer, SimpleImputer
    from sklearn.linear_model import BayesianRidge

    if kind == "mean":
        return SimpleImputer(strategy="mean")
    if kind == "mice-bayesridge":
        return IterativeImputer(BayesianRidge(), max_iter=10, random_state=seed)
    if kind == "mice-bayesridge-draw":
        return IterativeImputer(BayesianRidge(), max_iter=10, random_state=seed, sample_posterior=True)
    if kind == "missforest-extratrees":
        return IterativeImputer(ExtraTreesRegressor(n_estimators=50, n_jobs=1, random_state=seed), max_iter=5,
                                random_state=seed)
    raise KeyError(kind)


def _peer(kind, ds, split, args):
    ftr, ytr, masked, fte, hidden, yte = _split_frames(ds, split)
    xtr = ftr.to_numpy(dtype=np.float64)
    xte = masked.to_numpy(dtype=np.float64)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imp = _sklearn_imputer(kind, args.seed).fit(xtr)
        point = imp.transform(xte)
        draws = None
        if kind == "mice-bayesridge":
            draws = np.stack([_sklearn_imputer("mice-bayesridge-draw", args.seed + k).fit(xtr).transform(xte)
                              for k in range(args.peer_draws)])
    if kind == "mean":   # mode for discrete columns
        for j, c in enumerate(ds.schema.features):
            if c.is_discrete:
                point[np.isnan(xte[:, j]), j] = pd.Series(xtr[:, j]).mode().iloc[0]
    return point, draws, {"seconds": time.perf_counter() - t0}


def _hgb(ds, split, args):
    from sklearn.ensemble import HistGradientBoostingRegressor

    ftr, ytr, masked, fte, hidden, yte = _split_frames(ds, split)
    t0 = time.perf_counter()
    known = ytr.notna().to_numpy()
    m = HistGradientBoostingRegressor(random_state=args.seed).fit(ftr.to_numpy(dtype=np.float64)[known],
                                                                  ytr.to_numpy(dtype=np.float64)[known])
    pred = m.predict(masked.to_numpy(dtype=np.float64))
    k = yte.notna().to_numpy()
    mean_rmse = float(np.sqrt(((ytr.mean() - yte.to_numpy())[k] ** 2).mean()))
    return ({"target_rmse": float(np.sqrt(((pred - yte.to_numpy())[k] ** 2).mean())),
             "seconds": time.perf_counter() - t0}, mean_rmse)


def main(argv=None) -> int:
    """Run the race; writes the markdown, netCDF and PNG; returns 0."""
    import xarray as xr

    from ppl_vae.data import load_dataset
    from ppl_vae.threads import small_work_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["boston", "energy", "yacht", "concrete"])
    p.add_argument("--models", nargs="+", default=["vae"])
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--peer-draws", type=int, default=20, help="IterativeImputer(sample_posterior) fits for CRPS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    suffix = ""
    if args.smoke:
        args.datasets, args.folds, args.steps, args.num_samples, args.peer_draws = ["yacht"], 1, 20, 10, 2
        suffix = "_smoke"
    peers = ["mean", "mice-bayesridge", "missforest-extratrees"]
    missing_optional = []
    for opt in ("miceforest", "hyperimpute"):
        try:
            __import__(opt)
            missing_optional.append(f"{opt} installed but not wired in this version")
        except ImportError:
            missing_optional.append(f"{opt} not installed (pip install '.[benchmarks]')")
    methods = [f"ours:{m}" for m in args.models] + peers + ["hist-gradient-boosting"]
    arr = np.full((len(args.datasets), len(methods), args.folds, len(METRICS)), np.nan)
    with small_work_threads():
        for di, name in enumerate(args.datasets):
            ds = load_dataset(name)
            for split in ds.splits(n_splits=10, seed=args.seed)[:args.folds]:
                f = split.fold
                ftr = ds.features.iloc[split.train_rows]
                scale = ftr.std(ddof=0).to_numpy(dtype=np.float64).copy()
                scale[~(scale > 0)] = 1.0
                truth = ds.features.iloc[split.test_rows].reset_index(drop=True)
                hidden = split.hidden_mask.numpy()
                for mi, meth in enumerate(methods):
                    if meth == "hist-gradient-boosting":
                        if ds.target is None or ds.schema.target.is_discrete:
                            continue
                        res, mean_rmse = _hgb(ds, split, args)
                        arr[di, methods.index("mean"), f, METRICS.index("target_rmse")] = mean_rmse
                    else:
                        if meth.startswith("ours:"):
                            point, draws, res = _ours(meth[5:], ds, split, args)
                        else:
                            point, draws, res = _peer(meth, ds, split, args)
                        res.update(_score(ds, truth, hidden, point, draws, scale))
                    for k, v in res.items():
                        arr[di, mi, f, METRICS.index(k)] = v
                    print(f"{name} fold {f} {meth}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()),
                          flush=True)
    res = xr.Dataset({m: (("dataset", "method", "fold"), arr[..., i]) for i, m in enumerate(METRICS)},
                     coords={"dataset": args.datasets, "method": methods, "fold": np.arange(args.folds)})
    res.attrs.update({"protocol": "ppl_vae splits(n_splits=10, seed) first folds; split.test_mask (50% MCAR) "
                                  "hidden; target hidden; rmse/crps per column scaled by the training std",
                      "steps": args.steps, "num_samples": args.num_samples, "peer_draws": args.peer_draws,
                      "optional_peers": "; ".join(missing_optional)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res.to_netcdf(out / f"imputation_race{suffix}.nc", engine="scipy")
    lines = [f"# Imputation race ({args.folds} folds of 10, seed {args.seed}; ours: {args.steps} steps, "
             f"K = {args.num_samples})\n",
             "Hidden test cells of `split.test_mask` (50% MCAR); rmse and crps scaled per column by the training "
             "std (lower is better); acc on discrete columns; nll: ours only (normalised domain); target_rmse in "
             "original units with half the test features hidden (`mean` row: the training mean). mean ± std over "
             "folds.\n", f"Optional peers: {'; '.join(missing_optional)}.\n",
             "| dataset | method | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for di, name in enumerate(args.datasets):
        for mi, meth in enumerate(methods):
            cells = []
            for i, m in enumerate(METRICS):
                v = arr[di, mi, :, i]
                cells.append("–" if not np.isfinite(v).any() else f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}")
            lines.append(f"| {name} | {meth} | " + " | ".join(cells) + " |")
    (out / f"imputation_race{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
        for ax, metric in zip(axes, ("rmse", "target_rmse")):
            m = res[metric].mean("fold")
            x = np.arange(len(args.datasets))
            w = 0.8 / len(methods)
            for mi, meth in enumerate(methods):
                ax.bar(x + mi * w, np.asarray(m.sel({"method": meth}).values, dtype=float), width=w, label=meth)
            ax.set_xticks(x + 0.4 - w / 2, args.datasets)
            ax.set_title(metric + (" (scaled)" if metric == "rmse" else " (original units)"))
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"imputation_race{suffix}.png", dpi=120)
        plt.close(fig)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

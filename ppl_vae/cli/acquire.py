"""``ppl-vae acquire CHECKPOINT [CHECKPOINT ...]``: sequential active information acquisition (SAIA) curves.

For the test rows of each checkpoint's own split (rebuilt from the checkpoint's metadata, as ``ppl-vae evaluate``
does), start with every feature and the target missing, reveal per row the feature with the highest reward
(``--method mi``: histogram estimate of ``I(y; x_i | x_O)``, Peis et al. 2022; ``mi-knn``: Kraskov et al. 2004;
``eddi``: Ma et al. 2019; ``random``), re-infer after every step (HMC chains for HMC models) and record the target
error (RMSE in original units, or accuracy) and the target NLL (normalised domain). Several checkpoints (folds) are
pooled: the plot shows the mean ± std over folds of the error (over rows for a single checkpoint: the band is the
std of the per-row absolute error) and of the target NLL over rows.

Writes ``OUT/saia_<method>.nc`` (an ``xarray.Dataset`` with a ``fold`` dimension), ``OUT/saia_<method>.png`` and
``OUT/saia_<method>.md``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HELP = "which feature to measure next: SAIA error-vs-acquired-features curves of a checkpoint (netCDF + plot)"

__all__ = ["add_arguments", "run", "plot_curves", "HELP"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``ppl-vae acquire``."""
    from ppl_vae.acquisition import METHODS

    p.add_argument("checkpoint", nargs="+", help="checkpoint(s) written by `ppl-vae run|fit` (several = folds)")
    p.add_argument("--method", default="mi", choices=METHODS, help="reward (default mi: histogram MI)")
    p.add_argument("--rows", type=int, default=50, help="test rows per checkpoint (default 50; 0 = all)")
    p.add_argument("--num-samples", type=int, default=100, help="posterior-predictive draws K per step (default 100)")
    p.add_argument("--bins", type=int, default=6, help="histogram bins of the mi estimator (default 6)")
    p.add_argument("--k", type=int, default=3, help="neighbours of the mi-knn estimator (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--out", default=None, help="output directory (default: saia/ next to the first checkpoint)")


def _load(path: str, device):
    from ppl_vae.errors import PplVaeError
    from ppl_vae.infer.checkpoint import load_checkpoint, load_model
    from ppl_vae.pipeline import dataset_from_spec

    payload = load_checkpoint(path, map_location=device)
    meta = payload.get("metadata") or {}
    spec = meta.get("data") or {}
    data = dataset_from_spec(spec)
    split = data.splits(n_splits=spec.get("folds", 10), seed=spec.get("seed", 0))[meta.get("fold", 0)]
    model = load_model(payload, map_location=device)
    for attr in ("posterior_latents", "y_params", "x_likelihood"):
        if not hasattr(model, attr):
            raise PplVaeError(f"{path}: {payload.get('model_name')} is not a table model (no {attr}); SAIA needs one")
    if getattr(model, "predictor", None) is None:
        raise PplVaeError(f"{path}: the model has no target column; there is nothing to acquire information about")
    return model, split, data.name


def plot_curves(ds, path) -> None:
    """Error (RMSE or accuracy) and target NLL vs number of acquired features, mean ± std (over folds when the
    Dataset has several, else over rows); written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = ds.attrs.get("error_name", "rmse")
    steps = ds.num_acquired.values
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    err = ds[name].values                                            # (fold, num_acquired)
    if err.shape[0] > 1:
        mean, std, how = np.nanmean(err, 0), np.nanstd(err, 0), f"± std over {err.shape[0]} folds"
    else:
        per_row = ds["row_correct"].values[0] if name == "accuracy" else np.sqrt(ds["row_sq_error"].values[0])
        mean, std, how = err[0], np.nanstd(per_row, 0), "± std of per-row |error|"
    axes[0].plot(steps, mean, marker="o", ms=3)
    axes[0].fill_between(steps, mean - std, mean + std, alpha=0.25)
    axes[0].set(xlabel="acquired features", ylabel=f"{name} ({ds.attrs.get('error_units', '')})",
                title=f"{ds.attrs.get('method')}: {name} {how}")
    nll = ds["row_nll"].values.reshape(-1, len(steps))
    m, s = np.nanmean(nll, 0), np.nanstd(nll, 0)
    axes[1].plot(steps, m, marker="o", ms=3, color="C1")
    axes[1].fill_between(steps, m - s, m + s, alpha=0.25, color="C1")
    axes[1].set(xlabel="acquired features", ylabel="target NLL (normalised)", title="target NLL ± std over rows")
    fig.suptitle(f"SAIA on {ds.attrs.get('dataset', '')} with {ds.attrs.get('model', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    """Run SAIA for each checkpoint; write netCDF, PNG and markdown; print the curve.

    Raises: :class:`~ppl_vae.errors.CheckpointError` (unreadable or foreign checkpoint), :class:`~ppl_vae.errors.
    PplVaeError` (not a table model, no target, bad device or rows)."""
    import torch
    import xarray as xr

    from ppl_vae.acquisition import error_auc, saia_split
    from ppl_vae.errors import PplVaeError
    from ppl_vae.pipeline import resolve_device

    if args.threads:
        torch.set_num_threads(max(1, args.threads))
    if args.rows < 0 or args.num_samples < 2:
        raise PplVaeError("--rows must be >= 0 and --num-samples >= 2")
    device = resolve_device(args.device)
    per_fold, dataset, model_name = [], None, None
    for i, path in enumerate(args.checkpoint):
        model, split, dataset = _load(path, device)
        model_name = model.name
        ds = saia_split(model, split, args.method, args.num_samples, rows=args.rows or None, seed=args.seed,
                        device=device, bins=args.bins, k=args.k, progress=not args.no_progress)
        per_fold.append(ds)
    width = min(d.sizes["num_acquired"] for d in per_fold)
    name = per_fold[0].attrs["error_name"]
    keep = [name, "target_nll", "target_nll_std", "row_nll", "row_correct" if name == "accuracy" else "row_sq_error"]
    combined = xr.concat([d[keep].isel(num_acquired=slice(0, width)).assign_coords(row=np.arange(d.sizes["row"]))
                          for d in per_fold], dim="fold", join="outer")
    combined = combined.assign_coords(fold=[d.attrs.get("fold", i) for i, d in enumerate(per_fold)])
    combined["acquired"] = xr.concat([d["acquired"].isel(acquisition=slice(0, width - 1)) for d in per_fold],
                                     dim="fold", join="outer", fill_value=-1)
    combined["seconds"] = xr.concat([d["seconds"].isel(acquisition=slice(0, width - 1)) for d in per_fold], "fold")
    auc = [error_auc(d) for d in per_fold]
    combined["error_auc"] = ("fold", np.asarray(auc))
    combined.attrs.update({k: v for k, v in per_fold[0].attrs.items() if k != "fold"})
    combined.attrs.update({"dataset": str(dataset), "model": str(model_name),
                           "checkpoints": ", ".join(str(Path(p).resolve()) for p in args.checkpoint),
                           "seconds_per_step_per_row": float(np.mean([d.attrs["seconds_per_step_per_row"]
                                                                      for d in per_fold]))})
    out = Path(args.out) if args.out else Path(args.checkpoint[0]).resolve().parent / "saia"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"saia_{args.method}"
    combined.to_netcdf(out / f"{stem}.nc")
    plot_curves(combined, out / f"{stem}.png")
    curve = combined[name].values
    lines = [f"# SAIA ({args.method}) with {model_name} on {dataset}", "",
             f"{len(per_fold)} fold(s), {combined.sizes['row']} rows each at most, K = {args.num_samples}; "
             f"{name} in {combined.attrs['error_units']}, target NLL in the normalised domain; "
             f"{combined.attrs['seconds_per_step_per_row'] * 1e3:.2f} ms per acquisition step per row", "",
             f"| acquired | {name} | target NLL |", "|---|---|---|"]
    for t in range(width):
        lines.append(f"| {t} | {np.nanmean(curve[:, t]):.3f} ± {np.nanstd(curve[:, t]):.3f} | "
                     f"{np.nanmean(combined['target_nll'].values[:, t]):.3f} |")
    lines += ["", f"area under the {name} curve (per acquisition): {np.mean(auc):.3f} ± {np.std(auc):.3f}"]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {out}/ ({stem}.nc, {stem}.png, {stem}.md)")
    return 0

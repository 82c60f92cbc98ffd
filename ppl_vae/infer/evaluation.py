"""Evaluation protocol of the HH-VAEM tables (Peis et al. 2022 §4, Tables 1–5).

For a test split with a fixed ~50% MCAR mask on x (the hidden entries U) and the target fully unobserved, with K
posterior samples ``h_k`` (encoder samples, or HMC chains for HMC models):

- imputation NLL per row: ``−log (1/K) Σ_k exp( (1/|U|) Σ_{d∈U} log p(x_d | h_k) )``, averaged over rows with
  ``|U| > 0``; normalised domain (standardised; ``log1p`` then standardised for loggaussian columns);
  ``log p(x_d | h_k)`` is the model's ``imputation_log_prob`` (VAEM and its variants integrate out the marginal
  code ``z_d``);
- for the VAEM family also ``imputation_nll_code_mean``: the same NLL with ``p(x_d | h_k)`` replaced by the marginal
  decoder's likelihood at the code mean ``μ_d(h_k)``, the reference code's evaluation (what the paper's VAEM-family
  numbers are), which ignores the code's uncertainty;
- target NLL: ``−log (1/K) Σ_k p(y | x̂_k, h_k)`` averaged over rows whose true target is known, normalised domain;
- RMSE of the posterior-mean prediction of y in the *original* target units (regression), or accuracy of the
  posterior-averaged class probabilities (classification).

No row is silently dropped: rows without hidden entries or without a known target are counted and reported.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ppl_vae.models.base import Batch

__all__ = ["evaluate_split", "summarise", "results_dataset", "format_table", "METRICS"]

METRICS = ("imputation_nll", "target_nll", "rmse", "accuracy", "imputation_nll_code_mean")


def _logmeanexp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


@torch.no_grad()
def _chunk_scores(model, batch: Batch, truth: Batch, hidden: torch.Tensor, num_samples: int):
    """Per-row scores of one chunk of test rows; see :func:`evaluate_split`."""
    h = model.posterior_latents(batch, num_samples)                      # (K, B, L)
    mean_params = model.x_params(h, batch)                               # (K, B, P), feeds the predictor's x̂
    lp = model.imputation_log_prob(h, batch, truth.x, hidden, mean_params)  # (K, B, D) log p(x_d | h), 0 off U
    n_hidden = hidden.sum(-1)                                            # (B,)
    imp = -_logmeanexp(lp.sum(-1) / n_hidden.clamp_min(1), 0)            # (B,)
    out = {"imputation_nll": imp, "n_hidden": n_hidden}
    code_mean = getattr(model, "code_mean_log_prob", None)                # VAEM family: the reference's plug-in
    if code_mean is not None:
        lpm = code_mean(h, batch, truth.x, hidden)
        out["imputation_nll_code_mean"] = -_logmeanexp(lpm.sum(-1) / n_hidden.clamp_min(1), 0)
    if model.predictor is not None and truth.y is not None:
        y_params = model.y_params(h, batch, mean_params)                  # (K, B, Py)
        lik = model.predictor.likelihood
        ym = truth.y_mask.bool()
        lpy = lik.log_prob(y_params, truth.y, ym)                        # (K, B)
        out["target_nll"] = -_logmeanexp(lpy, 0)
        out["y_known"] = ym[:, 0]
        kind = lik.kinds[0]
        if kind in ("gaussian", "loggaussian", "poisson"):
            out["y_mean"] = lik.impute(y_params).mean(0)                  # (B, 1) posterior mean, normalised
        else:
            dists = lik.distributions(y_params)
            d, _ = dists[kind]
            probs = d.probs if kind == "categorical" else torch.stack([1 - d.probs, d.probs], -1)
            out["y_class"] = probs.mean(0)[:, 0].argmax(-1)              # (B,)
    return out


def evaluate_split(model, split, num_samples: int = 1000, device: Optional[torch.device] = None,
                   rows_per_chunk: Optional[int] = None, seed: int = 0) -> dict:
    """Metrics of a trained model on one split's test set (Peis et al. 2022 §4 protocol).

    Args:
        model: a trained table model (:class:`~ppl_vae.models.tabular.table.TableVAE` contract: ``posterior_latents``,
            ``imputation_log_prob``, ``x_params``, ``y_params``, ``x_likelihood``, ``predictor``).
        split: a ``ppl_vae.data.Split`` (``test``, ``test_mask``, ``test_input()``, ``normaliser``).
        num_samples: K posterior samples per row (paper: 1000).
        device: where to compute (default: the model's device).
        rows_per_chunk: rows evaluated at once (default: sized to keep ``K × rows × params`` near 2e7 floats).
        seed: seeds the posterior sampling so evaluation is reproducible.

    Returns:
        ``{"imputation_nll", "imputation_nll_code_mean", "target_nll", "rmse" | "accuracy", "num_rows",
        "rows_without_hidden", "rows_without_target"}`` (floats / ints; NaN for a metric that does not apply).
    """
    device = device or next(model.parameters()).device
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    try:
        inp = split.test_input(device=device)
        truth = split.test.batch(device=device)
        hidden = split.test_mask.to(device) & truth.x_mask.bool()
        n = inp.size
        width = max(model.x_likelihood.param_dim, model.x_likelihood.num_columns)
        chunk = rows_per_chunk or max(1, int(2e7 // (num_samples * width * 4)))
        parts = []
        was_training = model.training
        model.eval()
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            parts.append(_chunk_scores(model, inp[rows], truth[rows], hidden[rows], num_samples))
        model.train(was_training)
    finally:
        torch.set_rng_state(gen_state)
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    has_u = cat["n_hidden"] > 0
    result = {"imputation_nll": float(cat["imputation_nll"][has_u].mean()) if has_u.any() else float("nan"),
              "imputation_nll_code_mean": (float(cat["imputation_nll_code_mean"][has_u].mean())
                                           if "imputation_nll_code_mean" in cat and has_u.any() else float("nan")),
              "target_nll": float("nan"), "rmse": float("nan"), "accuracy": float("nan"),
              "num_rows": int(n), "rows_without_hidden": int((~has_u).sum()), "rows_without_target": n}
    if "target_nll" in cat:
        known = cat["y_known"]
        result["rows_without_target"] = int((~known).sum())
        if known.any():
            result["target_nll"] = float(cat["target_nll"][known].mean())
            y_true = split.normaliser.inverse_target(split.test.y[known.cpu()].cpu().numpy())
            if "y_mean" in cat:
                y_pred = split.normaliser.inverse_target(cat["y_mean"][known].cpu().numpy())
                result["rmse"] = float(np.sqrt(np.mean((np.asarray(y_pred, float) - np.asarray(y_true, float)) ** 2)))
            else:
                codes_true = split.test.y[known.cpu(), 0].long().cpu()
                result["accuracy"] = float((cat["y_class"][known].cpu() == codes_true).float().mean())
    return result


def results_dataset(per_split: Sequence[dict], model: str, dataset: str, attrs: Optional[dict] = None) -> xr.Dataset:
    """Per-split metric dicts -> ``xarray.Dataset`` with one variable per metric over dim ``split`` plus
    ``*_mean``/``*_std`` summaries; ``attrs`` records model, data set and the protocol."""
    splits = np.arange(len(per_split))
    data = {}
    for key in METRICS + ("num_rows", "rows_without_hidden", "rows_without_target"):
        values = np.array([r.get(key, np.nan) for r in per_split], dtype=float)
        data[key] = ("split", values)
    ds = xr.Dataset(data, coords={"split": splits})
    for key in METRICS:
        v = ds[key].values
        ds[f"{key}_mean"] = np.nanmean(v) if np.isfinite(v).any() else np.nan
        ds[f"{key}_std"] = np.nanstd(v) if np.isfinite(v).any() else np.nan
    ds.attrs.update({"model": model, "dataset": dataset,
                     "protocol": "Peis et al. 2022 §4: K-fold splits, 50% MCAR test mask on x, y unobserved; NLLs in the "
                                 "normalised domain, RMSE in original target units", **(attrs or {})})
    return ds


def summarise(ds: xr.Dataset) -> pd.DataFrame:
    """One-row table ``metric -> "mean ± std"`` of a :func:`results_dataset` (metrics that apply only)."""
    row = {}
    for key in METRICS:
        if np.isfinite(ds[key].values).any():
            row[key] = f"{float(ds[f'{key}_mean']):.3f} ± {float(ds[f'{key}_std']):.3f}"
    return pd.DataFrame([row], index=[f"{ds.attrs.get('model')} / {ds.attrs.get('dataset')}"])


def format_table(ds: xr.Dataset) -> str:
    """Markdown table of per-split metrics and the mean ± std row."""
    rows = []
    keys = [k for k in METRICS if np.isfinite(ds[k].values).any()]
    header = "| split | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys)
    for s in ds.split.values:
        rows.append(f"| {int(s)} | " + " | ".join(f"{float(ds[k].sel(split=s)):.3f}" for k in keys) + " |")
    rows.append("| mean ± std | " + " | ".join(f"{float(ds[f'{k}_mean']):.3f} ± {float(ds[f'{k}_std']):.3f}"
                                               for k in keys) + " |")
    return "\n".join([header, *rows])

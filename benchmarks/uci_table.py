"""Reproduce the HH-VAEM paper's UCI tables (Peis et al. 2022, Tables 1–2; their evaluation protocol) for every table model.

For every UCI data set, model and protocol: seeded K-fold splits (10 folds; the first ``--splits`` are run),
train-time missingness ``ρ ~ U(0.01, 0.99)`` per row, a 50% MCAR test mask on x, y unobserved at test; imputation
NLL and target NLL (normalised domain, K posterior samples: HMC chains for HMC models, importance-resampled
encoder draws for MIWAE(M), encoder draws otherwise), RMSE (original units) or accuracy, mean ± std over splits,
and seconds per split. Two protocols, labelled in every output:

- ``paper``: the reference's fixed decoder variance 0.1 for real columns and the target in the normalised domain
  (``gaussian_scale = 0.1 ** 0.5``, a std), its per-data-set latent width / batch size / T, and for the VAEM
  family its ``loggaussian`` regression target (``log1p`` then standardised) and ~1k marginal-VAE steps, so the
  NLLs compare like for like with the paper's (energy and naval excepted: the reference's targets there are 2-D);
- ``default``: ours, a learned bounded std in ``[0.1, 2]`` (lower NLLs; not comparable with the paper's numbers).

Outputs (``--out``, default ``benchmarks/results``): ``uci_table[_smoke].nc`` (an ``xarray.Dataset`` over
protocol × dataset × model × split, with the paper's numbers as variables ``paper_*``), ``uci_table[_smoke].md``
(ours beside the paper's, per protocol) and ``uci_table[_smoke].png`` (imputation / target NLL per data set,
paper numbers as black marks), rewritten after every finished run, and the per-run ``results.nc`` / checkpoints under
``uci/<protocol>/<model>-<data>/`` (a re-run reuses finished folds).

    python benchmarks/uci_table.py --protocol paper --splits 3 --steps 3000 --datasets boston energy yacht
    python benchmarks/uci_table.py --protocol both --splits 10 --steps 20000      # the full table (GPU script)
    python benchmarks/uci_table.py --smoke                                        # seconds: used by the tests
    python benchmarks/uci_table.py --protocol paper --datasets naval --set test_sweeps=1   # a model option set

``--set FIELD=VALUE`` sets an option of every selected model whose typed config has it (an option none has is an
error) and is written into the table's header and attributes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from ppl_vae.data import load_dataset
from ppl_vae.models import TABLE_MODELS
from ppl_vae.pipeline import run_experiment

#: Peis et al. 2022, Table 1 (imputation NLL) and Table 2 (target NLL): {model: {data: ((mean, std), (mean, std))}}
#: the paper's "Wine" is scikit-learn's wine recognition data (178 rows, 3 cultivars: a categorical target; the
#: reference's ``datasets.Wine`` calls ``load_wine``), our ``wine``, not the red wine quality table.
_P_DATA = ["bank", "insurance", "avocado", "naval", "yacht", "diabetes", "concrete", "wine", "energy",
           "boston"]
_P_IMP = {
    "vaem": "2.84 0.07 1.81 0.03 1.89 0.01 0.55 0.05 3.15 0.28 2.78 0.16 2.45 0.26 3.01 0.61 2.09 0.10 2.01 0.23",
    "miwaem": "2.74 0.05 1.88 0.04 1.92 0.04 0.57 0.03 2.66 0.11 2.55 0.09 2.34 0.51 2.76 0.48 2.06 0.14 1.94 0.23",
    "h-vaem": "2.82 0.06 1.80 0.04 1.89 0.01 0.48 0.06 3.06 0.31 2.74 0.09 2.42 0.21 2.85 0.56 1.72 0.11 1.89 0.24",
    "hmc-vaem": "2.69 0.05 1.77 0.06 1.89 0.02 0.49 0.07 2.21 0.24 2.72 0.20 2.28 0.29 2.83 0.46 1.73 0.05 1.83 0.16",
    "hh-vaem": "2.63 0.04 1.75 0.03 1.88 0.05 0.40 0.05 2.47 0.27 2.54 0.13 2.28 0.09 1.90 0.17 1.71 0.04 1.83 0.11",
}
_P_TGT = {
    "vaem": "0.56 0.06 1.20 0.03 1.18 0.02 2.69 0.01 0.61 0.02 1.59 0.19 1.07 0.09 0.28 0.09 0.61 0.14 0.85 0.21",
    "miwaem": "0.51 0.03 1.15 0.03 1.15 0.03 2.70 0.01 0.60 0.03 1.36 0.10 0.95 0.22 0.28 0.13 0.54 0.12 0.80 0.21",
    "h-vaem": "0.50 0.03 1.06 0.02 1.18 0.02 2.68 0.01 0.60 0.02 1.71 0.14 1.02 0.09 0.26 0.11 0.46 0.14 0.90 0.22",
    "hmc-vaem": "0.52 0.02 1.00 0.03 1.12 0.03 2.71 0.01 0.52 0.15 1.55 0.29 0.95 0.26 0.28 0.09 0.41 0.07 0.71 0.13",
    "hh-vaem": "0.49 0.03 0.93 0.06 1.10 0.01 2.62 0.01 0.56 0.02 1.38 0.18 0.95 0.08 0.20 0.04 0.32 0.05 0.55 0.04",
}


def _parse(row: str) -> dict:
    v = [float(t) for t in row.split()]
    return {d: (v[2 * i], v[2 * i + 1]) for i, d in enumerate(_P_DATA)}


PAPER = {m: {d: (_parse(_P_IMP[m])[d], _parse(_P_TGT[m])[d]) for d in _P_DATA} for m in _P_IMP}
#: the HH-VAEM row alone (kept for callers of the previous version)
PAPER_HHVAEM = {d: v for d, v in PAPER["hh-vaem"].items() if d != "bank"}
UCI = ["boston", "concrete", "energy", "yacht", "diabetes", "wine", "naval", "avocado", "insurance"]
#: the reference's per-data-set settings (ipeis/HH-VAEM ``src/configs.py``): latent width (hierarchical models:
#: layers [d, d // 2]), batch size and HMC transitions T. Used by the paper protocol.
PAPER_SETTINGS = {
    "boston": (10, 100, 10), "energy": (10, 100, 10), "wine": (10, 24, 10), "naval": (10, 100, 10),
    "avocado": (10, 100, 10), "insurance": (10, 100, 10),
    "yacht": (4, 20, 5), "diabetes": (4, 100, 5), "concrete": (4, 100, 5),
}


def protocol_kwargs(protocol: str, dataset: str, model: str) -> tuple[dict, int]:
    """``(model options, batch size)`` of one cell. Paper protocol: the reference's fixed decoder variance and its
    per-data-set latent width / batch size / T. Default protocol: the package defaults (batch 128)."""
    kwargs = dict(PROTOCOLS[protocol])
    batch_size = 128
    if protocol == "paper" and dataset in PAPER_SETTINGS:
        latent, batch_size, T = PAPER_SETTINGS[dataset]
        kwargs["latent_dim"] = latent
        if model.startswith(("hmc", "hh")):
            kwargs["hmc_steps"] = T
    if protocol == "paper" and model in VAEM_FAMILY:
        kwargs.update(PAPER_MARGINAL)
    return kwargs, batch_size


def parse_overrides(items, models) -> dict:
    """``["FIELD=VALUE", ...]`` -> ``{model: {field: value}}`` for the selected models whose typed config has the
    field. Raises SystemExit naming a field that none of them has (an unknown option is an error)."""
    from ppl_vae.models import model_class
    from ppl_vae.models.config import option_names, parse_assignment
    out = {m: {} for m in models}
    for item in items:
        try:
            key, value = parse_assignment(item)
        except ValueError as exc:
            raise SystemExit(f"--set: {exc}") from None
        takers = [m for m in models if key in option_names(model_class(m).Config)]
        if not takers:
            raise SystemExit(f"--set {item}: none of {', '.join(models)} has an option {key!r}")
        for m in takers:
            out[m][key] = value
    return out


def protocol_data(protocol: str, data, model: str):
    """``(data set, data spec)`` of one cell: the paper protocol re-declares a regression target of the VAEM family
    as the reference's ``loggaussian`` (stored in the checkpoint's data spec, so a re-evaluation rebuilds it)."""
    spec = {"name": data.name}
    like = PAPER_TARGET_LIKELIHOOD.get(model) if protocol == "paper" and data.task == "regression" else None
    if like is not None:
        data = data.with_target_likelihood(like)
        spec["target_likelihood"] = like
    return data, spec
VAEM_FAMILY = ["vaem", "miwaem", "h-vaem", "hmc-vaem", "hh-vaem"]
#: the reference trains VAEM's marginal VAEs for about 1k steps (``marg_epochs`` × steps per epoch, 1/20 of its run;
#: ours default to a third of the steps). Measured (vaem, fold 0, 5000 steps; imputation NLL / at code mean):
#: energy 1.85 / 2.64 with 1667 marginal steps, 1.83 / 2.41 with 1000; boston 1.32 / 1.92 and 1.25 / 1.80.
PAPER_MARGINAL_STEPS = 1000
#: the reference's stage 1 (ipeis/HH-VAEM ``VAEM.__init__``: ``lr_marg=1e-3``, ``margVAE(anneal_steps=0)``): 1000 steps at
#: learning rate 1e-3 without KL warm-up. Measured (vaem, fold 0, 5000 steps; NLL at the code mean): energy 2.41 with
#: our defaults (3e-3, 500-step warm-up), 1.94 with the reference's stage 1; boston 1.80 / 1.71.
PAPER_MARGINAL = {"marginal_steps": PAPER_MARGINAL_STEPS, "marginal_lr": 1e-3, "marginal_kl_warmup": 0}
#: the reference's VAEM family models a regression target as ``loggaussian`` (``log1p`` then standardised, target
#: NLL in that domain; ipeis/HH-VAEM ``src/configs.py`` ``likelihood_y``), its VAE family as ``gaussian``
PAPER_TARGET_LIKELIHOOD = {m: "loggaussian" for m in VAEM_FAMILY}
#: where the reference's target differs from ours in a way we do not reproduce: its energy and naval targets are
#: 2-D (heating + cooling load; compressor + turbine decay), ours are the first of the two, so target NLLs differ
PAPER_TARGET_DIFFERS = {"energy": "2-D target (heating + cooling load) in the paper, heating load here",
                        "naval": "2-D target (compressor + turbine decay) in the paper, compressor decay here"}
VAE_FAMILY = ["vae", "miwae", "h-vae", "hmc-vae", "hh-vae"]
PROTOCOLS = {"paper": {"gaussian_scale": 0.1 ** 0.5}, "default": {}}
METRICS = ("imputation_nll", "target_nll", "rmse", "accuracy", "imputation_nll_code_mean")
PROTOCOL_TEXT = {
    "paper": "paper protocol: fixed decoder variance 0.1 (std 0.316) for real columns and the target, normalised "
             "domain; the reference's latent width, batch size and T per data set. VAEM family: 'imputation NLL' is "
             "the model's likelihood (marginal code integrated out), 'at code mean' the reference's evaluation "
             "(the paper's numbers are of that kind); VAEM-family regression targets loggaussian (log1p, "
             "standardised) and the reference's marginal-VAE stage (1000 steps, learning rate 1e-3, no KL warm-up); its energy / naval targets are 2-D, ours "
             "1-D",
    "default": "our default: learned bounded decoder std in [0.1, 2], latent 10 ([10, 5]), batch 128, T = 5; VAEM-family "
               "imputation scored by the model's likelihood with the marginal code integrated out (NLLs not "
               "comparable with the paper's)",
}


def collect(records: list[dict], protocols, datasets, models, max_splits: int) -> xr.Dataset:
    """Records ``{protocol, dataset, model, results (xr.Dataset), seconds}`` -> one Dataset over
    protocol × dataset × model × split (NaN where a cell did not run), plus ``seconds_per_split`` and ``paper_*``."""
    shape = (len(protocols), len(datasets), len(models), max_splits)
    data = {k: np.full(shape, np.nan) for k in METRICS}
    secs = np.full(shape[:3], np.nan)
    for r in records:
        i, j, k = protocols.index(r["protocol"]), datasets.index(r["dataset"]), models.index(r["model"])
        res = r["results"]
        n = min(len(res.split), max_splits)
        for key in METRICS:
            if key in res:                       # results written before a metric existed lack it: NaN
                data[key][i, j, k, :n] = res[key].values[:n]
        secs[i, j, k] = r["seconds"] / max(1, r.get("trained_splits", n))
    coords = {"protocol": list(protocols), "dataset": list(datasets), "model": list(models),
              "split": np.arange(max_splits)}
    ds = xr.Dataset({k: (("protocol", "dataset", "model", "split"), v) for k, v in data.items()}, coords=coords)
    ds["seconds_per_split"] = (("protocol", "dataset", "model"), secs)
    for idx, key in ((0, "imputation_nll"), (1, "target_nll")):
        for stat, s in (("mean", 0), ("std", 1)):
            arr = np.full((len(datasets), len(models)), np.nan)
            for j, d in enumerate(datasets):
                for k, m in enumerate(models):
                    if m in PAPER and d in PAPER[m]:
                        arr[j, k] = PAPER[m][d][idx][s]
            ds[f"paper_{key}_{stat}"] = (("dataset", "model"), arr)
    return ds


def _fmt(values: np.ndarray, digits: int = 2) -> str:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return "–"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def _secs(v: float) -> str:
    return f"{v:.0f}" if np.isfinite(v) else "–"     # not timed: the cell's folds were trained by an earlier run


def markdown(ds: xr.Dataset, header: str) -> str:
    """Per protocol: one row per (data set, model) with ours and the paper's imputation / target NLL."""
    out = [header]
    for p in ds.protocol.values:
        out.append(f"\n### {PROTOCOL_TEXT.get(str(p), str(p))}\n")
        out.append("| data | model | imputation NLL | at code mean | paper | target NLL | paper | RMSE / acc. | splits | "
                   "s / split |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for d in ds.dataset.values:
            for m in ds.model.values:
                cell = ds.sel(protocol=p, dataset=d, model=m)
                n = int(np.isfinite(cell["imputation_nll"].values).sum())
                if n == 0:
                    continue
                pi, pt = (float(ds[f"paper_{k}_mean"].sel(dataset=d, model=m)) for k in ("imputation_nll", "target_nll"))
                pis, pts = (float(ds[f"paper_{k}_std"].sel(dataset=d, model=m)) for k in ("imputation_nll", "target_nll"))
                paper_i = f"{pi:.2f} ± {pis:.2f}" if np.isfinite(pi) else "–"
                paper_t = f"{pt:.2f} ± {pts:.2f}" if np.isfinite(pt) else "–"
                third = cell["rmse"].values if np.isfinite(cell["rmse"].values).any() else cell["accuracy"].values
                out.append(f"| {d} | {m} | {_fmt(cell['imputation_nll'].values)} | "
                           f"{_fmt(cell['imputation_nll_code_mean'].values)} | {paper_i} | "
                           f"{_fmt(cell['target_nll'].values)} | {paper_t} | {_fmt(third)} | {n} | "
                           f"{_secs(float(cell['seconds_per_split']))} |")
            if str(p) == "paper" and "hh-vaem" in PAPER and str(d) in PAPER["hh-vaem"]:
                (im, ims), (tg, tgs) = PAPER["hh-vaem"][str(d)]
                out.append(f"| {d} | HH-VAEM (paper) | | {im:.2f} ± {ims:.2f} | | {tg:.2f} ± {tgs:.2f} | | – | 10 | – |")
    if "paper" in [str(p) for p in ds.protocol.values]:
        differs = [f"{d}: {PAPER_TARGET_DIFFERS[str(d)]}" for d in ds.dataset.values if str(d) in PAPER_TARGET_DIFFERS]
        if differs:
            out.append("\nTarget NLLs not like for like with the paper's: " + "; ".join(differs) + ".")
        out.extend(targets(ds.sel(protocol="paper")))
    return "\n".join(out) + "\n"


HMC_COUNTERPART = {"hh-vaem": "h-vaem", "hmc-vaem": "vaem", "hh-vae": "h-vae", "hmc-vae": "vae"}


def _mean_std(cell: xr.Dataset, key: str) -> tuple[float, float]:
    v = cell[key].values
    v = v[np.isfinite(v)]
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


def targets(ds: xr.Dataset) -> list[str]:
    """The issue's targets on the paper protocol, counted from ``ds`` (one protocol, dims dataset × model × split).

    (1) HH-VAEM at or below the paper's HH-VAEM mean (strictly: our fold mean <= the paper's 10-fold mean) on
    imputation NLL at the code mean (the reference's evaluation) and on target NLL; (2) HH-VAEM best or tied
    among the VAEM-family models that ran ("tied": within the larger fold std of the two); (3) each HMC-refined
    model against its Gaussian-guide counterpart (win or tie, same tie rule). Every comparison between two models
    is over the folds both ran (cells may hold different numbers of folds). Returns markdown lines."""
    models = [str(m) for m in ds.model.values]

    def ran(model, d) -> bool:
        return model in models and bool(np.isfinite(ds["target_nll"].sel(dataset=d, model=model).values).any())

    data = [str(d) for d in ds.dataset.values if ran("hh-vaem", str(d))]
    if not data:
        return []
    lines = ["\n#### Targets (paper protocol; counted over the data sets where HH-VAEM ran)\n",
             "| target | imputation (code mean) | imputation (model likelihood) | target NLL |", "|---|---|---|---|"]

    def count(pred, over=None) -> str:
        over = data if over is None else over
        hits = [d for d in over if pred(d)]
        return f"{len(hits)} of {len(over)}" + (f" ({', '.join(hits)})" if hits else "")

    def at_or_below_paper(key, d):
        pm = PAPER["hh-vaem"].get(d)
        return pm is not None and _mean_std(ds.sel(dataset=d, model="hh-vaem"), key)[0] <= pm[key == "target_nll"][0]

    def paired(key, d, model, other) -> tuple[float, float, float, float]:
        """Mean and std of ``model`` and ``other`` over the folds both ran (fold counts differ between cells)."""
        a, b = (ds[key].sel(dataset=d, model=m).values for m in (model, other))
        both_ran = np.isfinite(a) & np.isfinite(b)
        if not both_ran.any():
            return (float("nan"),) * 4
        a, b = a[both_ran], b[both_ran]
        return float(a.mean()), float(a.std()), float(b.mean()), float(b.std())

    def best_or_tied(key, d, model="hh-vaem", among=VAEM_FAMILY, tie=True):
        if not np.isfinite(_mean_std(ds.sel(dataset=d, model=model), key)[0]):
            return False
        pairs = [paired(key, d, model, o) for o in among if o in models and o != model]
        return all(m0 <= m + (max(s0, s) if tie else 0.0) for m0, s0, m, s in pairs if np.isfinite(m))

    def both(key, model="hh-vaem", among=VAEM_FAMILY) -> str:
        over = [d for d in data if ran(model, d)] if len(among) > 1 else \
            [d for d in data if ran(model, d) and all(ran(o, d) for o in among)]   # pairs: where both ran
        strict = sum(best_or_tied(key, d, model, among, tie=False) for d in over)
        return count(lambda d: best_or_tied(key, d, model, among), over) + f"; strictly lowest on {strict}"

    keys = ("imputation_nll_code_mean", "imputation_nll", "target_nll")
    lines.append("| HH-VAEM ≤ paper HH-VAEM | " + count(lambda d: at_or_below_paper(keys[0], d)) + " | – | "
                 + count(lambda d: at_or_below_paper(keys[2], d)) + " |")
    lines.append("| HH-VAEM best or tied in the VAEM family | "
                 + " | ".join(both(k) for k in keys) + " |")
    for hmc, base in HMC_COUNTERPART.items():
        if hmc in models and base in models:
            lines.append(f"| {hmc} wins or ties {base} | " + " | ".join(both(k, hmc, (base,)) for k in keys) + " |")
    return lines


def plot(ds: xr.Dataset, path: Path) -> None:
    """Imputation and target NLL (mean ± std over splits) per data set and model, one row per protocol; the
    paper's numbers as black bars on the paper-protocol row, whose imputation bars are at the code mean (VAEM
    family; the paper's kind of number)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols, datasets, models = list(ds.protocol.values), list(ds.dataset.values), list(ds.model.values)
    fig, axes = plt.subplots(len(protocols), 2, figsize=(12, 3.2 * len(protocols)), squeeze=False)
    width = 0.8 / max(1, len(models))
    for i, p in enumerate(protocols):
        for j, key in enumerate(("imputation_nll", "target_nll")):
            ax = axes[i, j]
            # paper protocol: imputation at the code mean, the kind of number the paper reports (where it exists)
            shown = ("imputation_nll_code_mean" if p == "paper" and key == "imputation_nll"
                     and "imputation_nll_code_mean" in ds else key)
            for k, m in enumerate(models):
                v = ds[shown].sel(protocol=p, model=m).values           # (dataset, split)
                if shown != key and not np.isfinite(v).any():           # a model without a code (VAE family)
                    v = ds[key].sel(protocol=p, model=m).values
                mean = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in v])
                std = np.array([np.nanstd(r) if np.isfinite(r).any() else np.nan for r in v])
                x = np.arange(len(datasets)) + (k - (len(models) - 1) / 2) * width
                ax.bar(x, mean, width, yerr=std, label=m)
                if p == "paper":
                    pv = ds[f"paper_{key}_mean"].sel(model=m).values
                    ax.scatter(x, pv, marker="_", s=120, color="black", zorder=3,
                               label="paper" if k == 0 else None)
            ax.set_xticks(np.arange(len(datasets)), datasets, rotation=20)
            ax.set_title(f"{shown.replace('_', ' ')} ({p} protocol)")
            ax.set_ylabel("NLL (normalised domain)")
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(paths, out: Path, stem: str, note: str = "") -> int:
    """Merge the ``.nc`` tables of several runs (e.g. one per data set or per GPU job) into one table."""
    parts = [xr.load_dataset(p, engine="scipy") for p in paths]
    ds = xr.merge(parts, compat="no_conflicts", join="outer", combine_attrs="drop_conflicts")
    order = [d for d in UCI if d in ds.dataset.values] + [d for d in ds.dataset.values if d not in UCI]
    models = [m for m in VAEM_FAMILY + VAE_FAMILY if m in ds.model.values]
    ds = ds.reindex(dataset=order, model=models)
    header = (f"UCI table (Peis et al. 2022 Tables 1-2 protocol), merged from {len(parts)} runs: "
              f"{ds.attrs.get('steps', '?')} steps, K={ds.attrs.get('num_samples', '?')}, "
              f"{ds.sizes['split']} split slot(s) of 10 seeded folds (the 'splits' column says how many ran). NLLs "
              "in the normalised domain (lower is better); 'paper' columns are the published means ± std over 10 "
              "folds (VAEM-family models only)." + (f" {note}" if note else "") + "\n")
    ds.to_netcdf(out / f"{stem}.nc", engine="scipy")
    (out / f"{stem}.md").write_text(markdown(ds, header))
    plot(ds, out / f"{stem}.png")
    print(markdown(ds, header))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=VAEM_FAMILY + VAE_FAMILY, choices=list(TABLE_MODELS))
    p.add_argument("--datasets", nargs="+", default=UCI)
    p.add_argument("--protocol", choices=["paper", "default", "both"], default="both")
    p.add_argument("--splits", type=int, default=10, help="folds run, of 10 seeded folds")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--latent-dim", type=int, default=None,
                   help="latent width (hierarchical models: width of h_1, layers (d, d // 2)); default per model")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None, help="stem of the output files (default uci_table / uci_table_smoke)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1, as the CLI: these networks are too small to gain from more, "
                        "and two runs sharing the cores slow each other down many times over with more)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="model option overrides, applied to every selected model that has the option (e.g. "
                        "test_sweeps=1, the reference's number of HMC sweeps at test); recorded in the outputs")
    p.add_argument("--note", default="", help="a sentence appended to the table's header (e.g. how the cells of a "
                                              "--collect were run)")
    p.add_argument("--merge", nargs="+", default=None, metavar="NC",
                   help="only merge tables written by earlier runs (their .nc files) into --out/--name .md/.nc/.png")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: build the table from the cells' results.nc already under --out/uci (e.g. after "
                        "benchmarks/reevaluate.py --write)")
    p.add_argument("--smoke", action="store_true", help="tiny run (yacht, 1 split, 20 steps, vae/vaem/hh-vaem, paper protocol unless --models/--protocol are given)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.datasets, args.splits, args.steps, args.num_samples = ["yacht"], 1, 20, 5
        if argv is None or "--models" not in argv:
            args.models = ["vae", "vaem", "hh-vaem"]
        if argv is None or "--protocol" not in argv:
            args.protocol = "paper"
    protocols = ["paper", "default"] if args.protocol == "both" else [args.protocol]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("uci_table_smoke" if args.smoke else "uci_table")
    if args.merge:
        return merge(args.merge, out, stem, args.note)
    overrides = parse_overrides(args.set, args.models)
    set_text = f" Model options set: {', '.join(args.set)}." if args.set else ""
    folds_text = (f"up to {args.splits} of 10 seeded folds per cell (the 'splits' column says how many ran)"
                  if args.collect else f"{args.splits} of 10 seeded folds")
    header = (f"UCI table (Peis et al. 2022 Tables 1-2 protocol): {folds_text}, {args.steps} steps, "
              f"K={args.num_samples}, seed {args.seed}, device {args.device}, {args.threads} thread(s).{set_text} NLLs in the "
              "normalised domain (lower is better); 'paper' columns are the published means ± std over 10 folds "
              "(VAEM-family models only)." + (f" {args.note}" if args.note else "") + "\n")
    records = []
    for protocol in protocols:
        for name in args.datasets:
            data = load_dataset(name)
            for model in args.models:
                kwargs, batch_size = protocol_kwargs(protocol, name, model)
                cell_data, spec = protocol_data(protocol, data, model)
                if args.latent_dim is not None:
                    kwargs["latent_dim"] = args.latent_dim
                if args.smoke and model.startswith(("hh", "hmc")):
                    kwargs.update(hmc_steps=2, leapfrog_steps=2, sksd_chains=4, test_sweeps=1)
                if args.smoke:
                    kwargs.pop("marginal_steps", None)   # 20 steps: the default third
                kwargs.update(overrides[model])
                cell = out / "uci" / protocol / f"{model}-{name}"
                reused = (cell / "results.nc").exists()     # finished earlier: its folds are re-evaluated only
                if args.collect:
                    if not reused:
                        continue
                    timing = cell / "seconds.json"
                    secs = json.loads(timing.read_text())["seconds_per_split"] if timing.exists() else float("nan")
                    records.append({"protocol": protocol, "dataset": name, "model": model, "seconds": secs,
                                    "trained_splits": 1,
                                    "results": xr.load_dataset(cell / "results.nc", engine="scipy")})
                    continue
                t0 = time.perf_counter()
                res = run_experiment(model, cell_data, splits=args.splits, folds=max(10, args.splits), steps=args.steps,
                                     batch_size=batch_size,
                                     num_samples=args.num_samples, device=args.device, seed=args.seed,
                                     out=cell, progress=False,
                                     model_kwargs=kwargs, data_spec=spec)
                secs = time.perf_counter() - t0
                if not reused:                      # kept beside the cell so --collect can report it
                    (cell / "seconds.json").write_text(json.dumps({"seconds_per_split": secs / args.splits}))
                records.append({"protocol": protocol, "dataset": name, "model": model, "results": res,
                                "seconds": float("nan") if reused else secs})
                print(f"{protocol} {name} {model}: imputation {_fmt(res['imputation_nll'].values)}, target "
                      f"{_fmt(res['target_nll'].values)}, {secs:.0f} s", flush=True)
                ds = collect(records, protocols, args.datasets, args.models, args.splits)
                ds.attrs.update({"steps": args.steps, "num_samples": args.num_samples, "seed": args.seed,
                                 "device": args.device, "folds": 10, "model_options_set": " ".join(args.set),
                                 "protocols": "; ".join(f"{k}: {PROTOCOL_TEXT[k]}" for k in protocols),
                                 "seconds_note": "seconds_per_split: training + evaluation per split, wall clock; "
                                                 "NaN for a cell whose finished folds were reused"})
                ds.to_netcdf(out / f"{stem}.nc", engine="scipy")
                (out / f"{stem}.md").write_text(markdown(ds, header))
    if args.collect:
        if not records:
            print(f"no finished cells under {out / 'uci'}", file=sys.stderr)
            return 2
        ds = collect(records, protocols, args.datasets, args.models, args.splits)
        ds.attrs.update({"steps": args.steps, "num_samples": args.num_samples, "seed": args.seed, "folds": 10})
        ds.to_netcdf(out / f"{stem}.nc", engine="scipy")
        (out / f"{stem}.md").write_text(markdown(ds, header))
    plot(ds, out / f"{stem}.png")
    print("\n" + markdown(ds, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())

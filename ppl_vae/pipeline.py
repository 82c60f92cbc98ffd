"""The main job: a table data set -> seeded K-fold splits -> train a model per split -> METHODS §8 metrics.

Used by the CLI (``ppl-vae run|fit|evaluate``), the benchmarks and the notebooks, so all of them follow one
protocol. Every split's model is checkpointed (resumable) under ``out/fold<k>/checkpoint.pt``; results go to
``out/results.nc`` (an ``xarray.Dataset``) and ``out/results.md``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import xarray as xr

from ppl_vae.data import TableDataset, from_csv, load_dataset
from ppl_vae.errors import PplVaeError
from ppl_vae.infer.evaluation import evaluate_split, format_table, results_dataset
from ppl_vae.infer.checkpoint import load_checkpoint, load_model, remove_orphaned_tmp
from ppl_vae.infer.svi import Trainer
from ppl_vae.models import MODELS, TABLE_MODELS, build_model
from ppl_vae.errors import UnknownNameError

__all__ = ["DEFAULT_MODEL_KWARGS", "resolve_dataset", "fit_split", "run_experiment", "evaluate_checkpoint",
           "resolve_device", "remove_run_outputs"]

_TABLE_DEFAULTS = {"latent_dim": 10, "hidden": [64, 64], "kl_warmup": 500}

#: per-model defaults (paper-sized for the UCI tables). The HMC variants share their base model's, so that the
#: ELBO pre-training of ``hmc-vae``/``hmc-vaem`` is exactly the ``vae``/``vaem`` training it is compared with.
DEFAULT_MODEL_KWARGS: dict[str, dict] = {name: dict(_TABLE_DEFAULTS) for name in ("vae", "vaem", "hmc-vae", "hmc-vaem")}


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``"cpu"``/``"cuda"``/``"auto"``/``None`` -> ``torch.device``. Raises :class:`~ppl_vae.errors.PplVaeError`
    when CUDA is asked for but unavailable, or the device string is malformed."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise PplVaeError(f"bad --device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PplVaeError("--device cuda requested but no CUDA device is available (torch.cuda.is_available() "
                           "is False)")
    return device


def resolve_dataset(name: Optional[str] = None, csv: Optional[str] = None, target: Optional[str] = None,
                    **options: Any) -> TableDataset:
    """A named data set (``load_dataset``) or a user CSV (``from_csv``; NaN/empty cells are missing).

    Raises:
        UnknownNameError: unknown data set name (lists the valid ones).
        PplVaeError: neither or both of ``name`` and ``csv`` given.
    """
    if (name is None) == (csv is None):
        raise PplVaeError("give exactly one of a data set name (--dataset) or a CSV path (--csv)")
    return load_dataset(name, **options) if csv is None else from_csv(csv, target=target)


def _check_table_model(model_name: str) -> None:
    if model_name not in MODELS:
        raise UnknownNameError("model", model_name, MODELS)
    if model_name not in TABLE_MODELS:
        raise PplVaeError(f"model {model_name!r} is not a table model; table models: {', '.join(TABLE_MODELS)}")


def _remove_checkpoint(path: Path) -> None:
    remove_orphaned_tmp(path)
    if path.exists():
        path.unlink()


def remove_run_outputs(out: Union[str, Path]) -> list[Path]:
    """Delete what :func:`run_experiment` / :func:`fit_split` wrote into ``out`` (``checkpoint.pt``,
    ``fold*/checkpoint.pt`` and their orphaned ``*.tmp`` files, ``results.nc``, ``results.md``) — only those files,
    never the directory or anything else in it. Returns the removed paths (``--overwrite``)."""
    out = Path(out)
    removed = []
    candidates = [out / "checkpoint.pt", out / "results.nc", out / "results.md"]
    candidates += sorted(out.glob("fold*/checkpoint.pt")) if out.is_dir() else []
    for path in candidates:
        removed += remove_orphaned_tmp(path)
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then ``os.replace`` onto ``path`` (a crash leaves the old file or none, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fit_split(model_name: str, dataset: TableDataset, split, *, steps: int = 3000, batch_size: int = 128,
              lr: float = 3e-3, device: Union[str, torch.device] = "cpu", seed: int = 0,
              checkpoint: Optional[Union[str, Path]] = None, progress: bool = True,
              model_kwargs: Optional[Mapping[str, Any]] = None, data_spec: Optional[Mapping[str, Any]] = None,
              checkpoint_every: int = 500, overwrite: bool = False):
    """Build ``model_name`` for ``dataset``'s schema and train it on ``split.train`` with :class:`Trainer`.

    Args:
        seed: the training seed (:func:`run_experiment` passes ``seed + fold``).
        checkpoint: resumable checkpoint file; an existing one is resumed only if it was trained with the same
            settings (model, config, seed, folds, fold, steps, lr, batch size, training data hash), else
            :class:`~ppl_vae.errors.StaleCheckpointError`.
        data_spec: how to rebuild the data (``name`` / ``csv`` / ``target``, plus the user-level ``folds`` and
            ``seed`` of the split), stored in the checkpoint's metadata and settings.
        checkpoint_every: steps between checkpoint writes.
        overwrite: delete an existing checkpoint first and train from scratch.

    Returns: ``(model, history)``. The checkpoint's metadata records the data set, split and normaliser so that
    :func:`evaluate_checkpoint` can rebuild the test set.

    Raises: UnknownNameError / PplVaeError (bad model), StaleCheckpointError, NonFiniteLossError,
    TrainingInterrupted (see :class:`~ppl_vae.infer.svi.Trainer`).
    """
    _check_table_model(model_name)
    kwargs = {**DEFAULT_MODEL_KWARGS.get(model_name, {}), **dict(model_kwargs or {})}
    device = resolve_device(device)
    torch.manual_seed(seed)
    model = build_model(model_name, dataset.schema, **kwargs)
    spec = dict(data_spec or {"name": dataset.name})
    meta = {"data": spec, "fold": int(split.fold), "normaliser": split.normaliser.to_dict(), "steps": int(steps)}
    settings = {"fold": int(split.fold), "dataset": spec.get("name")}
    if "folds" in spec:
        settings["folds"] = int(spec["folds"])
    if "seed" in spec:
        settings["seed"] = int(spec["seed"])      # the user's seed (the trainer's is seed + fold)
    if checkpoint is not None and overwrite:
        _remove_checkpoint(Path(checkpoint))
    trainer = Trainer(model, seed=seed, device=device, batch_size=batch_size, lr=lr, checkpoint=checkpoint,
                      checkpoint_every=checkpoint_every, progress=progress, metadata=meta, settings=settings)
    history = trainer.fit(split.train, steps)
    return model, history


def run_experiment(model_name: str, dataset: TableDataset, *, splits: Optional[int] = None, folds: int = 10,
                   steps: int = 3000, batch_size: int = 128, lr: float = 3e-3, num_samples: int = 1000,
                   device: Union[str, torch.device] = "cpu", seed: int = 0, out: Optional[Union[str, Path]] = None,
                   progress: bool = True, model_kwargs: Optional[Mapping[str, Any]] = None,
                   data_spec: Optional[Mapping[str, Any]] = None, checkpoint_every: int = 500,
                   overwrite: bool = False) -> xr.Dataset:
    """Train and evaluate ``model_name`` on the first ``splits`` of ``folds`` seeded K-fold splits (METHODS §8).

    Args:
        model_name: a table model name (``vae``, ``vaem``, ...).
        dataset: the data set (named or user data).
        splits: how many folds to run (default: all ``folds``).
        folds: K of the K-fold partition (10 in the paper).
        steps, batch_size, lr: training budget per split.
        num_samples: K posterior samples for the metrics (paper: 1000).
        device: ``cpu`` / ``cuda`` / ``auto``.
        seed: seeds the splits, masks, training and evaluation.
        out: output directory (checkpoints, ``results.nc``, ``results.md``); ``None`` keeps everything in memory.
            Finished folds are reused and unfinished ones resumed only when their checkpoint's settings equal this
            call's.
        checkpoint_every: steps between checkpoint writes.
        overwrite: delete the previous outputs in ``out`` (:func:`remove_run_outputs`) and retrain.

    Returns:
        the per-split metrics as an ``xarray.Dataset`` (see :func:`~ppl_vae.infer.evaluation.results_dataset`).
        ``results.nc`` / ``results.md`` are written atomically.

    Raises:
        UnknownNameError / PplVaeError: unknown or non-table model; ``splits`` larger than ``folds``.
        StaleCheckpointError: a checkpoint in ``out`` trained with other settings (names the first one).
        NonFiniteLossError, TrainingInterrupted: see :class:`~ppl_vae.infer.svi.Trainer`.
    """
    _check_table_model(model_name)
    splits = folds if splits is None else int(splits)
    if not 1 <= splits <= max(folds, 1):
        raise PplVaeError(f"--splits must be between 1 and --folds={folds}, got {splits}")
    device = resolve_device(device)
    spec = dict(data_spec or {"name": dataset.name})
    spec.update({"folds": int(folds), "seed": int(seed)})
    out = Path(out) if out is not None else None
    if out is not None and overwrite:
        remove_run_outputs(out)
    per_split = []
    for split in dataset.splits(n_splits=folds, seed=seed)[:splits]:
        ckpt = out / f"fold{split.fold}" / "checkpoint.pt" if out is not None else None
        model, _ = fit_split(model_name, dataset, split, steps=steps, batch_size=batch_size, lr=lr, device=device,
                             seed=seed + split.fold, checkpoint=ckpt, progress=progress, model_kwargs=model_kwargs,
                             data_spec=spec, checkpoint_every=checkpoint_every)
        per_split.append(evaluate_split(model, split, num_samples=num_samples, device=device, seed=seed))
    results = results_dataset(per_split, model_name, dataset.name,
                              attrs={"folds": folds, "steps": steps, "num_samples": num_samples, "seed": seed,
                                     "device": str(device)})
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "results.nc", lambda tmp: results.to_netcdf(tmp, engine="scipy"))
        _atomic_write(out / "results.md",
                      lambda tmp: tmp.write_text(f"# {model_name} on {dataset.name}\n\n{format_table(results)}\n"))
    return results


def evaluate_checkpoint(path: Union[str, Path], *, num_samples: int = 1000, device: Union[str, torch.device] = "cpu",
                        dataset: Optional[TableDataset] = None) -> dict:
    """Re-evaluate a checkpoint written by :func:`fit_split`/:func:`run_experiment` on its own test split.

    The data set is rebuilt from the checkpoint's metadata (name or CSV path, K, seed, fold) unless ``dataset`` is
    given (for data passed as a DataFrame). Returns the metric dict of
    :func:`~ppl_vae.infer.evaluation.evaluate_split`.
    """
    device = resolve_device(device)
    payload = load_checkpoint(path, map_location=device)
    meta = payload.get("metadata") or {}
    spec = meta.get("data") or {}
    if dataset is None:
        dataset = resolve_dataset(spec.get("name") if not spec.get("csv") else None, csv=spec.get("csv"),
                                  target=spec.get("target"))
    split = dataset.splits(n_splits=spec.get("folds", 10), seed=spec.get("seed", 0))[meta.get("fold", 0)]
    model = load_model(payload, map_location=device)
    return evaluate_split(model, split, num_samples=num_samples, device=device, seed=spec.get("seed", 0))


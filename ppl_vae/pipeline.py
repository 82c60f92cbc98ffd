"""The main job: a table data set -> seeded K-fold splits -> train a model per split -> the HH-VAEM paper's metrics (Peis et al. 2022 §4).

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
from ppl_vae.infer import distributed as _dist
from ppl_vae.infer.svi import Trainer
from ppl_vae.models import MODELS, TABLE_MODELS, build_model
from ppl_vae.errors import UnknownNameError
from ppl_vae.threads import small_work

__all__ = ["DEFAULT_MODEL_KWARGS", "resolve_dataset", "dataset_from_spec", "fit_split", "run_experiment", "evaluate_checkpoint",
           "resolve_device", "remove_run_outputs"]

_TABLE_DEFAULTS = {"latent_dim": 10, "hidden": [64, 64], "kl_warmup": 500}

#: per-model defaults (paper-sized for the UCI tables). The HMC variants share their base model's, so that the
#: ELBO pre-training of ``hmc-vae``/``hmc-vaem`` is exactly the ``vae``/``vaem`` training it is compared with.
DEFAULT_MODEL_KWARGS: dict[str, dict] = {name: dict(_TABLE_DEFAULTS) for name in (
    "vae", "vaem", "hmc-vae", "hmc-vaem",
    # hierarchical (latent_dim = width of h_1; layers (latent_dim, latent_dim // 2) = the paper's [10, 5]) and
    # importance-weighted models: the same budget, so h-vae/hh-vae and miwae compare with vae like for like
    "h-vae", "h-vaem", "hh-vae", "hh-vaem", "miwae", "miwaem")}


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
                    csv_options: Optional[Mapping[str, Any]] = None, **options: Any) -> TableDataset:
    """A named data set (``load_dataset``) or a user CSV (``from_csv``; NaN/empty cells are missing).

    Args:
        csv_options: for ``csv``: ``sep``, ``na_values``, ``schema`` (a dict), ``drop`` of
            :func:`~ppl_vae.data.dataset.from_csv` (stored in the checkpoint so ``evaluate`` rebuilds the same table).

    Raises:
        UnknownNameError: unknown data set name (lists the valid ones).
        PplVaeError: neither or both of ``name`` and ``csv`` given.
    """
    if (name is None) == (csv is None):
        raise PplVaeError("give exactly one of a data set name (--dataset) or a CSV path (--csv)")
    return load_dataset(name, **options) if csv is None else from_csv(csv, target=target, **dict(csv_options or {}))


def dataset_from_spec(spec: Mapping[str, Any], name: Optional[str] = None) -> TableDataset:
    """Rebuild the data set a checkpoint was trained on from its metadata's ``data`` spec (the one place every
    re-evaluation reads it, so none rebuilds a different table).

    Args:
        spec: ``{"name"} | {"csv", "target", "csv_options"}`` plus an optional ``"target_likelihood"`` (a
            re-declared target, :meth:`~ppl_vae.data.dataset.TableDataset.with_target_likelihood`).
        name: a built-in data set to use instead of the spec's name / CSV (the target re-declaration still applies).

    Raises: what :func:`resolve_dataset` raises; PplVaeError for a spec naming neither a data set nor a CSV.
    """
    if name is None and not spec.get("name") and not spec.get("csv"):
        raise PplVaeError("the checkpoint's metadata names no data set or CSV; pass the data set explicitly")
    if name is not None:
        data = resolve_dataset(name)
    else:
        data = resolve_dataset(spec.get("name") if not spec.get("csv") else None, csv=spec.get("csv"),
                               target=spec.get("target"), csv_options=spec.get("csv_options"))
    like = spec.get("target_likelihood")
    return data if like is None else data.with_target_likelihood(like)


def _check_table_model(model_name: str) -> None:
    if model_name not in MODELS:
        raise UnknownNameError("model", model_name, MODELS)
    if model_name not in TABLE_MODELS:
        raise PplVaeError(f"model {model_name!r} is not a table model; `ppl-vae run`/`fit` train the table models "
                          f"({', '.join(TABLE_MODELS)}); the image models (ug-vae, beta-vae, gmvae, ml-vae) train "
                          "with `ppl-vae ugvae-experiment`")


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


def _spawn_needed(num_processes: int) -> bool:
    """``True`` when ``num_processes > 1`` and this process is not yet in a process group; raises
    :class:`PplVaeError` for a count below 1 or one that differs from the running group's size."""
    n = int(num_processes)
    if n < 1:
        raise PplVaeError(f"--num-processes must be >= 1, got {n}")
    if _dist.is_distributed():
        if n not in (1, _dist.world_size()):
            raise PplVaeError(f"num_processes={n} inside a process group of {_dist.world_size()} processes")
        return False
    return n > 1


def _fit_split_worker(rank: int, world: int, model_name, dataset, split, kwargs):  # noqa: ARG001 - launch API
    model, history = fit_split(model_name, dataset, split, **kwargs)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, history


def _run_experiment_worker(rank: int, world: int, model_name, dataset, kwargs):  # noqa: ARG001 - launch API
    return run_experiment(model_name, dataset, **kwargs)


def _device_name(device: torch.device) -> str:
    """The card's name for a CUDA device (``torch.cuda.get_device_name``), else ``"cpu"``."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@small_work
def fit_split(model_name: str, dataset: TableDataset, split, *, steps: int = 3000, batch_size: int = 128,
              lr: float = 3e-3, device: Union[str, torch.device] = "cpu", seed: int = 0,
              checkpoint: Optional[Union[str, Path]] = None, progress: bool = True,
              model_kwargs: Optional[Mapping[str, Any]] = None, data_spec: Optional[Mapping[str, Any]] = None,
              checkpoint_every: int = 500, overwrite: bool = False, num_processes: int = 1):
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
        num_processes: data-parallel processes (:mod:`ppl_vae.infer.distributed`; ``batch_size`` is the global
            batch). Inside a process group (``torchrun``) it must be 1 or the group's size; outside one, ``> 1``
            spawns that many processes (gloo on CPU, NCCL on CUDA) and returns rank 0's result.

    Returns: ``(model, history)``. The checkpoint's metadata records the data set, split and normaliser so that
    :func:`evaluate_checkpoint` can rebuild the test set.

    Raises: UnknownNameError / PplVaeError (bad model), StaleCheckpointError, NonFiniteLossError,
    TrainingInterrupted (see :class:`~ppl_vae.infer.svi.Trainer`).
    """
    _check_table_model(model_name)
    kwargs = {**DEFAULT_MODEL_KWARGS.get(model_name, {}), **dict(model_kwargs or {})}
    if _spawn_needed(num_processes):  # rank 0's parameters and history come back; the model is rebuilt here
        state, history = _dist.launch(
            _fit_split_worker, int(num_processes), model_name, dataset, split,
            dict(steps=steps, batch_size=batch_size, lr=lr, device=device, seed=seed, checkpoint=checkpoint,
                 progress=progress, model_kwargs=model_kwargs, data_spec=data_spec,
                 checkpoint_every=checkpoint_every, overwrite=overwrite),
            backend=_dist.backend_for(resolve_device(device)), start_method="spawn", timeout=float("inf"))[0]
        model = build_model(model_name, dataset.schema, **kwargs)
        model.load_state_dict(state)
        return model.to(resolve_device(device)).eval(), history
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
    if spec.get("target_likelihood"):
        settings["target_likelihood"] = str(spec["target_likelihood"])
    if checkpoint is not None and overwrite:
        if _dist.rank() == 0:
            _remove_checkpoint(Path(checkpoint))
        _dist.barrier()
    meta["num_processes"] = _dist.world_size()
    trainer = Trainer(model, seed=seed, device=device, batch_size=batch_size, lr=lr, checkpoint=checkpoint,
                      checkpoint_every=checkpoint_every, progress=progress, metadata=meta, settings=settings,
                      desc=f"{spec.get('name') or dataset.name} fold {split.fold}")
    history = trainer.fit(split.train, steps)
    return model, history


@small_work
def run_experiment(model_name: str, dataset: TableDataset, *, splits: Optional[int] = None, folds: int = 10,
                   steps: int = 3000, batch_size: int = 128, lr: float = 3e-3, num_samples: int = 1000,
                   device: Union[str, torch.device] = "cpu", seed: int = 0, out: Optional[Union[str, Path]] = None,
                   progress: bool = True, model_kwargs: Optional[Mapping[str, Any]] = None,
                   data_spec: Optional[Mapping[str, Any]] = None, checkpoint_every: int = 500,
                   overwrite: bool = False, num_processes: int = 1) -> xr.Dataset:
    """Train and evaluate ``model_name`` on the first ``splits`` of ``folds`` seeded K-fold splits (Peis et al. 2022 §4).

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
        num_processes: data-parallel training processes per fold (see :func:`fit_split`); rank 0 evaluates and
            writes ``results.nc`` / ``results.md`` (attributes ``num_processes``, ``device``, ``device_name``) and
            every rank returns the same results.

    Returns:
        the per-split metrics as an ``xarray.Dataset`` (see :func:`~ppl_vae.infer.evaluation.results_dataset`).
        ``results.nc`` / ``results.md`` are written atomically.

    Raises:
        UnknownNameError / PplVaeError: unknown or non-table model; ``splits`` larger than ``folds``.
        StaleCheckpointError: a checkpoint in ``out`` trained with other settings (names the first one).
        NonFiniteLossError, TrainingInterrupted: see :class:`~ppl_vae.infer.svi.Trainer`.
    """
    _check_table_model(model_name)
    if _spawn_needed(num_processes):
        return _dist.launch(_run_experiment_worker, int(num_processes), model_name, dataset,
                            dict(splits=splits, folds=folds, steps=steps, batch_size=batch_size, lr=lr,
                                 num_samples=num_samples, device=device, seed=seed, out=out, progress=progress,
                                 model_kwargs=model_kwargs, data_spec=data_spec, checkpoint_every=checkpoint_every,
                                 overwrite=overwrite),
                            backend=_dist.backend_for(resolve_device(device)), start_method="spawn",
                            timeout=float("inf"))[0]
    splits = folds if splits is None else int(splits)
    if not 1 <= splits <= max(folds, 1):
        raise PplVaeError(f"--splits must be between 1 and --folds={folds}, got {splits}")
    device = resolve_device(device)
    spec = dict(data_spec or {"name": dataset.name})
    spec.update({"folds": int(folds), "seed": int(seed)})
    out = Path(out) if out is not None else None
    if out is not None and overwrite:
        if _dist.rank() == 0:
            remove_run_outputs(out)
        _dist.barrier()
    per_split = []
    for split in dataset.splits(n_splits=folds, seed=seed)[:splits]:
        ckpt = out / f"fold{split.fold}" / "checkpoint.pt" if out is not None else None
        model, _ = fit_split(model_name, dataset, split, steps=steps, batch_size=batch_size, lr=lr, device=device,
                             seed=seed + split.fold, checkpoint=ckpt, progress=progress, model_kwargs=model_kwargs,
                             data_spec=spec, checkpoint_every=checkpoint_every)
        metrics = None
        if _dist.rank() == 0:  # rank 0 evaluates; the others receive its metrics
            metrics = evaluate_split(model, split, num_samples=num_samples, device=device, seed=seed)
        per_split.append(_dist.broadcast_object(metrics))
    results = results_dataset(per_split, model_name, dataset.name,
                              attrs={"folds": folds, "steps": steps, "num_samples": num_samples, "seed": seed,
                                     "device": str(device), "device_name": _device_name(device),
                                     "num_processes": _dist.world_size()})
    if out is not None and _dist.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "results.nc", lambda tmp: results.to_netcdf(tmp, engine="scipy"))
        _atomic_write(out / "results.md",
                      lambda tmp: tmp.write_text(f"# {model_name} on {dataset.name}\n\n{format_table(results)}\n"))
    return results


@small_work
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
        dataset = dataset_from_spec(spec)
    split = dataset.splits(n_splits=spec.get("folds", 10), seed=spec.get("seed", 0))[meta.get("fold", 0)]
    model = load_model(payload, map_location=device)
    return evaluate_split(model, split, num_samples=num_samples, device=device, seed=spec.get("seed", 0))


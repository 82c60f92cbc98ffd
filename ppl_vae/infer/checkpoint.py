"""Checkpoints that are safe to open: plain types and tensors only, read with ``torch.load(weights_only=True)``.

A checkpoint is one ``torch.save`` file holding a dict of tensors and plain Python values (``dict``, ``list``,
``tuple``, ``str``, ``int``, ``float``, ``bool``, ``None``): the model's registry name and constructor config, its
``state_dict``, Pyro's parameter store (unconstrained values plus the constraint *by name*, see
:func:`constraint_to_spec`), the optimiser state, the training position, the RNG states (:func:`rng_state`, with
Python's and NumPy's states turned into lists/tensors), the training history and the *settings* a resume must
match (seed, folds, fold, steps, learning rate, batch size, model config, sha256 of the training data).

Nothing in a checkpoint is executed: the file is read with PyTorch's restricted unpickler
(``weights_only=True``), which refuses any class outside tensors and builtin containers, and the model class is
looked up by name in :data:`ppl_vae.models.MODELS` (:func:`ppl_vae.models.model_class`) — never imported from a
string stored in the file. Writes are atomic (temporary file in the same directory, ``fsync``, ``os.replace``),
so an interrupted write leaves the previous checkpoint intact and at most an orphaned ``<name>.*.tmp`` file, which
:func:`remove_orphaned_tmp` deletes.

Source: PyTorch serialization notes ("weights_only" restricted unpickler, ``torch.serialization``).
"""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import pyro
import pyro.distributions.constraints as constraints
import torch

from ppl_vae.errors import CheckpointError, StaleCheckpointError

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "load_model", "with_legacy_options", "restore_state",
           "rng_state", "set_rng_state", "param_store_state", "restore_param_store", "constraint_to_spec",
           "spec_to_constraint", "remove_orphaned_tmp", "data_fingerprint", "check_settings",
           "StaleCheckpointError"]

#: version of the payload layout; 1 was the pickled (unsafe) layout, which is refused.
CHECKPOINT_FORMAT = 2


# ---------------------------------------------------------------------- plain-type check
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def _check_plain(obj: Any, where: str = "payload") -> None:
    """Raise :class:`CheckpointError` if ``obj`` holds anything ``torch.load(weights_only=True)`` would refuse
    (numpy scalars and arrays, sets, custom classes), naming where it is."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (dict, OrderedDict)):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise CheckpointError(f"checkpoint {where} has a key of type {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"checkpoint {where} holds a {type(obj).__module__}.{type(obj).__name__}, which a safe "
                          "(weights_only) load refuses; store plain types or tensors")


# ---------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """The torch / CUDA / NumPy / Python global RNG states as tensors and plain types (weights_only-safe).

    Returns: ``{"torch": ByteTensor, "python": {"version", "state" (list of 625 int), "gauss_next"},
    "numpy": {"name", "keys" (int64 tensor (624,)), "pos", "has_gauss", "cached_gaussian"}[, "cuda": [ByteTensor]]}``.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": int(version), "state": [int(v) for v in internal], "gauss_next": gauss_next},
             "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`. Raises :class:`CheckpointError` on a malformed state."""
    try:
        torch.set_rng_state(state["torch"])
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"]))
        npy = state["numpy"]
        np.random.set_state((npy["name"], np.asarray(npy["keys"].numpy(), dtype=np.uint32), int(npy["pos"]),
                             int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"malformed RNG state in checkpoint: {exc}") from exc
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- constraints by name
_SINGLETONS = {name: getattr(constraints, name) for name in (
    "real", "real_vector", "positive", "nonnegative", "softplus_positive", "unit_interval", "simplex",
    "lower_cholesky", "softplus_lower_cholesky", "unit_lower_cholesky", "corr_cholesky", "corr_matrix",
    "positive_definite", "positive_semidefinite", "ordered_vector", "positive_ordered_vector", "sphere",
    "lower_triangular", "symmetric", "square") if hasattr(constraints, name)}
_BOUNDED = {"interval": (constraints.interval, ("lower_bound", "upper_bound")),
            "half_open_interval": (constraints.half_open_interval, ("lower_bound", "upper_bound")),
            "greater_than": (constraints.greater_than, ("lower_bound",)),
            "greater_than_eq": (constraints.greater_than_eq, ("lower_bound",)),
            "less_than": (constraints.less_than, ("upper_bound",))}


def _bound(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return float(v) if v.dim() == 0 else v.detach().cpu().clone()
    return float(v)


def constraint_to_spec(c: Any) -> Union[str, dict]:
    """A ``torch.distributions`` / Pyro constraint as a plain value that names it.

    Known: the singletons ``real``, ``real_vector``, ``positive``, ``nonnegative``, ``softplus_positive``,
    ``unit_interval``, ``simplex``, ``lower_cholesky``, ``corr_cholesky``, ... (returned as their name), the bounded
    ``interval(a, b)``, ``half_open_interval(a, b)``, ``greater_than(a)``, ``greater_than_eq(a)``, ``less_than(b)``
    (``{"name": ..., "args": [...]}``) and ``independent(c, n)`` (``{"name": "independent", "base": spec,
    "ndims": n}``).

    Raises: :class:`CheckpointError` for any other constraint (it could not be rebuilt safely).
    """
    for name, known in _SINGLETONS.items():
        if c is known:
            return name
    for name, (cls, attrs) in _BOUNDED.items():
        if type(c) is cls:
            return {"name": name, "args": [_bound(getattr(c, a)) for a in attrs]}
    if type(c) is constraints.independent:
        return {"name": "independent", "base": constraint_to_spec(c.base_constraint),
                "ndims": int(c.reinterpreted_batch_ndims)}
    raise CheckpointError(f"cannot store the parameter constraint {c!r}: known constraints are "
                          f"{', '.join(list(_SINGLETONS) + list(_BOUNDED))}, independent(...)")


def spec_to_constraint(spec: Union[str, Mapping[str, Any]]) -> Any:
    """Inverse of :func:`constraint_to_spec`. Raises :class:`CheckpointError` for an unknown name."""
    if isinstance(spec, str):
        if spec in _SINGLETONS:
            return _SINGLETONS[spec]
    elif isinstance(spec, Mapping):
        name = spec.get("name")
        if name in _BOUNDED:
            return _BOUNDED[name][0](*spec["args"])
        if name == "independent":
            return constraints.independent(spec_to_constraint(spec["base"]), int(spec["ndims"]))
    raise CheckpointError(f"checkpoint names an unknown parameter constraint {spec!r}")


# ---------------------------------------------------------------------- Pyro param store
def param_store_state(model: Optional[torch.nn.Module] = None) -> dict:
    """Pyro's global param store as ``{name: {"constraint": spec, "key": state_dict key}}`` for parameters that are
    tensors of ``model`` (stored once, in its ``state_dict``) or ``{name: {"constraint": spec, "value": tensor}}``
    (the unconstrained value) for the others.

    Raises: :class:`CheckpointError` for a constraint :func:`constraint_to_spec` does not know.
    """
    state = pyro.get_param_store().get_state()
    owned = {}
    if model is not None:
        owned = {id(p): k for k, p in model.named_parameters()}
    out = {}
    for name, value in state["params"].items():
        entry = {"constraint": constraint_to_spec(state["constraints"][name])}
        if id(value) in owned:
            entry["key"] = owned[id(value)]
        else:
            entry["value"] = value.detach().cpu().clone()
        out[name] = entry
    return out


def restore_param_store(entries: Mapping[str, Mapping[str, Any]], model: Optional[torch.nn.Module] = None,
                        state_dict: Optional[Mapping[str, torch.Tensor]] = None, device: Any = None) -> None:
    """Put the parameters of :func:`param_store_state` back into Pyro's param store (entries not in it are kept).

    A parameter stored by ``key`` becomes the very ``nn.Parameter`` of ``model`` under that key (so that
    ``pyro.module`` keeps training the module's tensor); a key the fresh model does not have yet (a lazily built
    guide such as ``AutoNormal``) takes its value from ``state_dict``, and the guide adopts it on its first call.

    Raises: :class:`CheckpointError` for an unknown constraint or a key found nowhere.
    """
    store = pyro.get_param_store()
    params = dict(model.named_parameters()) if model is not None else {}
    for name, entry in entries.items():
        constraint = spec_to_constraint(entry["constraint"])
        if "key" in entry:
            key = entry["key"]
            if key in params:
                value = params[key]
            elif state_dict is not None and key in state_dict:
                value = torch.nn.Parameter(state_dict[key].detach().clone().to(device or "cpu"))
            else:
                raise CheckpointError(f"checkpoint param store entry {name!r} refers to the missing tensor {key!r}")
        else:
            value = entry["value"].detach().clone().to(device or "cpu").requires_grad_(True)
        if name in store._params:
            del store[name]
        store._params[name] = value
        store._param_to_name[value] = name
        store._constraints[name] = constraint


# ---------------------------------------------------------------------- files
def remove_orphaned_tmp(path: Union[str, Path]) -> list[Path]:
    """Delete ``<path>.*.tmp`` files left by an atomic write that was killed; returns the removed paths."""
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for tmp in path.parent.glob(path.name + ".*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def data_fingerprint(data: Any) -> Optional[str]:
    """sha256 (hex) of a training table's tensors (``x``, ``x_mask``, ``y``, ``y_mask`` bytes, shapes and dtypes);
    ``None`` for data without them (a batch stream)."""
    tensors = [getattr(data, name, None) for name in ("x", "x_mask", "y", "y_mask")]
    if not isinstance(tensors[0], torch.Tensor):
        return None
    h = hashlib.sha256()
    for name, t in zip(("x", "x_mask", "y", "y_mask"), tensors):
        h.update(name.encode())
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bool else t.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: order in which differing settings are reported (the first one is named)
_SETTING_ORDER = ("model", "seed", "folds", "fold", "steps", "lr", "batch_size", "clip_norm", "data", "data_sha256",
                  "config")


def check_settings(path: Union[str, Path], stored: Optional[Mapping[str, Any]], asked: Mapping[str, Any],
                   inference_options: Iterable[str] = ()) -> None:
    """Raise :class:`StaleCheckpointError` naming the first setting in which ``stored`` and ``asked`` differ (a
    differing ``config`` names the differing constructor argument, e.g. ``latent_dim``).

    ``inference_options``: config options that change only evaluation
    (:func:`~ppl_vae.models.config.inference_option`, e.g. ``test_sweeps``); they may differ, also be absent from a
    checkpoint written before they existed. Every other option, and every other setting, must be equal."""
    skip = set(inference_options)
    if not stored:
        raise StaleCheckpointError(path, "settings", None, None,
                                   what="no recorded settings (it was not written by Trainer.fit)")
    stored = dict(stored)
    keys = [k for k in _SETTING_ORDER if k in stored or k in asked]
    keys += sorted(k for k in set(stored) | set(asked) if k not in keys)
    for key in keys:
        a, b = stored.get(key), asked.get(key)
        if a == b:
            continue
        if key == "data_sha256":
            raise StaleCheckpointError(path, key, a, b, what="other training data (sha256 "
                                       f"{str(a)[:12]}…, this data {str(b)[:12]}…)")
        if key == "config" and isinstance(a, Mapping) and isinstance(b, Mapping):
            for sub in sorted(set(a) | set(b), key=str):
                if sub not in skip and a.get(sub) != b.get(sub):
                    if sub == "schema":
                        raise StaleCheckpointError(path, "schema", a.get(sub), b.get(sub),
                                                   what="another column schema than this data's")
                    raise StaleCheckpointError(path, sub, a.get(sub), b.get(sub))
            continue
        raise StaleCheckpointError(path, key, a, b)


# ---------------------------------------------------------------------- save / load
def save_checkpoint(path: Union[str, Path], model: torch.nn.Module, **extra: Any) -> Path:
    """Atomically write ``{format, model_name, config, state_dict, param_store, **extra}`` to ``path``.

    ``extra`` values must be tensors or plain types (checked before writing). Returns the path.

    Raises:
        CheckpointError: a value a safe load would refuse (names where it is), or an unknown param constraint.
        OSError: the directory cannot be written (the old file is left intact).
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "model_name": str(model.name), "config": model.config,
               "state_dict": model.state_dict(), "param_store": param_store_state(model), **extra}
    _check_plain(payload)
    _atomic_torch_save(payload, path)
    return path


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file does not exist, is not a ppl_vae checkpoint, has another format, or holds
            anything but tensors and plain types (e.g. a crafted pickle: it is refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(f"refusing to load {str(path)!r}: it holds objects other than tensors and plain "
                                  "types (it is not a ppl_vae checkpoint, or was written by an older, unsafe "
                                  "version); nothing in it was run") from None
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {first}") from None
    if not isinstance(payload, dict) or "format" not in payload or "model_name" not in payload:
        raise CheckpointError(f"{str(path)!r} is not a ppl_vae checkpoint")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} has checkpoint format {payload['format']!r}; this version reads "
                              f"format {CHECKPOINT_FORMAT}: retrain it (use --overwrite)")
    return payload


def restore_state(model: torch.nn.Module, payload: Mapping[str, Any], device: Any = None) -> None:
    """Load a checkpoint's ``state_dict`` into ``model`` and its param store into Pyro's.

    State-dict keys the fresh model lacks are accepted only when the param store holds them (a guide that builds
    its parameters on first call, e.g. ``AutoNormal``); a key the model has but the checkpoint lacks is an error.

    Raises: :class:`CheckpointError` (names the keys / the shape mismatch).
    """
    sd = payload["state_dict"]
    entries = payload.get("param_store") or {}
    lazy = {e["key"] for e in entries.values() if "key" in e}
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint parameters do not match {type(model).__name__}: "
                              f"{str(exc).splitlines()[-1].strip()}") from None
    unexpected = [k for k in result.unexpected_keys if k not in lazy]
    if result.missing_keys or unexpected:
        raise CheckpointError(f"checkpoint parameters do not match {type(model).__name__}: missing "
                              f"{result.missing_keys[:5]}, unexpected {unexpected[:5]}")
    restore_param_store(entries, model, sd, device)


def with_legacy_options(cls, config: Mapping) -> dict:
    """``config`` (a checkpoint's constructor arguments) completed with the values ``cls`` had *before* options that
    were added later (the class attribute ``legacy_config``; today's defaults are never used), so an old checkpoint
    is rebuilt and judged as the model it was trained as. Keys present in ``config`` win."""
    return {**getattr(cls, "legacy_config", {}), **config}


def load_model(path_or_payload: Union[str, Path, dict], map_location: Union[str, torch.device] = "cpu"):
    """Rebuild the model of a checkpoint and load its parameters and Pyro param store.

    The class comes only from the registry: ``ppl_vae.models.model_class(payload["model_name"])``; it is built as
    ``cls(**payload["config"])``. A config written before an option existed is completed with the value the model
    had *before* that option (the class's ``legacy_config``), never with today's default, so an old checkpoint
    rebuilds the model it was trained as.

    Raises:
        CheckpointError: unreadable checkpoint, a model name that is not registered, a config the class rejects, or
            parameters that do not fit the rebuilt model.
    """
    from ppl_vae.errors import UnknownNameError
    from ppl_vae.models import model_class

    payload = path_or_payload if isinstance(path_or_payload, dict) else load_checkpoint(path_or_payload,
                                                                                        map_location)
    try:
        cls = model_class(payload["model_name"])
    except UnknownNameError as exc:
        raise CheckpointError(f"checkpoint holds an unregistered model: {exc}") from None
    config = payload.get("config")
    if not isinstance(config, Mapping):
        raise CheckpointError("checkpoint config is not a dict of constructor arguments")
    config = with_legacy_options(cls, config)
    try:
        model = cls(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot rebuild {payload['model_name']!r} from the checkpoint config: {exc}") from None
    model = model.to(map_location)
    restore_state(model, payload, map_location)
    return model

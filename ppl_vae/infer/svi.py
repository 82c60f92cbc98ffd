"""Training any ppl_vae model with Pyro SVI: stages, parameter groups, seed, device, progress, checkpoints.

A model lists its stages (:meth:`ppl_vae.models.base.LatentVariableModel.training_stages`); :class:`Trainer` runs
each with ``pyro.infer.SVI`` and a ``pyro.optim.ClippedAdam`` (``PyroOptim`` keeps one optimiser per parameter, so
parameter groups with their own learning rates — encoder, decoder, step sizes, inflation — are wired once here
from the stage's ``param_lrs``, never per model). Checkpoints store the model config, parameters, optimiser state,
stage/step position, RNG states and history; writes are atomic (temporary file + ``os.replace``) so a crash never
leaves a broken checkpoint, and :meth:`Trainer.fit` resumes from one.
"""
from __future__ import annotations

import importlib
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import pyro
import pyro.optim
import torch
from pyro.infer import SVI
from tqdm.auto import tqdm

from ppl_vae.errors import CheckpointError, PplVaeError
from ppl_vae.models.base import Batch, LatentVariableModel

__all__ = ["Trainer", "save_checkpoint", "load_checkpoint", "load_model"]

CHECKPOINT_FORMAT = 1


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


def save_checkpoint(path: Union[str, Path], model: LatentVariableModel, **extra: Any) -> Path:
    """Atomically write ``{config, class, name, state_dict, **extra}`` to ``path`` (``torch.save`` format).

    Returns: the path. Raises: ``OSError`` if the directory cannot be written (the old file is left intact).
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "model_name": model.name,
               "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
               "config": model.config, "state_dict": model.state_dict(), **extra}
    _atomic_torch_save(payload, path)
    return path


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file does not exist, is not a ppl_vae checkpoint, or has an unknown format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a ppl_vae checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def load_model(path_or_payload: Union[str, Path, dict], map_location: Union[str, torch.device] = "cpu"
               ) -> LatentVariableModel:
    """Rebuild the model of a checkpoint (``class(**config)``) and load its parameters.

    Raises:
        CheckpointError: unreadable checkpoint, or parameters that do not fit the rebuilt model.
    """
    payload = path_or_payload if isinstance(path_or_payload, dict) else load_checkpoint(path_or_payload, map_location)
    module_name, _, cls_name = payload["model_class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    model = cls(**payload["config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint parameters do not match {cls_name}: {exc}") from exc
    return model.to(map_location)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Train a :class:`~ppl_vae.models.base.LatentVariableModel` stage by stage with ``pyro.infer.SVI``.

    Args:
        model: the model (its stages come from ``model.training_stages(steps, lr)``).
        seed: seeds Pyro/torch/numpy/python RNGs and the data loader; a fixed seed gives identical results.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; the model and every batch are moved there.
        batch_size: rows per SVI step.
        lr: base learning rate handed to the model's stages.
        clip_norm: gradient-norm clip of ``ClippedAdam``.
        checkpoint: path of the checkpoint file (``None``: no checkpoints).
        checkpoint_every: steps between checkpoint writes (and one at the end of every stage).
        progress: show a tqdm progress bar with the running loss.
        metadata: extra JSON/pickle-able information stored in every checkpoint (e.g. normaliser, data set).

    Raises:
        FloatingPointError: from :meth:`fit` when the loss becomes non-finite (the last checkpoint is kept).
        CheckpointError: from :meth:`fit` when resuming from a checkpoint of another model.
    """

    def __init__(self, model: LatentVariableModel, *, seed: int = 0, device: Union[str, torch.device] = "cpu",
                 batch_size: int = 128, lr: float = 1e-3, clip_norm: float = 10.0,
                 checkpoint: Optional[Union[str, Path]] = None, checkpoint_every: int = 500,
                 progress: bool = True, metadata: Optional[Mapping[str, Any]] = None):
        self.model = model
        self.seed = int(seed)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise PplVaeError("device 'cuda' requested but torch.cuda.is_available() is False")
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.clip_norm = float(clip_norm)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_every = int(checkpoint_every)
        self.progress = progress
        self.metadata = dict(metadata or {})
        self.history: list[dict] = []

    # ------------------------------------------------------------------ data
    def _batches(self, data: Any) -> Iterator[Batch]:
        if hasattr(data, "loader"):
            return iter(data.loader(self.batch_size, seed=self.seed, train_missingness=True, device=self.device))
        if isinstance(data, Batch):
            def repeat():
                while True:
                    yield data.to(self.device)
            return repeat()
        if callable(data):
            return (b.to(self.device) for b in data())
        if iter(data) is data:  # a one-shot iterator/generator: used as it is
            return (b.to(self.device) for b in data)

        def cycle():  # a re-iterable (list, sampler with epochs): cycled when exhausted
            while True:
                empty = True
                for b in data:
                    empty = False
                    yield b.to(self.device)
                if empty:
                    raise PplVaeError("the batch stream given to Trainer.fit is empty")
        return cycle()

    # ------------------------------------------------------------------ optimiser
    def _optimizer(self, stage) -> pyro.optim.PyroOptim:
        lrs = dict(stage.param_lrs or {})
        base, clip = stage.lr, self.clip_norm

        def per_param(module_name: Optional[str], param_name: str) -> dict:
            name = module_name or param_name
            lr = next((v for prefix, v in lrs.items() if name.startswith(prefix)), base)
            return {"lr": lr, "clip_norm": clip}

        return pyro.optim.ClippedAdam(per_param)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Optional[Union[str, Path]] = None, *, stage_index: int = 0, stage_step: int = 0,
             optim: Optional[pyro.optim.PyroOptim] = None, finished: bool = False) -> Optional[Path]:
        """Atomically write a resumable checkpoint (model config + parameters + optimiser state + position)."""
        path = Path(path) if path is not None else self.checkpoint
        if path is None:
            return None
        return save_checkpoint(
            path, self.model, stage_index=stage_index, stage_step=stage_step, finished=finished,
            optim_state=optim.get_state() if optim is not None else None, history=self.history,
            rng=_rng_state(), trainer={"seed": self.seed, "batch_size": self.batch_size, "lr": self.lr},
            metadata=self.metadata)

    def _resume_state(self) -> Optional[dict]:
        if self.checkpoint is None or not self.checkpoint.exists():
            return None
        state = load_checkpoint(self.checkpoint, map_location=self.device)
        if state["model_name"] != self.model.name or state["config"] != self.model.config:
            raise CheckpointError(f"checkpoint {str(self.checkpoint)!r} holds a {state['model_name']!r} model with "
                                  "another configuration; use another --out directory or delete it")
        self.model.load_state_dict(state["state_dict"])
        return state

    # ------------------------------------------------------------------ training
    def fit(self, data: Any, steps: int, *, resume: bool = True) -> list[dict]:
        """Run every training stage of the model.

        Args:
            data: a ``ppl_vae.data.TensorTable`` (batches from its seeded ``loader`` with train-time missingness,
                METHODS §8), a single :class:`Batch` (full-batch training), a re-iterable of :class:`Batch` es
                (cycled), a one-shot iterator, or a zero-argument callable returning an iterator.
            steps: total SVI steps, split across stages by the model.
            resume: continue from ``self.checkpoint`` if it exists (a finished checkpoint returns at once).

        Returns:
            the history: one dict per step ``{"stage", "step", "loss"}`` (loss = negative ELBO or stage objective
            per datapoint) plus the stage objective's extra statistics when it reports them.
        """
        self.model.to(self.device)
        stages = self.model.training_stages(int(steps), self.lr)
        pyro.set_rng_seed(self.seed)
        state = self._resume_state() if resume else None
        start_stage, start_step = 0, 0
        if state is not None:
            self.history = list(state.get("history", []))
            if state.get("finished"):
                return self.history
            start_stage, start_step = state["stage_index"], state["stage_step"]
        batches = self._batches(data)
        done = sum(s.steps for s in stages[:start_stage]) + start_step
        for _ in range(done):  # replay the seeded loader to the resumed position
            next(batches)
        if state is not None:
            _set_rng_state(state["rng"])
        for si, stage in enumerate(stages):
            if si < start_stage:
                continue
            pyro.clear_param_store()
            optim = self._optimizer(stage)
            if state is not None and si == start_stage and state.get("optim_state"):
                optim.set_state(state["optim_state"])
            svi = SVI(stage.model, stage.guide, optim, stage.loss)
            first = start_step if si == start_stage else 0
            bar = tqdm(range(first, stage.steps), desc=f"{self.model.name}:{stage.name}", disable=not self.progress,
                       initial=first, total=stage.steps, dynamic_ncols=True, leave=False)
            running = None
            for t in bar:
                if stage.on_step is not None:
                    stage.on_step(t)
                batch = next(batches)
                loss = svi.step(batch) / batch.size
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss at stage {stage.name!r} step {t} of {self.model.name!r}; last checkpoint "
                        f"kept at {self.checkpoint}" if self.checkpoint else
                        f"non-finite loss at stage {stage.name!r} step {t} of {self.model.name!r}")
                record = {"stage": stage.name, "step": t, "loss": loss}
                stats = getattr(stage.loss, "last_stats", None)
                if stats:
                    record.update({k: float(v) for k, v in stats.items()})
                self.history.append(record)
                running = loss if running is None else 0.98 * running + 0.02 * loss
                if t % 10 == 0 or t == stage.steps - 1:
                    bar.set_postfix(loss=f"{running:.3f}", **({k: f"{float(v):.3g}" for k, v in stats.items()}
                                                              if stats else {}))
                if self.checkpoint is not None and (t + 1) % self.checkpoint_every == 0 and t + 1 < stage.steps:
                    self.save(stage_index=si, stage_step=t + 1, optim=optim)
            bar.close()
            if self.checkpoint is not None:
                last = si == len(stages) - 1
                self.save(stage_index=si + 1 if not last else si, stage_step=0 if not last else stage.steps,
                          optim=None if not last else optim, finished=last)
        self.model.eval()
        return self.history

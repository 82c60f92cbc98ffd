"""Training any ppl_vae model with Pyro SVI: stages, parameter groups, seed, device, progress, checkpoints.

A model lists its stages (:meth:`ppl_vae.models.base.LatentVariableModel.training_stages`); :class:`Trainer` runs
each with ``pyro.infer.SVI`` and a ``pyro.optim.ClippedAdam`` (``PyroOptim`` keeps one optimiser per parameter, so
parameter groups with their own learning rates — encoder, decoder, step sizes, inflation — are wired once here
from the stage's ``param_lrs``, never per model).

Checkpoints (:mod:`ppl_vae.infer.checkpoint`: tensors and plain types only, read with ``weights_only=True``) store
the model config, parameters, Pyro's param store, optimiser state, stage/step position, RNG states, history and the
settings a resume must match; writes are atomic (temporary file + ``os.replace``), orphaned temporary files are
removed on start, and :meth:`Trainer.fit` resumes bit-identically from a checkpoint with the same settings.
While :meth:`Trainer.fit` runs, SIGINT/SIGTERM finish the current step, write a checkpoint and raise
:class:`~ppl_vae.errors.TrainingInterrupted`; a non-finite loss (or Pyro's validation error on a NaN parameter)
raises :class:`~ppl_vae.errors.NonFiniteLossError` naming stage and step.
"""
from __future__ import annotations

import itertools
import math
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI
from tqdm.auto import tqdm

from ppl_vae.errors import CheckpointError, NonFiniteLossError, PplVaeError, TrainingInterrupted
from ppl_vae.infer.checkpoint import (check_settings, data_fingerprint, load_checkpoint, load_model,
                                      remove_orphaned_tmp, restore_param_store, restore_state, rng_state,
                                      save_checkpoint, set_rng_state)
from ppl_vae.models.base import Batch, LatentVariableModel

__all__ = ["Trainer", "save_checkpoint", "load_checkpoint", "load_model"]

#: signals the trainer turns into "finish the step, checkpoint, raise TrainingInterrupted"
_STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


def _is_invalid_parameter_error(exc: BaseException) -> bool:
    """Whether a ``ValueError`` from inside an SVI step is a distribution's argument validation tripping on NaN/inf
    parameters (``torch.distributions`` "Expected parameter ... found invalid values")."""
    text = str(exc)
    return "found invalid values" in text or ("Expected parameter" in text and "nan" in text.lower())


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
        metadata: extra information stored in every checkpoint (plain types / tensors only: it is read back with
            ``torch.load(weights_only=True)``), e.g. the data set, fold and normaliser.
        settings: extra settings a resume must match exactly (e.g. ``{"seed": user seed, "folds", "fold"}``); they
            are merged over the trainer's own ``model, config, seed, steps, lr, batch_size, clip_norm, data_sha256``.
        handle_signals: catch SIGINT/SIGTERM while :meth:`fit` runs (main thread only): the current step is
            finished, a checkpoint written, and :class:`~ppl_vae.errors.TrainingInterrupted` raised.

    Raises:
        NonFiniteLossError: from :meth:`fit` when the loss becomes non-finite or a distribution parameter NaN
            (message: stage, step, "try a lower learning rate", the last checkpoint only if one exists).
        StaleCheckpointError: from :meth:`fit` when the checkpoint was trained with other settings.
        CheckpointError: from :meth:`fit` when the checkpoint cannot be read or holds another model.
        TrainingInterrupted: from :meth:`fit` after SIGINT/SIGTERM (checkpoint written first).
    """

    def __init__(self, model: LatentVariableModel, *, seed: int = 0, device: Union[str, torch.device] = "cpu",
                 batch_size: int = 128, lr: float = 1e-3, clip_norm: float = 10.0,
                 checkpoint: Optional[Union[str, Path]] = None, checkpoint_every: int = 500,
                 progress: bool = True, metadata: Optional[Mapping[str, Any]] = None,
                 settings: Optional[Mapping[str, Any]] = None, handle_signals: bool = True):
        self.model = model
        self.seed = int(seed)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise PplVaeError("device 'cuda' requested but torch.cuda.is_available() is False")
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.clip_norm = float(clip_norm)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.progress = progress
        self.metadata = dict(metadata or {})
        self.extra_settings = dict(settings or {})
        self.handle_signals = handle_signals
        self.history: list[dict] = []
        self._stop_signal: Optional[int] = None
        self._settings: dict = {}

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

    # ------------------------------------------------------------------ settings
    def settings(self, steps: int, data: Any = None) -> dict:
        """The settings a checkpoint must match to be resumed: ``model`` (registry name), ``config``, ``seed``,
        ``steps``, ``lr``, ``batch_size``, ``clip_norm``, ``data_sha256`` (of a table's tensors, see
        :func:`~ppl_vae.infer.checkpoint.data_fingerprint`; ``None`` for a batch stream), then ``settings``."""
        out = {"model": str(self.model.name), "config": self.model.config, "seed": self.seed, "steps": int(steps),
               "lr": self.lr, "batch_size": self.batch_size, "clip_norm": self.clip_norm,
               "data_sha256": data_fingerprint(data) if data is not None else None}
        out.update(self.extra_settings)
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Optional[Union[str, Path]] = None, *, stage_index: int = 0, stage_step: int = 0,
             optim: Optional[pyro.optim.PyroOptim] = None, finished: bool = False) -> Optional[Path]:
        """Atomically write a resumable checkpoint (model config + parameters + Pyro param store + optimiser state
        + position + RNG states + history + settings), see :func:`~ppl_vae.infer.checkpoint.save_checkpoint`."""
        path = Path(path) if path is not None else self.checkpoint
        if path is None:
            return None
        return save_checkpoint(
            path, self.model, stage_index=int(stage_index), stage_step=int(stage_step), finished=bool(finished),
            optim_state=optim.get_state() if optim is not None else None, history=self.history,
            rng=rng_state(), trainer={"seed": self.seed, "batch_size": self.batch_size, "lr": self.lr},
            settings=self._settings, metadata=self.metadata)

    def _resume_state(self) -> Optional[dict]:
        if self.checkpoint is None or not self.checkpoint.exists():
            return None
        state = load_checkpoint(self.checkpoint, map_location=self.device)
        if state["model_name"] != self.model.name:
            raise CheckpointError(f"checkpoint {str(self.checkpoint)!r} holds a {state['model_name']!r} model, not "
                                  f"{self.model.name!r}; use --overwrite or another --out directory")
        check_settings(self.checkpoint, state.get("settings"), self._settings)
        restore_state(self.model, state, self.device)
        return state

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self._stop_signal is not None and signum == getattr(signal, "SIGINT", None):
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last checkpoint is kept)
        self._stop_signal = signum

    @contextmanager
    def _signals(self):
        """Install the stop handlers for the duration of :meth:`fit` (main thread only) and restore the previous
        ones afterwards."""
        self._stop_signal = None
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}
        try:
            for sig in _STOP_SIGNALS:
                previous[sig] = signal.signal(sig, self._on_signal)
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _non_finite(self, stage: str, step: int, detail: str) -> NonFiniteLossError:
        where = f"at stage {stage!r} step {step} of {self.model.name!r} ({detail}, lr={self.lr:g})"
        hint = f"; try a lower learning rate, e.g. lr={min(self.lr / 10, 3e-3):g}"
        if self.checkpoint is not None and self.checkpoint.exists():
            hint += f"; the last good checkpoint is {self.checkpoint}"
        return NonFiniteLossError(f"training diverged {where}{hint}")

    def _has_lazy_params(self, state: Mapping[str, Any]) -> bool:
        owned = {k for k, _ in self.model.named_parameters()}
        return any("key" in e and e["key"] not in owned for e in (state.get("param_store") or {}).values())

    def _build_lazy_guide(self, stage, batches: Iterator[Batch]) -> Iterator[Batch]:
        """Run the guide once on the next batch (not consumed) with the RNG states saved and restored, so that a
        guide that builds its parameters on first call (``AutoNormal``; its ``init_to_feasible`` draws a sample)
        adopts the restored param store without shifting the random stream of the resumed run."""
        first = next(batches)
        saved = rng_state()
        with poutine.block():
            poutine.trace(stage.guide).get_trace(first)
        set_rng_state(saved)
        return itertools.chain([first], batches)

    # ------------------------------------------------------------------ training
    def fit(self, data: Any, steps: int, *, resume: bool = True) -> list[dict]:
        """Run every training stage of the model.

        Args:
            data: a ``ppl_vae.data.TensorTable`` (batches from its seeded ``loader`` with train-time missingness,
                METHODS §8), a single :class:`Batch` (full-batch training), a re-iterable of :class:`Batch` es
                (cycled), a one-shot iterator, or a zero-argument callable returning an iterator.
            steps: total SVI steps, split across stages by the model.
            resume: continue from ``self.checkpoint`` if it exists (a finished checkpoint returns at once); its
                settings (:meth:`settings`) must equal this run's.

        Returns:
            the history: one dict per step ``{"stage", "step", "loss"}`` (loss = negative ELBO or stage objective
            per datapoint) plus the stage objective's extra statistics when it reports them.

        Raises:
            see the class docstring (NonFiniteLossError, StaleCheckpointError, CheckpointError, TrainingInterrupted).
        """
        with self._signals():
            return self._fit(data, steps, resume)

    def _fit(self, data: Any, steps: int, resume: bool) -> list[dict]:
        self.model.to(self.device)
        if self.checkpoint is not None:
            remove_orphaned_tmp(self.checkpoint)
        stages = self.model.training_stages(int(steps), self.lr)
        self._settings = self.settings(steps, data if hasattr(data, "x") else None)
        pyro.set_rng_seed(self.seed)
        state = self._resume_state() if resume else None
        start_stage, start_step = 0, 0
        if state is not None:
            self.history = list(state.get("history", []))
            if state.get("finished"):
                self.model.eval()
                return self.history
            start_stage, start_step = state["stage_index"], state["stage_step"]
        batches = self._batches(data)
        done = sum(s.steps for s in stages[:start_stage]) + start_step
        for _ in range(done):  # replay the seeded loader to the resumed position
            next(batches)
        if state is not None:
            set_rng_state(state["rng"])
        for si, stage in enumerate(stages):
            if si < start_stage:
                continue
            pyro.clear_param_store()
            optim = self._optimizer(stage)
            if state is not None and si == start_stage:
                restore_param_store(state.get("param_store") or {}, self.model, state["state_dict"], self.device)
                if state.get("optim_state"):
                    optim.set_state(state["optim_state"])
                if self._has_lazy_params(state):
                    batches = self._build_lazy_guide(stage, batches)
            svi = SVI(stage.model, stage.guide, optim, stage.loss)
            first = start_step if si == start_stage else 0
            bar = tqdm(range(first, stage.steps), desc=f"{self.model.name}:{stage.name}", disable=not self.progress,
                       initial=first, total=stage.steps, dynamic_ncols=True, leave=False)
            running = None
            for t in bar:
                if stage.on_step is not None:
                    stage.on_step(t)
                batch = next(batches)
                try:
                    loss = svi.step(batch) / batch.size
                except ValueError as exc:
                    if isinstance(exc, PplVaeError) or not _is_invalid_parameter_error(exc):
                        raise
                    bar.close()
                    raise self._non_finite(stage.name, t, "a distribution parameter became NaN") from None
                if not math.isfinite(loss):
                    bar.close()
                    raise self._non_finite(stage.name, t, f"loss {loss}")
                record = {"stage": stage.name, "step": t, "loss": loss}
                stats = getattr(stage.loss, "last_stats", None)
                if stats:
                    record.update({k: float(v) for k, v in stats.items()})
                self.history.append(record)
                running = loss if running is None else 0.98 * running + 0.02 * loss
                if t % 10 == 0 or t == stage.steps - 1:
                    bar.set_postfix(loss=f"{running:.3f}", **({k: f"{float(v):.3g}" for k, v in stats.items()}
                                                              if stats else {}))
                if self._stop_signal is not None and t + 1 < stage.steps:
                    bar.close()
                    self.save(stage_index=si, stage_step=t + 1, optim=optim)
                    raise TrainingInterrupted(self._stop_signal, self.checkpoint, stage.name, t + 1)
                if self.checkpoint is not None and (t + 1) % self.checkpoint_every == 0 and t + 1 < stage.steps:
                    self.save(stage_index=si, stage_step=t + 1, optim=optim)
            bar.close()
            last = si == len(stages) - 1
            if self.checkpoint is not None:
                self.save(stage_index=si + 1 if not last else si, stage_step=0 if not last else stage.steps,
                          optim=None if not last else optim, finished=last)
            if self._stop_signal is not None and not last:
                raise TrainingInterrupted(self._stop_signal, self.checkpoint, stages[si + 1].name, 0)
        self.model.eval()
        return self.history

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

Data-parallel training (:mod:`ppl_vae.infer.distributed`): when a ``torch.distributed`` process group with
``W > 1`` processes is initialised (``torchrun``, ``ppl-vae run --num-processes W``), every process holds a replica,
trains on its shard of each global batch of ``batch_size`` rows and wraps each stage's loss in
:class:`~ppl_vae.infer.distributed.DistributedObjective`, which all-reduces the gradients of every parameter group
before the optimiser step; Pyro's RNG is seeded per rank (:func:`~ppl_vae.infer.distributed.rank_seed`), the data
loader's seed is shared; rank 0 writes checkpoints (with every rank's RNG state, so resuming is bit-identical) and
shows progress; a signal received by any rank stops every rank at the same step.
"""
from __future__ import annotations

import itertools
import math
import signal
import sys
import threading
import time
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
from ppl_vae.infer import distributed as _dist
from ppl_vae.infer.checkpoint import (check_settings, data_fingerprint, load_checkpoint, load_model,
                                      remove_orphaned_tmp, restore_param_store, restore_state, rng_state,
                                      save_checkpoint, set_rng_state, with_legacy_options)
from ppl_vae.models.base import Batch, LatentVariableModel
from ppl_vae.models.config import inference_option_names

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
        desc: prefix of the progress bar / log lines, e.g. ``"boston fold 3"`` (the bar reads
            ``"boston fold 3 vae:elbo"``).
        log_every: when the progress stream (stderr) is not a TTY (a log file, a pipe, CI), no bar is drawn and one
            line ``"<desc> <model>:<stage> step t/T loss L ..."`` is written every ``log_every`` steps (default:
            a tenth of the stage, at least 1) and at the end of each stage; ``0`` disables those lines.

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
                 settings: Optional[Mapping[str, Any]] = None, handle_signals: bool = True,
                 desc: Optional[str] = None, log_every: Optional[int] = None):
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
        self.desc = desc
        self.log_every = log_every
        self.history: list[dict] = []
        #: data-parallel communication of the last :meth:`fit`: steps, bytes all-reduced per step, seconds in the
        #: all-reduce (waiting for the slowest rank included); zeros for one process
        self.comm_stats: dict = {"steps": 0, "bytes_per_step": 0, "seconds": 0.0}
        self._stop_signal: Optional[int] = None
        self._settings: dict = {}

    # ------------------------------------------------------------------ data
    def _batches(self, data: Any) -> Iterator[Batch]:
        world = _dist.world_size()
        if world == 1:
            return self._local_batches(data)
        # data parallel: every rank draws the same global stream (shared seed) and keeps its share
        rank = _dist.rank()
        if hasattr(data, "loader"):
            stream = data.loader(self.batch_size, seed=self.seed, train_missingness=True)
            return (b.to(self.device) for b in _dist.shard_batches(stream, rank, world, rows=True))
        if isinstance(data, Batch):
            shard = data[_dist.shard_slice(data.size, rank, world)]
            return self._local_batches(shard)
        return _dist.shard_batches(self._local_batches(data), rank, world, rows=False)

    def _local_batches(self, data: Any) -> Iterator[Batch]:
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
        if _dist.world_size() > 1:  # recorded only when > 1, so single-process checkpoints keep their settings
            out["num_processes"] = _dist.world_size()
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
        extra = {}
        rng = rng_state()
        if _dist.world_size() > 1:  # a collective: every rank calls save at the same step; rank 0 writes
            extra = {"rng_ranks": _dist.gather_objects(rng), "num_processes": _dist.world_size()}
            if _dist.rank() != 0:
                return None
        return save_checkpoint(
            path, self.model, stage_index=int(stage_index), stage_step=int(stage_step), finished=bool(finished),
            optim_state=optim.get_state() if optim is not None else None, history=self.history,
            rng=rng, trainer={"seed": self.seed, "batch_size": self.batch_size, "lr": self.lr},
            settings=self._settings, metadata=self.metadata, **extra)

    def _resume_state(self) -> Optional[dict]:
        if self.checkpoint is None or not self.checkpoint.exists():
            return None
        state = load_checkpoint(self.checkpoint, map_location=self.device)
        if state["model_name"] != self.model.name:
            raise CheckpointError(f"checkpoint {str(self.checkpoint)!r} holds a {state['model_name']!r} model, not "
                                  f"{self.model.name!r}; use --overwrite or another --out directory")
        stored, asked = state.get("settings"), self._settings
        if stored and ("num_processes" in stored or "num_processes" in asked):  # absent means 1 process
            stored, asked = {"num_processes": 1, **stored}, {"num_processes": 1, **asked}
        if stored and isinstance(stored.get("config"), dict):  # options added later: what old checkpoints did
            stored = {**stored, "config": with_legacy_options(type(self.model), stored["config"])}
        config_cls = getattr(type(self.model), "Config", None)  # the model is built with today's inference options
        check_settings(self.checkpoint, stored, asked,
                       inference_options=inference_option_names(config_cls) if config_cls is not None else ())
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
                Peis et al. 2022 §4), a single :class:`Batch` (full-batch training), a re-iterable of :class:`Batch` es
                (cycled), a one-shot iterator, or a zero-argument callable returning an iterator.
            steps: total SVI steps, split across stages by the model.
            resume: continue from ``self.checkpoint`` if it exists (a finished checkpoint returns at once); its
                settings (:meth:`settings`) must equal this run's.

        Returns:
            the history: one dict per step ``{"stage", "step", "loss"}`` (loss = negative ELBO or stage objective
            per datapoint) plus the stage objective's extra statistics when it reports them.

        Raises:
            see the class docstring (NonFiniteLossError, StaleCheckpointError, CheckpointError, TrainingInterrupted).
            TypeError: ``data`` is a whole data set, a split or a DataFrame (the message says what to pass instead).
        """
        _check_data(data)
        with self._signals():
            return self._fit(data, steps, resume)

    def _fit(self, data: Any, steps: int, resume: bool) -> list[dict]:
        self.model.to(self.device)
        world, rank = _dist.world_size(), _dist.rank()
        if self.checkpoint is not None and rank == 0:
            remove_orphaned_tmp(self.checkpoint)
        stages = self.model.training_stages(int(steps), self.lr)
        self._settings = self.settings(steps, data if hasattr(data, "x") else None)
        pyro.set_rng_seed(_dist.rank_seed(self.seed, rank))
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
            ranks = state.get("rng_ranks")
            set_rng_state(ranks[rank] if world > 1 and ranks and len(ranks) == world else state["rng"])
        if world > 1:
            _dist.broadcast_module(self.model)  # identical replicas, whatever each process built
        show = self.progress and rank == 0
        tty = _isatty(sys.stderr)
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
            objective = None
            if world > 1:  # all-reduce every parameter group's gradient before the optimiser step
                objective = _dist.DistributedObjective(stage.loss, local_stop=lambda: self._stop_signal)
            svi = SVI(stage.model, stage.guide, optim, objective if objective is not None else stage.loss)
            first = start_step if si == start_stage else 0
            label = f"{self.model.name}:{stage.name}"
            label = f"{self.desc} {label}" if self.desc else label
            bar = tqdm(range(first, stage.steps), desc=label, disable=not (show and tty),
                       initial=first, total=stage.steps, dynamic_ncols=True, leave=False)
            every = self._log_interval(stage.steps) if show and not tty else 0
            started = time.perf_counter()
            running = None
            for t in bar:
                if stage.on_step is not None:
                    stage.on_step(t)
                batch = next(batches)
                try:
                    raw = svi.step(batch)
                except ValueError as exc:
                    if isinstance(exc, PplVaeError) or not _is_invalid_parameter_error(exc):
                        raise
                    bar.close()
                    raise self._non_finite(stage.name, t, "a distribution parameter became NaN") from None
                if objective is not None:  # the global batch's loss and statistics, the same on every rank
                    self.comm_stats["steps"] += 1
                    self.comm_stats["bytes_per_step"] = objective.last_bytes
                    self.comm_stats["seconds"] += objective.last_comm_seconds
                    loss = objective.last_loss / max(objective.last_rows, 1)
                    stats, stop = objective.last_stats, objective.stop_signal
                else:
                    loss = raw / batch.size
                    stats, stop = getattr(stage.loss, "last_stats", None), self._stop_signal
                if not math.isfinite(loss):
                    bar.close()
                    raise self._non_finite(stage.name, t, f"loss {loss}")
                record = {"stage": stage.name, "step": t, "loss": loss}
                if stats:
                    record.update({k: float(v) for k, v in stats.items()})
                self.history.append(record)
                running = loss if running is None else 0.98 * running + 0.02 * loss
                if t % 10 == 0 or t == stage.steps - 1:
                    bar.set_postfix(loss=f"{running:.3f}", **({k: f"{float(v):.3g}" for k, v in stats.items()}
                                                              if stats else {}))
                if every and ((t + 1) % every == 0 or t == stage.steps - 1):
                    _log_line(label, t + 1, stage.steps, running, stats,
                              (t + 1 - first) / max(time.perf_counter() - started, 1e-9))
                if stop is not None and t + 1 < stage.steps:
                    bar.close()
                    self.save(stage_index=si, stage_step=t + 1, optim=optim)
                    raise TrainingInterrupted(stop, self.checkpoint, stage.name, t + 1)
                if self.checkpoint is not None and (t + 1) % self.checkpoint_every == 0 and t + 1 < stage.steps:
                    self.save(stage_index=si, stage_step=t + 1, optim=optim)
            bar.close()
            last = si == len(stages) - 1
            if self.checkpoint is not None:
                self.save(stage_index=si + 1 if not last else si, stage_step=0 if not last else stage.steps,
                          optim=None if not last else optim, finished=last)
            stop = objective.stop_signal if objective is not None else self._stop_signal
            if stop is not None and not last:
                raise TrainingInterrupted(stop, self.checkpoint, stages[si + 1].name, 0)
        self.model.eval()
        return self.history

    def _log_interval(self, steps: int) -> int:
        if self.log_every is not None:
            return max(0, int(self.log_every))
        return max(1, int(steps) // 10)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _log_line(label: str, step: int, steps: int, running: Optional[float], stats: Optional[Mapping[str, float]],
              rate: float) -> None:
    """One progress line for logs (no carriage return): ``label step t/T loss L [stat v ...] (r steps/s)``."""
    extra = "".join(f" {k} {float(v):.3g}" for k, v in (stats or {}).items())
    print(f"{label} step {step}/{steps} loss {running:.4g}{extra} ({rate:.1f} steps/s)", file=sys.stderr,
          flush=True)


def _check_data(data: Any) -> None:
    """Refuse, with a :class:`TypeError` that says what to pass, the objects users most often hand to
    :meth:`Trainer.fit` by mistake: a whole data set, a split, a DataFrame, a bare tensor."""
    kind = type(data).__name__
    if hasattr(data, "splits") and hasattr(data, "schema") and not hasattr(data, "loader"):
        raise TypeError(f"Trainer.fit takes the training rows of one split, not a whole {kind}: pass "
                        "dataset.splits(n_splits=10, seed=0)[k].train (a TensorTable), a Batch, or an iterable of "
                        "Batches")
    if hasattr(data, "train") and hasattr(data, "test") and hasattr(data, "normaliser"):
        raise TypeError(f"Trainer.fit takes training rows, not a {kind}: pass split.train")
    if type(data).__module__.startswith("pandas"):
        raise TypeError(f"Trainer.fit does not take a pandas {kind}: build a data set with "
                        "ppl_vae.from_dataframe(df, target=...) and pass dataset.splits(...)[k].train")
    if isinstance(data, torch.Tensor):
        raise TypeError("Trainer.fit does not take a bare tensor: pass a ppl_vae.models.base.Batch(x=..., "
                        "x_mask=...) or a TensorTable (dataset.splits(...)[k].train)")

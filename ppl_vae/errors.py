"""Exceptions of ppl_vae. Bad input raises a :class:`PplVaeError` (a ``ValueError``, so generic handlers still catch
it; the CLI exits 2 with its one-line message); :class:`TrainingInterrupted` (SIGINT/SIGTERM during training, CLI
exit 130/143) is not an input error."""
from __future__ import annotations

from typing import Iterable

__all__ = ["PplVaeError", "UnknownNameError", "SchemaError", "DataError", "CheckpointError", "StaleCheckpointError",
           "NonFiniteLossError", "TrainingInterrupted"]


class PplVaeError(ValueError):
    """Base class of every ppl_vae input error."""


class UnknownNameError(PplVaeError, KeyError):
    """An unknown data set, model, likelihood or site name; the message lists the valid choices.

    Args:
        kind: what was looked up (``"data set"``, ``"model"``, ``"likelihood"``...).
        name: the name given.
        choices: the valid names.
    """

    def __init__(self, kind: str, name: object, choices: Iterable[str]):
        self.kind, self.name, self.choices = kind, name, sorted(choices)
        super().__init__(f"unknown {kind} {name!r}; valid choices: {', '.join(self.choices)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class SchemaError(PplVaeError):
    """A column schema that does not match the data (missing/extra columns, bad likelihood, bad categories)."""


class DataError(PplVaeError):
    """Data that cannot be modelled: an all-NaN column, inf values, a non-numeric column without categories, a
    missing target column. The message names the column at fault."""


class CheckpointError(PplVaeError):
    """A checkpoint that cannot be read or does not match the model it is loaded into."""


class StaleCheckpointError(CheckpointError):
    """A checkpoint trained with other settings (seed, folds, fold, steps, lr, batch size, model config, data) than
    the ones asked for: resuming from it would label old results with new settings.

    Attributes:
        path: the checkpoint file; key: the first differing setting; stored / asked: its two values.
    """

    def __init__(self, path, key: str, stored: object, asked: object, what: str | None = None):
        self.path, self.key, self.stored, self.asked = path, key, stored, asked
        what = what or f"{key}={_short(stored)}, you asked {key}={_short(asked)}"
        super().__init__(f"checkpoint {path} was trained with {what}; use --overwrite to retrain into it, or "
                         "another --out")


def _short(v: object) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12] + "…"  # a sha256 digest
    return repr(v) if isinstance(v, str) else str(v)


class NonFiniteLossError(PplVaeError):
    """Training produced a non-finite loss (or a NaN distribution parameter); the message names the stage and step,
    suggests a lower learning rate and names a checkpoint only if one exists on disk."""


class TrainingInterrupted(Exception):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM after finishing the current step and writing a checkpoint.

    Not a :class:`PplVaeError` (the input was fine). Attributes:
        signum: the signal number; checkpoint: the checkpoint written (``None`` when the trainer had none);
        stage, step: where training stopped; exit_code: ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, checkpoint=None, stage: str = "", step: int = 0):
        import signal as _signal

        self.signum, self.checkpoint, self.stage, self.step = int(signum), checkpoint, stage, int(step)
        self.exit_code = 128 + self.signum
        name = _signal.Signals(self.signum).name if self.signum in set(_signal.Signals) else str(self.signum)
        where = f" at stage {stage!r} step {step}" if stage else ""
        saved = (f"; checkpoint written to {checkpoint}" if checkpoint else
                 "; no checkpoint was configured, nothing saved" if stage else "")
        super().__init__(f"interrupted by {name}{where}{saved}")

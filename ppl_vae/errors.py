"""Exceptions raised on bad input. All derive from ``ValueError`` so generic handlers still catch them."""
from __future__ import annotations

from typing import Iterable

__all__ = ["PplVaeError", "UnknownNameError", "SchemaError", "DataError", "CheckpointError"]


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

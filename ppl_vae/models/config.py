"""Typed model configurations: one dataclass per model family, an unknown option is a ``TypeError``.

Every model family declares ``Config``, a dataclass subclass of :class:`ModelConfig` whose fields are the family's
options with their defaults. A model is built either from keyword options (``VAE(schema, latent_dim=5)``) or from a
config object (``VAE(schema, VAE.Config(latent_dim=5))``); :func:`resolve_config` turns both into one validated
config and raises ``TypeError`` naming an unknown option (with the closest valid name), like a Python function
given an unexpected keyword. Checkpoints store ``config.to_dict()`` (plain JSON types) and rebuild the model from it.

Some options change only how a trained model is *evaluated* (e.g. the number of HMC sweeps at test, the quadrature of
a marginal VAE's code), never what training computes. They are declared with :func:`inference_option`; a checkpoint
trained with other values of them is not stale (see :func:`~ppl_vae.infer.checkpoint.check_settings`), and a model
rebuilt from it takes the values asked now.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional, TypeVar

__all__ = ["ModelConfig", "resolve_config", "parse_assignment", "option_names", "inference_option",
           "inference_option_names"]

C = TypeVar("C", bound="ModelConfig")

#: dataclass-field metadata key of an option that only changes evaluation
_INFERENCE = "inference_only"


def inference_option(default: Any) -> Any:
    """A config field (``dataclasses.field`` with ``default``) that changes only how a trained model is evaluated,
    never the training computation: checkpoints trained with another value are reused with the value asked now."""
    return field(default=default, metadata={_INFERENCE: True})


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively (so a config dict round-trips through JSON and ``weights_only`` loading)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class ModelConfig:
    """Base of the typed model configs (a dataclass; subclasses add the fields). Lists given for sequence options
    are stored as tuples, so configs compare equal however they were built (keywords, a checkpoint's dict)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    @classmethod
    def field_names(cls) -> list[str]:
        """The valid option names."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_options(cls: type[C], options: Mapping[str, Any], owner: str = "") -> C:
        """Build from keyword options.

        Raises:
            TypeError: an option that is not a field, naming it and the closest valid option.
        """
        valid = cls.field_names()
        unknown = [k for k in options if k not in valid]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{owner or cls.__name__} got an unknown option {name!r}{hint} "
                            f"(valid options: {', '.join(valid)})")
        return cls(**dict(options))

    def replace(self: C, **changes: Any) -> C:
        """A copy with some options changed. Raises ``TypeError`` on an unknown option."""
        return type(self).from_options({**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        """Plain-type dict of the options (tuples become lists)."""
        return {k: _plain(v) for k, v in asdict(self).items()}


def resolve_config(config_cls: type[C], config: Optional[C], options: Mapping[str, Any], owner: str) -> C:
    """The config of a model built as ``Model(..., config=None, **options)``.

    Args:
        config_cls: the family's config dataclass.
        config: a config object (or a plain dict of options), or ``None``.
        options: keyword options; they override ``config``'s fields.
        owner: the model class name, used in error messages.

    Raises:
        TypeError: an unknown option, or ``config`` of another family's type.
    """
    if config is None:
        return config_cls.from_options(options, owner)
    if isinstance(config, Mapping):
        return config_cls.from_options({**config, **options}, owner)
    if not isinstance(config, config_cls):
        raise TypeError(f"{owner} takes a {config_cls.__name__}, got {type(config).__name__}")
    return config.replace(**options) if options else config


def parse_assignment(item: str) -> tuple[str, Any]:
    """``"FIELD=VALUE"`` -> ``(field, value)``, the value read as a Python literal (``1``, ``0.5``, ``True``,
    ``[4, 2]``) or else kept as a string (``quadrature``), as the command-line ``--set`` options take it.

    Raises: ValueError without ``=`` or with an empty field name."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"expected FIELD=VALUE, got {item!r}")
    import ast
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def option_names(config_cls: type) -> set[str]:
    """The options a model's typed config accepts (its dataclass fields, less the ``schema`` it is built for)."""
    return {f.name for f in fields(config_cls)} - {"schema"}


def inference_option_names(config_cls: type) -> set[str]:
    """The options of ``config_cls`` declared with :func:`inference_option` (they do not change training)."""
    return {f.name for f in fields(config_cls) if f.metadata.get(_INFERENCE)}

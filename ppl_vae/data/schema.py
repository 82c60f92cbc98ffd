"""Column schema of a mixed-type table: one likelihood per column (Ma et al. 2020; Peis et al. 2022).

A :class:`TableSchema` says, for every feature column and for the optional target, which likelihood models it and,
for discrete columns, which original values the category codes ``0..K-1`` stand for. :func:`infer_schema` applies the
reference rules of the HH-VAEM / VAEM code (Peis et al. 2022, Ma et al. 2020):

- a column with fewer than ``max_categories`` (10) distinct observed values is ``bernoulli`` (exactly 2 values) or
  ``categorical`` (3 or more);
- a non-numeric column (object / string / pandas ``category``) is ``bernoulli`` (2 values) or ``categorical``
  whatever its number of values;
- a numeric column whose observed values are all ``>= 0`` is ``loggaussian`` (``log1p`` then standardised);
- any other numeric column is ``gaussian``.

The target is ``gaussian`` for regression (never ``loggaussian``) and ``bernoulli`` / ``categorical`` for
classification (non-numeric, or fewer than ``max_categories`` integer-valued levels). ``poisson`` is never inferred;
declare it explicitly.

Inference also guards against the usual ways a real table is misread (issue 12), with a :class:`SchemaWarning`
(``warnings.warn``) that names the column and says what to do:

- a text column whose observed values are mostly numbers (a numeric column with a text NA token such as
  ``"missing"`` or ``"?"``): the warning names the non-numeric tokens, to be passed as ``na_values``;
- an identifier-like column: one distinct text value per row, or integers ``k, k+1, ..., k+N-1`` (row numbers);
- a text column of dates or times (``2024-05-01``, ``05/01/2024``, ``12:30``).

and refuses (:class:`~ppl_vae.errors.DataError`) datetime / timedelta dtypes, whose values have no likelihood here.
:func:`format_schema` renders a schema for the command line (column -> likelihood, levels).
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import pandas as pd

from ppl_vae.errors import DataError, SchemaError, UnknownNameError

__all__ = ["LIKELIHOODS", "DISCRETE_LIKELIHOODS", "REAL_LIKELIHOODS", "Column", "TableSchema", "infer_schema",
           "sorted_categories", "to_python_scalar", "SchemaWarning", "column_warnings", "check_dtypes",
           "format_schema"]

#: Every per-column likelihood the package knows (Ma et al. 2020; Peis et al. 2022).
LIKELIHOODS: tuple[str, ...] = ("gaussian", "loggaussian", "bernoulli", "categorical", "poisson")
#: Likelihoods whose values are category codes ``0..K-1``.
DISCRETE_LIKELIHOODS: tuple[str, ...] = ("bernoulli", "categorical")
#: Likelihoods that need a numeric column (``poisson`` additionally needs non-negative integers).
REAL_LIKELIHOODS: tuple[str, ...] = ("gaussian", "loggaussian", "poisson")


def to_python_scalar(value: Any) -> Any:
    """Convert a numpy / pandas scalar to the matching plain Python scalar (``int``, ``float``, ``bool``, ``str``)
    so that category tuples are hashable, comparable and JSON-serialisable. Other objects are returned as ``str``."""
    if isinstance(value, np.generic):  # first: np.float64 / np.str_ are also float / str subclasses
        return value.item()
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def sorted_categories(values: Iterable[Any], dtype: Any = None) -> tuple:
    """Distinct values as plain Python scalars, sorted (numbers ascending; mixed types sorted by ``str``). When
    ``dtype`` is a pandas ``CategoricalDtype`` its category order is kept instead (unobserved levels dropped)."""
    uniq = list(dict.fromkeys(to_python_scalar(v) for v in values))
    if isinstance(dtype, pd.CategoricalDtype):
        seen = set(uniq)
        return tuple(c for c in (to_python_scalar(v) for v in dtype.categories) if c in seen)
    try:
        return tuple(sorted(uniq))
    except TypeError:
        return tuple(sorted(uniq, key=str))


@dataclass(frozen=True)
class Column:
    """One column of a table and the likelihood that models it.

    Attributes:
        name: column name in the original data frame.
        likelihood: one of :data:`LIKELIHOODS`.
        categories: for ``bernoulli`` (2) / ``categorical`` (K) columns, the original values in code order: the
            original value ``categories[k]`` is encoded as code ``k``. ``None`` for real / count columns (and for a
            discrete column whose categories are still to be read from the data, see
            :func:`ppl_vae.data.registry.from_dataframe`).

    Raises:
        UnknownNameError: ``likelihood`` is not in :data:`LIKELIHOODS`.
        SchemaError: categories given for a real / count column, a ``bernoulli`` column without exactly 2
            categories, or duplicated categories.
    """

    name: str
    likelihood: str
    categories: Optional[tuple] = None

    def __post_init__(self) -> None:
        if self.likelihood not in LIKELIHOODS:
            raise UnknownNameError("likelihood", f"{self.likelihood} (column {self.name!r})", LIKELIHOODS)
        if self.categories is not None:
            cats = tuple(to_python_scalar(c) for c in self.categories)
            object.__setattr__(self, "categories", cats)
            if self.likelihood not in DISCRETE_LIKELIHOODS:
                raise SchemaError(f"column {self.name!r}: categories given for a {self.likelihood} column")
            if len(set(cats)) != len(cats):
                raise SchemaError(f"column {self.name!r}: duplicated categories {cats}")
            if self.likelihood == "bernoulli" and len(cats) != 2:
                raise SchemaError(f"column {self.name!r}: a bernoulli column needs exactly 2 categories, got {cats}")
            if len(cats) == 0:
                raise SchemaError(f"column {self.name!r}: empty category list")

    @property
    def num_categories(self) -> int | None:
        """``K`` for discrete columns with known categories (2 for ``bernoulli``), else ``None``."""
        if self.likelihood == "bernoulli":
            return 2
        return None if self.categories is None else len(self.categories)

    @property
    def is_discrete(self) -> bool:
        """``True`` for ``bernoulli`` and ``categorical`` columns (values are codes ``0..K-1``)."""
        return self.likelihood in DISCRETE_LIKELIHOODS

    def to_dict(self) -> dict:
        """JSON-serialisable dict ``{"name", "likelihood", "categories"}`` (categories as a list or ``None``)."""
        return {"name": str(self.name), "likelihood": self.likelihood,
                "categories": None if self.categories is None else list(self.categories)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Column":
        """Inverse of :meth:`to_dict`. Raises :class:`SchemaError` on a malformed dict, :class:`UnknownNameError`
        on an unknown likelihood."""
        if not isinstance(d, Mapping) or "name" not in d or "likelihood" not in d:
            raise SchemaError(f"a column must be a dict with 'name' and 'likelihood', got {d!r}")
        cats = d.get("categories")
        return cls(d["name"], d["likelihood"], None if cats is None else tuple(cats))


@dataclass
class TableSchema:
    """Schema of a table: the feature columns in model order (column ``d`` of ``x`` is ``features[d]``) and the
    optional target column.

    Raises:
        SchemaError: duplicated feature names, or the target name also used as a feature.
    """

    features: list[Column]
    target: Optional[Column] = None

    def __post_init__(self) -> None:
        self.features = list(self.features)
        names = [c.name for c in self.features]
        dup = sorted({n for n, k in Counter(names).items() if k > 1}, key=str)
        if dup:
            raise SchemaError(f"duplicated feature column(s) in schema: {dup}")
        if self.target is not None and self.target.name in names:
            raise SchemaError(f"target column {self.target.name!r} is also listed as a feature")

    @property
    def feature_names(self) -> list[str]:
        """Feature names in model order."""
        return [c.name for c in self.features]

    @property
    def num_features(self) -> int:
        """``D``, the number of feature columns."""
        return len(self.features)

    @property
    def likelihoods(self) -> list[str]:
        """Feature likelihoods in model order."""
        return [c.likelihood for c in self.features]

    def column(self, name: str) -> Column:
        """The feature (or target) column called ``name``. Raises :class:`UnknownNameError`."""
        for c in self.features:
            if c.name == name:
                return c
        if self.target is not None and self.target.name == name:
            return self.target
        raise UnknownNameError("column", name, [str(n) for n in self.feature_names])

    def to_dict(self) -> dict:
        """JSON-serialisable dict ``{"features": [column dicts], "target": column dict or None}``."""
        return {"features": [c.to_dict() for c in self.features],
                "target": None if self.target is None else self.target.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TableSchema":
        """Inverse of :meth:`to_dict`. Raises :class:`SchemaError` (malformed) / :class:`UnknownNameError`
        (unknown likelihood)."""
        if not isinstance(d, Mapping) or "features" not in d:
            raise SchemaError(f"a schema must be a dict with a 'features' list, got keys {list(d)!r}"
                              if isinstance(d, Mapping) else f"a schema must be a dict, got {type(d).__name__}")
        target = d.get("target")
        return cls([Column.from_dict(c) for c in d["features"]],
                   None if target is None else Column.from_dict(target))


class SchemaWarning(UserWarning):
    """A column that schema inference accepted but that is probably misread (mostly-numeric text, an identifier,
    dates as text). The message names the column and the fix."""


#: share of numeric observed values above which a text column is reported as "mostly numeric"
MOSTLY_NUMERIC = 0.5
_DATE_RE = re.compile(r"^\s*(\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|\d{1,2}:\d{2})"
                      r"([ T]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?)?\s*(Z|[+-]\d{2}:?\d{2})?\s*$")


def check_dtypes(frame: pd.DataFrame, what: str = "column") -> None:
    """Refuse columns whose dtype has no likelihood: datetime64 (with or without time zone), timedelta64, period
    and interval dtypes.

    Raises:
        DataError: naming the first such column, its dtype and the usual conversion.
    """
    for name in frame.columns:
        dt = frame[name].dtype
        kind = ("datetime" if pd.api.types.is_datetime64_any_dtype(dt) else
                "timedelta" if pd.api.types.is_timedelta64_dtype(dt) else
                "period" if isinstance(dt, pd.PeriodDtype) else
                "interval" if isinstance(dt, pd.IntervalDtype) else None)
        if kind is not None:
            hint = ("convert it to a number, e.g. (df[c] - df[c].min()).dt.days or df[c].dt.dayofyear, or drop it"
                    if kind in ("datetime", "period") else
                    "convert it to a number, e.g. df[c].dt.total_seconds(), or drop it")
            raise DataError(f"{what} {name!r} has dtype {dt}: {kind} values cannot be modelled; {hint}")


def column_warnings(s: pd.Series, max_tokens: int = 5) -> list[str]:
    """Reasons to doubt how column ``s`` will be read (empty list when none); see the module docstring.

    Args:
        s: one column of original values (NaN = missing).
        max_tokens: at most this many offending tokens are named.

    Returns:
        A list of one-line messages, each naming the column.
    """
    out: list[str] = []
    obs = s.dropna()
    n = len(obs)
    if n == 0:
        return out
    name = s.name
    if _is_numeric(s):
        if pd.api.types.is_integer_dtype(s.dtype) and n >= 10:
            v = np.sort(obs.to_numpy(dtype=np.int64))
            if len(np.unique(v)) == n and v[-1] - v[0] == n - 1:
                out.append(f"column {name!r} holds the integers {v[0]}..{v[-1]}, one per row: it looks like a row "
                           "number or identifier and would be modelled as a number; drop it")
        return out
    if pd.api.types.is_bool_dtype(s.dtype):
        return out
    text = obs.astype(str).str.strip()
    num = pd.to_numeric(text, errors="coerce")
    is_num = num.notna().to_numpy()
    if is_num.any() and not is_num.all() and is_num.mean() >= MOSTLY_NUMERIC:
        tokens = list(dict.fromkeys(text[~is_num].tolist()))
        shown = ", ".join(repr(t) for t in tokens[:max_tokens]) + (", ..." if len(tokens) > max_tokens else "")
        out.append(f"column {name!r} is {100 * is_num.mean():.0f}% numbers but also holds the text {shown}: it is "
                   f"read as a {obs.nunique()}-level category; if these mark missing values pass them as na_values "
                   f"(CLI: --na-values {','.join(str(t) for t in tokens[:max_tokens])})")
    uniq = pd.unique(text.to_numpy())
    dates = np.array([bool(_DATE_RE.match(str(u))) for u in uniq[:200]])
    if dates.size and dates.mean() >= 0.8:
        out.append(f"column {name!r} holds dates or times as text (e.g. {str(uniq[0])!r}): they would be modelled "
                   "as a categorical; convert them to a number (e.g. days since the first date) or drop the column")
    elif len(uniq) == n and n >= 10 and is_num.mean() < MOSTLY_NUMERIC:
        out.append(f"column {name!r} has a different value in every row ({n} levels in {n} rows): it looks like an "
                   "identifier and would be modelled as a huge categorical; drop it")
    return out


def format_schema(schema: "TableSchema", max_levels: int = 8) -> str:
    """The schema as aligned text lines, one per column: ``name  likelihood  [K levels: a, b, ...]``, the target
    marked ``(target)``. Used by ``ppl-vae run|fit`` to show what was inferred."""
    cols = [(c, False) for c in schema.features] + ([(schema.target, True)] if schema.target is not None else [])
    width = max(len(str(c.name)) for c, _ in cols) + 2
    lines = []
    for c, is_target in cols:
        extra = ""
        if c.categories is not None:
            levels = ", ".join(str(v) for v in c.categories[:max_levels])
            more = ", ..." if len(c.categories) > max_levels else ""
            extra = f"  {len(c.categories)} levels: {levels}{more}"
        lines.append(f"  {str(c.name):<{width}}{c.likelihood:<12}{extra}{'  (target)' if is_target else ''}")
    return "\n".join(lines)


def _is_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s.dtype) and not isinstance(s.dtype, pd.CategoricalDtype)


def _infer_column(s: pd.Series, max_categories: int, is_target: bool = False) -> Column:
    name = s.name
    obs = s.dropna()
    if len(obs) == 0:
        raise DataError(f"column {name!r} is entirely missing (all NaN); drop it or give it values")
    numeric = _is_numeric(s)
    uniq = pd.unique(obs.to_numpy())
    n = len(uniq)
    if n < 2:
        raise DataError(f"column {name!r} has a single distinct value ({to_python_scalar(uniq[0])!r}); "
                        "a constant column carries no information: drop it")
    if numeric:
        vals = obs.to_numpy(dtype=np.float64)
        if is_target:
            integer = bool(np.all(np.isclose(vals, np.round(vals))))
            discrete = n < max_categories and integer
        else:
            discrete = n < max_categories
        if not discrete:
            if is_target or (vals < 0).any():
                return Column(name, "gaussian")
            return Column(name, "loggaussian")
    cats = sorted_categories(uniq, s.dtype)
    return Column(name, "bernoulli" if n == 2 else "categorical", cats)


def infer_schema(features: pd.DataFrame, target: pd.Series | None = None, max_categories: int = 10,
                 target_likelihood: str | None = None, warn: bool = True) -> TableSchema:
    """Infer one likelihood per column with the reference HH-VAEM / VAEM code's rules (Peis et al. 2022; Ma et al. 2020).

    Args:
        features: ``(N, D)`` data frame of original values; NaN = missing (ignored by the rules).
        target: optional ``(N,)`` series of original target values; NaN = missing.
        max_categories: a column with fewer distinct observed values is discrete (default 10, as the reference).
        target_likelihood: override the inferred target likelihood (e.g. ``"gaussian"`` for an integer-valued
            regression target such as wine quality). Discrete overrides read their categories from the data.
        warn: issue a :class:`SchemaWarning` for every column :func:`column_warnings` doubts (mostly-numeric text,
            identifiers, dates as text).

    Returns:
        A :class:`TableSchema` whose features follow ``features.columns`` order. Discrete columns carry their sorted
        distinct original values as categories.

    Raises:
        DataError: a column (feature or target) that is all NaN, or has a single distinct value; a datetime /
            timedelta column (:func:`check_dtypes`).
        UnknownNameError: ``target_likelihood`` not in :data:`LIKELIHOODS`.
    """
    if not isinstance(features, pd.DataFrame):
        raise DataError(f"features must be a pandas DataFrame, got {type(features).__name__}")
    check_dtypes(features)
    if target is not None:
        check_dtypes(target.to_frame(), "target column")
    if warn:
        for c in features.columns:
            for msg in column_warnings(features[c]):
                warnings.warn(msg, SchemaWarning, stacklevel=2)
        if target is not None and target_likelihood is None:
            for msg in column_warnings(target):
                warnings.warn(msg.replace("column", "target column", 1), SchemaWarning, stacklevel=2)
    cols = [_infer_column(features[c], max_categories) for c in features.columns]
    tcol = None
    if target is not None:
        if target_likelihood is None:
            tcol = _infer_column(target, max_categories, is_target=True)
        else:
            if target_likelihood not in LIKELIHOODS:
                raise UnknownNameError("likelihood", f"{target_likelihood} (target {target.name!r})", LIKELIHOODS)
            cats = None
            if target_likelihood in DISCRETE_LIKELIHOODS:
                if target.dropna().empty:
                    raise DataError(f"target column {target.name!r} is entirely missing (all NaN)")
                cats = sorted_categories(pd.unique(target.dropna().to_numpy()), target.dtype)
            tcol = Column(target.name, target_likelihood, cats)
    return TableSchema(cols, tcol)

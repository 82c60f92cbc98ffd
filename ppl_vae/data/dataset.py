"""A table in its original domain (:class:`TableDataset`) and the validated entry points for user data
(:func:`from_dataframe`, :func:`from_csv`).

A :class:`TableDataset` keeps the original values (NaN = missing) and the :class:`TableSchema`; normalisation happens
per split (:meth:`TableDataset.splits`), with the :class:`Normaliser` fitted on training rows only (Peis et al. 2022 §4).
"""
from __future__ import annotations

import copy
import csv
import io
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import KFold, train_test_split

from ppl_vae.data.schema import (DISCRETE_LIKELIHOODS, LIKELIHOODS, Column, SchemaWarning, TableSchema,
                                 check_dtypes, column_warnings, infer_schema, sorted_categories, to_python_scalar)
from ppl_vae.data.tables import Split, TensorTable, seed_for
from ppl_vae.data.transforms import Normaliser
from ppl_vae.errors import DataError, SchemaError, UnknownNameError

__all__ = ["TableDataset", "from_dataframe", "from_csv", "validate_table", "load_schema_file", "sniff_delimiter",
           "read_table_csv"]


@dataclass
class TableDataset:
    """A (possibly partially observed) mixed-type table in its original domain.

    Attributes:
        name: data set name (registry name, or the user's).
        features: ``(N, D)`` frame of original values, columns in schema order, ``RangeIndex`` rows; NaN = missing.
        target: ``(N,)`` series of original target values (NaN = missing, such rows are kept), or ``None``.
        schema: the :class:`TableSchema` (one likelihood per column; discrete categories filled in).
        image_shape: ``(H, W)`` for image data sets (``(28, 28)`` mnist, ``(8, 8)`` digits), else ``None``.

    Raises:
        SchemaError: feature columns that do not match ``schema.feature_names`` (checked on construction; the full
            value checks are done by :func:`from_dataframe`).
    """

    name: str
    features: pd.DataFrame
    target: Optional[pd.Series]
    schema: TableSchema
    image_shape: Optional[tuple] = None

    def __post_init__(self) -> None:
        if list(self.features.columns) != self.schema.feature_names:
            raise SchemaError(_name_mismatch(self.schema.feature_names, list(self.features.columns)))
        if self.target is not None and len(self.target) != len(self.features):
            raise DataError(f"target has {len(self.target)} rows but features have {len(self.features)}")

    # ------------------------------------------------------------------ info
    def __len__(self) -> int:
        return len(self.features)

    @property
    def num_features(self) -> int:
        """``D``."""
        return self.schema.num_features

    @property
    def task(self) -> Optional[str]:
        """``"classification"`` (discrete target), ``"regression"`` (real / count target) or ``None`` (no target)."""
        if self.schema.target is None:
            return None
        return "classification" if self.schema.target.is_discrete else "regression"

    def describe(self) -> dict:
        """Summary: ``{"name", "rows", "num_features", "likelihoods": {likelihood: count}, "target", "target_likelihood",
        "target_categories", "missing_fraction" (features), "target_missing_fraction", "image_shape"}``."""
        counts = {k: 0 for k in LIKELIHOODS}
        for c in self.schema.features:
            counts[c.likelihood] += 1
        t = self.schema.target
        return {
            "name": self.name,
            "rows": len(self),
            "num_features": self.num_features,
            "likelihoods": {k: v for k, v in counts.items() if v},
            "target": None if t is None else t.name,
            "target_likelihood": None if t is None else t.likelihood,
            "target_categories": None if t is None else t.num_categories,
            "missing_fraction": float(self.features.isna().to_numpy().mean()) if self.features.size else 0.0,
            "target_missing_fraction": None if self.target is None else float(self.target.isna().mean()),
            "image_shape": self.image_shape,
        }

    def copy(self) -> "TableDataset":
        """A deep copy (frames and schema)."""
        return TableDataset(self.name, self.features.copy(), None if self.target is None else self.target.copy(),
                            copy.deepcopy(self.schema), self.image_shape)

    def with_target_likelihood(self, likelihood: str) -> "TableDataset":
        """A copy whose real-valued target is modelled by ``likelihood`` instead (values unchanged).

        The reference code of Peis et al. (2022, the VAEM family) models positive regression targets as
        ``loggaussian`` (``log1p`` then standardised; NLLs in that domain) where our inference picks ``gaussian``.

        Args:
            likelihood: ``gaussian``, ``loggaussian`` or ``poisson``.

        Raises:
            SchemaError: no target; a discrete (classification) target; a discrete
                ``likelihood``; negative values for ``loggaussian`` / ``poisson`` (the message names the target).
            UnknownNameError: ``likelihood`` not in :data:`~ppl_vae.data.schema.LIKELIHOODS`.
        """
        if likelihood not in LIKELIHOODS:
            raise UnknownNameError("likelihood", f"{likelihood} (target)", LIKELIHOODS)
        t = self.schema.target
        if t is None or self.target is None:
            raise SchemaError(f"data set {self.name!r} has no target whose likelihood could be set")
        if t.is_discrete or likelihood in DISCRETE_LIKELIHOODS:
            raise SchemaError(f"target {t.name!r} of {self.name!r} is {t.likelihood}; only a real-valued target can "
                              f"be re-declared, and only as gaussian / loggaussian / poisson (got {likelihood})")
        col = _check_column(Column(t.name, likelihood), self.target, "target column")
        out = self.copy()
        out.schema = TableSchema(list(out.schema.features), col)
        return out

    # ------------------------------------------------------------------ tensors
    def fit_normaliser(self, rows=None) -> Normaliser:
        """A :class:`Normaliser` fitted on ``rows`` (row positions; all rows when ``None``)."""
        f = self.features if rows is None else self.features.iloc[np.asarray(rows)]
        t = None if self.target is None else (self.target if rows is None else self.target.iloc[np.asarray(rows)])
        return Normaliser.fit(f, t, self.schema)

    def to_table(self, rows=None, normaliser: Optional[Normaliser] = None) -> TensorTable:
        """Normalised :class:`TensorTable` of ``rows`` (all rows when ``None``). Without ``normaliser`` one is fitted
        on the same rows (fine for unsupervised use of a whole data set; use :meth:`splits` for evaluation)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        norm = normaliser if normaliser is not None else self.fit_normaliser(rows)
        f = self.features.iloc[rows]
        x = norm.transform_features(f)
        y = None
        if self.target is not None and norm.target_stats is not None:
            y = norm.transform_target(self.target.iloc[rows])
        return TensorTable.from_arrays(x, y, rows)

    def splits(self, n_splits: int = 10, seed: int = 0, test_missing_rate: float = 0.5) -> list[Split]:
        """Seeded train/test splits of the HH-VAEM evaluation protocol (Peis et al. 2022 §4).

        ``n_splits >= 2``: ``sklearn.model_selection.KFold(n_splits, shuffle=True, random_state=seed)``, the folds
        partition the rows. ``n_splits == 1``: one seeded 90/10 split (``train_test_split(test_size=0.1,
        random_state=seed)``). For each fold the :class:`Normaliser` is fitted on the training rows only, and the
        test mask is ``rand < test_missing_rate`` over the observed test entries, drawn from a
        ``torch.Generator`` seeded by ``(seed, fold)``. Everything is deterministic given ``seed``.

        Returns:
            list of :class:`Split` (``train``/``test`` with natural missingness only, ``test_mask`` ``(N_test, D)``).

        Raises:
            DataError: ``n_splits < 1``, more splits than rows (the message suggests a smaller ``--folds``), fewer
                than 2 rows, or a value that overflows float32 once normalised
                (:meth:`Normaliser.transform_features`).
            ValueError: ``test_missing_rate`` outside ``[0, 1]``.
        """
        n = len(self)
        if n < 2:
            raise DataError(f"the table has {n} row(s); a train/test split needs at least 2")
        if n_splits < 1 or (n_splits > 1 and n_splits > n):
            raise DataError(f"cannot make {n_splits} folds of {n} rows: use --folds {n} or fewer"
                            if n_splits > n else f"the number of folds must be >= 1, got {n_splits}")
        if not 0.0 <= test_missing_rate <= 1.0:
            raise ValueError(f"test_missing_rate must be in [0, 1], got {test_missing_rate}")
        rows = np.arange(n)
        if n_splits == 1:
            tr, te = train_test_split(rows, test_size=0.1, random_state=seed, shuffle=True)
            folds = [(np.sort(tr), np.sort(te))]
        else:
            folds = list(KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(rows))
        out = []
        for fold, (tr, te) in enumerate(folds):
            tr, te = np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64)
            norm = self.fit_normaliser(tr)
            train, test = self.to_table(tr, norm), self.to_table(te, norm)
            gen = torch.Generator().manual_seed(seed_for(seed, fold))
            hidden = (torch.rand(len(te), self.num_features, generator=gen) < test_missing_rate) & test.x_mask
            out.append(Split(fold, train, test, hidden, norm, tr, te))
        return out

    def __repr__(self) -> str:
        t = None if self.schema.target is None else f"{self.schema.target.name}:{self.schema.target.likelihood}"
        return f"TableDataset({self.name!r}, rows={len(self)}, features={self.num_features}, target={t})"


# ---------------------------------------------------------------------- validation
def _name_mismatch(expected: list, got: list) -> str:
    missing = [c for c in expected if c not in got]
    extra = [c for c in got if c not in expected]
    parts = []
    if missing:
        parts.append(f"schema column(s) missing from the data: {missing}")
    if extra:
        parts.append(f"data column(s) not in the schema: {extra}")
    if not parts:
        parts.append(f"column order differs from the schema: {got} vs {expected}")
    return "schema does not match the data frame: " + "; ".join(parts)


def _is_numeric_series(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s.dtype) and not isinstance(s.dtype, pd.CategoricalDtype)


def _as_float(s: pd.Series) -> Optional[np.ndarray]:
    """Float64 values of a column (NaN = missing) or ``None`` if it is not numeric."""
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy(dtype=np.float64, na_value=np.nan)
    if _is_numeric_series(s):
        return s.to_numpy(dtype=np.float64, na_value=np.nan)
    if s.dtype == object:
        try:
            return pd.to_numeric(s, errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
        except (ValueError, TypeError):
            return None
    return None


def _check_finite_and_present(s: pd.Series, what: str) -> None:
    """DataError for +/-inf anywhere, or a column that is entirely NaN."""
    if _is_numeric_series(s) and not pd.api.types.is_bool_dtype(s.dtype):
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        if np.isinf(v).any():
            raise DataError(f"{what} {s.name!r} contains +/-inf; inf is not a missing value, use NaN for missing")
    elif s.dtype == object:
        if any(isinstance(v, (float, np.floating)) and np.isinf(v) for v in s.to_numpy()):
            raise DataError(f"{what} {s.name!r} contains +/-inf; inf is not a missing value, use NaN for missing")
    if len(s) and s.isna().all():
        raise DataError(f"{what} {s.name!r} is entirely missing (all NaN); drop it")


def _check_column(col: Column, s: pd.Series, what: str = "column") -> Column:
    """Check the values of one column against its declared likelihood; fill discrete categories from the data.

    Raises SchemaError (non-numeric real column, negative loggaussian / poisson values, non-integer poisson values,
    values outside the declared categories, a bernoulli column without exactly 2 values)."""
    name, like = col.name, col.likelihood
    if like in ("gaussian", "loggaussian", "poisson"):
        v = _as_float(s)
        if v is None:
            raise SchemaError(f"{what} {name!r} is non-numeric (dtype {s.dtype}) but declared {like}; declare it "
                              "categorical or bernoulli")
        obs = v[~np.isnan(v)]
        if like in ("loggaussian", "poisson") and (obs < 0).any():
            raise SchemaError(f"{what} {name!r} is declared {like} but has negative values (min {obs.min()!r})")
        if like == "poisson" and not np.all(obs == np.round(obs)):
            raise SchemaError(f"{what} {name!r} is declared poisson but has non-integer values")
        return col
    # discrete
    obs_vals = pd.unique(s.dropna().to_numpy())
    if col.categories is None:
        cats = sorted_categories(obs_vals, s.dtype)
        if like == "bernoulli" and len(cats) != 2:
            raise SchemaError(f"{what} {name!r} is declared bernoulli but has {len(cats)} distinct values {cats}; "
                              "give its 2 categories in the schema")
        return Column(name, like, cats)
    codes = pd.Index(list(col.categories)).get_indexer(obs_vals)
    if (codes < 0).any():
        bad = [to_python_scalar(v) for v in obs_vals[codes < 0][:5]]
        raise SchemaError(f"{what} {name!r} has value(s) {bad} outside its declared categories {list(col.categories)}")
    return col


def validate_table(features: pd.DataFrame, target: Optional[pd.Series], schema: TableSchema) -> TableSchema:
    """Check a frame against a schema and return the schema with discrete categories filled in.

    Raises:
        DataError: inf values, an all-NaN column.
        SchemaError: names that do not match, a value incompatible with its declared likelihood.
    """
    if set(features.columns) != set(schema.feature_names):
        raise SchemaError(_name_mismatch(schema.feature_names, list(features.columns)))
    for c in features.columns:
        _check_finite_and_present(features[c], "column")
    if target is not None:
        _check_finite_and_present(target, "target column")
    feats = [_check_column(c, features[c.name]) for c in schema.features]
    tcol = schema.target
    if tcol is not None and target is not None:
        tcol = _check_column(tcol, target, "target column")
    return TableSchema(feats, tcol)


def _parse_overrides(spec: Mapping[str, Any]) -> tuple[dict, Optional[str], list]:
    """``{"columns": {...}, "target": name, "drop": [...]}`` -> ``(overrides {name: Column-or-likelihood dict},
    target, drop)``. Raises :class:`SchemaError` on unknown keys or malformed entries."""
    allowed = {"columns", "target", "drop"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise SchemaError(f"schema file: unknown key(s) {extra}; a full schema has 'features' (and 'target'), an "
                          "override has 'columns', 'target', 'drop'")
    cols = spec.get("columns") or {}
    if not isinstance(cols, Mapping):
        raise SchemaError(f"schema 'columns' must map column name -> likelihood, got {type(cols).__name__}")
    out = {}
    for name, entry in cols.items():
        if isinstance(entry, str):
            entry = {"likelihood": entry}
        if not isinstance(entry, Mapping) or "likelihood" not in entry:
            raise SchemaError(f"schema column {name!r}: give a likelihood name or {{'likelihood': ..., "
                              f"'categories': [...]}}, got {entry!r}")
        if entry["likelihood"] not in LIKELIHOODS:
            raise UnknownNameError("likelihood", f"{entry['likelihood']} (column {name!r})", LIKELIHOODS)
        out[str(name)] = dict(entry)
    drop = spec.get("drop") or []
    if isinstance(drop, str):
        drop = [drop]
    target = spec.get("target")
    return out, None if target is None else str(target), [str(d) for d in drop]


def _infer_with_overrides(feats: pd.DataFrame, tgt: Optional[pd.Series], overrides: Mapping[str, dict],
                          max_categories: int, target_likelihood: Optional[str], warn: bool) -> TableSchema:
    """Infer the columns not named in ``overrides``; declare the named ones (categories read later from the data
    when not given)."""
    rest = [c for c in feats.columns if c not in overrides]
    tname = None if tgt is None else tgt.name
    t_over = overrides.get(tname) if tname is not None else None
    with warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore", SchemaWarning)
        inferred = infer_schema(feats[rest], tgt if t_over is None else None, max_categories=max_categories,
                                target_likelihood=target_likelihood, warn=warn)
    by_name = {c.name: c for c in inferred.features}
    cols = []
    for c in feats.columns:
        if c in overrides:
            o = overrides[c]
            cats = o.get("categories")
            cols.append(Column(c, o["likelihood"], None if cats is None else tuple(cats)))
        else:
            cols.append(by_name[c])
    tcol = inferred.target
    if t_over is not None:
        cats = t_over.get("categories")
        tcol = Column(tname, t_over["likelihood"], None if cats is None else tuple(cats))
    return TableSchema(cols, tcol)


def load_schema_file(path: str | os.PathLike) -> dict:
    """Read a schema file: JSON always; YAML (``.yaml`` / ``.yml``) when PyYAML is installed.

    The file holds either a full schema (``TableSchema.to_dict()``: ``{"features": [...], "target": ...}``) or an
    override ``{"columns": {name: likelihood, ...}, "target": name, "drop": [names]}``; see :func:`from_dataframe`.

    Raises:
        SchemaError: unreadable file, malformed JSON/YAML, YAML without PyYAML, or a file that is not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SchemaError(f"cannot read schema file {str(path)!r}: {e}") from e
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # optional
        except ImportError:
            raise SchemaError(f"schema file {str(path)!r} is YAML but PyYAML is not installed (pip install pyyaml), "
                              "or write it as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SchemaError(f"cannot parse schema YAML {str(path)!r}: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError(f"cannot parse schema JSON {str(path)!r}: {e}") from e
    if not isinstance(data, Mapping):
        raise SchemaError(f"schema file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return dict(data)


#: delimiters :func:`sniff_delimiter` chooses from
DELIMITERS = (",", ";", "\t", "|")


def sniff_delimiter(path: str | os.PathLike, sample_bytes: int = 65536) -> str:
    """The field delimiter of a delimited text file: the one of :data:`DELIMITERS` that splits the first lines
    into the same, largest number of fields (``csv.Sniffer`` as a tie-break); ``","`` when nothing splits.

    Raises:
        DataError: the file cannot be read.
    """
    try:
        with open(path, "r", newline="", errors="replace") as fh:
            sample = fh.read(sample_bytes)
    except OSError as e:
        raise DataError(f"cannot read CSV {str(path)!r}: {e}") from e
    lines = [ln for ln in sample.splitlines()[:50] if ln.strip()]
    if len(lines) > 1 and not sample.endswith("\n") and len(sample) >= sample_bytes:
        lines = lines[:-1]  # a cut-off last line
    if not lines:
        return ","
    best, best_fields = ",", 1
    for d in DELIMITERS:
        try:
            counts = {len(r) for r in csv.reader(io.StringIO("\n".join(lines)), delimiter=d)}
        except csv.Error:
            continue
        if len(counts) == 1 and (n := counts.pop()) > best_fields:
            best, best_fields = d, n
    if best_fields == 1:
        try:
            return csv.Sniffer().sniff("\n".join(lines), delimiters="".join(DELIMITERS)).delimiter
        except csv.Error:
            return ","
    return best


def _header_duplicates(path: Path, sep: str, read_csv_kwargs: Mapping[str, Any]) -> list:
    """Names that appear more than once in the header line (``pandas.read_csv`` would rename them ``a.1``)."""
    if read_csv_kwargs.get("header", "infer") not in ("infer", 0) or "names" in read_csv_kwargs:
        return []
    try:
        with open(path, "r", newline="", errors="replace", encoding=read_csv_kwargs.get("encoding")) as fh:
            header = next(csv.reader(fh, delimiter=sep), [])
    except (OSError, csv.Error, StopIteration):
        return []
    header = [h.strip() for h in header]
    return sorted({h for h, k in Counter(header).items() if k > 1 and h})


def read_table_csv(path: str | os.PathLike, sep: Optional[str] = None, na_values: Sequence[str] | str | None = None,
                   **read_csv_kwargs: Any) -> pd.DataFrame:
    """Read a delimited file as a frame the way :func:`from_csv` does (without building a data set): the delimiter
    sniffed when ``sep`` is ``None`` (:func:`sniff_delimiter`), ``na_values`` tokens read as missing (added to
    pandas' defaults; a comma-separated string is split), duplicated header names refused.

    Raises:
        DataError: unreadable / unparsable file, duplicated column names in the header.
    """
    path = Path(path)
    if sep is None:
        sep = sniff_delimiter(path)
    if isinstance(na_values, str):
        na_values = [t for t in (v.strip() for v in na_values.split(",")) if t]
    kwargs = dict(read_csv_kwargs)
    if na_values:
        kwargs["na_values"] = list(na_values)
    dup = _header_duplicates(path, sep, kwargs)
    if dup:
        raise DataError(f"duplicated column name(s) in the header of {str(path)!r}: {dup}; rename them")
    try:
        return pd.read_csv(path, sep=sep, **kwargs)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"cannot read CSV {str(path)!r}: {e}") from e


def from_dataframe(df: pd.DataFrame, target: str | None = None, schema: TableSchema | dict | None = None,
                   name: str = "user", max_categories: int = 10, target_likelihood: str | None = None,
                   drop: Sequence[str] | None = None, warn: bool = True) -> TableDataset:
    """Validate a user's table and wrap it as a :class:`TableDataset` (original domain; NaN = missing).

    Column names are converted to ``str`` and rows re-indexed ``0..N-1``. Rows whose target is NaN are kept
    (their ``y_mask`` is ``False``). Without a schema, :func:`~ppl_vae.data.schema.infer_schema` applies the
    reference HH-VAEM code's rules (Peis et al. 2022; and warns, :class:`~ppl_vae.data.schema.SchemaWarning`, on mostly-numeric text, identifier
    and date-like columns); with one, its feature columns must match the frame exactly (any order; the data set
    uses the schema order), and missing discrete categories are read from the data.

    Args:
        df: the table, features and (optionally) the target column.
        target: name of the target column; when ``None`` the schema's target (if any) is used, else no target.
        schema: a :class:`TableSchema` or its ``to_dict()`` form (every column declared), an *override* dict
            ``{"columns": {name: likelihood or {"likelihood", "categories"}}, "target": name, "drop": [names]}``
            (the named columns as declared, every other column inferred), or ``None`` (infer everything).
        name: data set name.
        max_categories: discreteness threshold for inference (< 10 levels: discrete, as the HH-VAEM reference code).
        target_likelihood: override the target likelihood (inference only; with a schema declare it there).
        drop: columns to remove before anything else (e.g. an identifier column the inference warned about).
        warn: emit the inference warnings (``False`` silences them).

    Raises:
        DataError: ``df`` not a DataFrame, no rows, no feature column besides the target, duplicated column
            names, target not a column (message lists the columns), a column (or the target) entirely NaN, +/-inf
            anywhere, a constant column when inferring, a datetime / timedelta column, a ``drop`` name that is not
            a column.
        SchemaError: schema feature names that do not match the frame (names the missing and extra columns),
            a schema target that differs from ``target``, a non-numeric column declared gaussian / loggaussian /
            poisson, negative values in a loggaussian / poisson column, values outside declared categories.
        UnknownNameError: a likelihood not in :data:`~ppl_vae.data.schema.LIKELIHOODS`.
    """
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame, got {type(df).__name__}")
    df = df.copy()
    df.columns = [str(c) for c in df.columns]
    dup = sorted(df.columns[df.columns.duplicated()].unique())
    if dup:
        raise DataError(f"duplicated column name(s): {dup}")
    df = df.reset_index(drop=True)
    if len(df) == 0:
        raise DataError(f"the table has no rows (only the header {list(df.columns)})")
    overrides: dict = {}
    if isinstance(schema, Mapping) and "features" not in schema:
        overrides, spec_target, spec_drop = _parse_overrides(schema)
        target = target if target is not None else spec_target
        drop = list(drop or []) + [c for c in spec_drop if c not in (drop or [])]
        schema = None
    if drop:
        unknown = [c for c in drop if str(c) not in df.columns]
        if unknown:
            raise DataError(f"cannot drop {unknown}: not column(s) of the table; columns are {list(df.columns)}")
        df = df.drop(columns=[str(c) for c in drop])
    if isinstance(schema, Mapping):
        schema = TableSchema.from_dict(schema)
    elif schema is not None and not isinstance(schema, TableSchema):
        raise SchemaError(f"schema must be a TableSchema, a dict or None, got {type(schema).__name__}")
    if target is None and schema is not None and schema.target is not None:
        target = schema.target.name
    if target is not None:
        target = str(target)
        if target not in df.columns:
            raise DataError(f"target column {target!r} not in the data frame; columns are {list(df.columns)}")
    if schema is not None and schema.target is not None and schema.target.name != target:
        raise SchemaError(f"schema target {schema.target.name!r} differs from target {target!r}")
    if target_likelihood is not None and target_likelihood not in LIKELIHOODS:
        raise UnknownNameError("likelihood", f"{target_likelihood} (target {target!r})", LIKELIHOODS)

    feats = df.drop(columns=[target]) if target is not None else df
    tgt = df[target] if target is not None else None
    if feats.shape[1] == 0:
        raise DataError(f"the table has no feature columns besides the target {target!r}; a model needs at least one"
                        if target is not None else "the table has no columns")
    unknown = [c for c in overrides if c not in df.columns]
    if unknown:
        raise SchemaError(f"schema override names column(s) {unknown} that are not in the table; columns are "
                          f"{list(df.columns)}")
    check_dtypes(feats)
    if tgt is not None:
        check_dtypes(tgt.to_frame(), "target column")
    for c in feats.columns:
        _check_finite_and_present(feats[c], "column")
    if tgt is not None:
        _check_finite_and_present(tgt, "target column")

    if schema is None and overrides:
        schema = _infer_with_overrides(feats, tgt, overrides, max_categories, target_likelihood, warn)
    elif schema is None:
        with warnings.catch_warnings():
            if not warn:
                warnings.simplefilter("ignore", SchemaWarning)
            schema = infer_schema(feats, tgt, max_categories=max_categories, target_likelihood=target_likelihood,
                                  warn=warn)
    else:
        if set(schema.feature_names) != set(feats.columns):
            raise SchemaError(_name_mismatch(schema.feature_names, list(feats.columns)))
        if schema.target is None and tgt is not None:
            tcol = infer_schema(feats.iloc[:, :0], tgt, max_categories, target_likelihood).target
            schema = TableSchema(schema.features, tcol)
        feats = feats[schema.feature_names]
    schema = validate_table(feats, tgt, schema)
    return TableDataset(str(name), feats.reset_index(drop=True), None if tgt is None else tgt.reset_index(drop=True),
                        schema)


def from_csv(path: str | os.PathLike, target: str | None = None, schema=None, name: str | None = None,
             sep: Optional[str] = None, na_values: Sequence[str] | str | None = None,
             drop: Sequence[str] | None = None, warn: bool = True, **read_csv_kwargs: Any) -> TableDataset:
    """Read a delimited text file (:func:`read_table_csv`: delimiter sniffed unless ``sep`` is given, empty cells
    and ``na_values`` tokens = missing) and pass it to :func:`from_dataframe`.

    Args:
        path: CSV file.
        target: target column name (or ``None``; an override schema may name it).
        schema: :class:`TableSchema`, dict (full or override, see :func:`from_dataframe`), a path to a JSON (or,
            with PyYAML, YAML) file holding one (:func:`load_schema_file`), or ``None``.
        name: data set name (default: the file stem).
        sep: field delimiter; ``None`` sniffs it among ``, ; tab |``.
        na_values: extra tokens that mean "missing" (``["missing", "?"]`` or ``"missing,?"``).
        drop: columns to remove before inference.
        warn: emit the schema-inference warnings.
        **read_csv_kwargs: passed to ``pandas.read_csv``.

    Raises:
        DataError: the file cannot be read, duplicated header names; plus everything :func:`from_dataframe` raises.
        SchemaError: an unreadable or malformed schema file.
    """
    path = Path(path)
    df = read_table_csv(path, sep=sep, na_values=na_values, **read_csv_kwargs)
    if isinstance(schema, (str, os.PathLike)):
        schema = load_schema_file(schema)
    return from_dataframe(df, target=target, schema=schema, name=name or path.stem.split(".")[0], drop=drop,
                          warn=warn)

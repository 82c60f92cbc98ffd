"""Invertible per-column normalisation between the original and the normalised domain (Peis et al. 2022 §4).

The normalised domain is where every model works and where the paper's NLLs are reported (Peis et al. 2022):

=============  ==========================================  =============================================
likelihood     original -> normalised                      statistics (training split, observed entries)
=============  ==========================================  =============================================
gaussian       ``(x - mean) / std``                        mean, std of ``x``
loggaussian    ``(log1p(x) - mean) / std``                 mean, std of ``log1p(x)``
bernoulli      value -> code ``k`` with ``categories[k]``  categories (from the schema, else training data)
categorical    value -> code ``k`` with ``categories[k]``  categories (from the schema, else training data)
poisson        identity (non-negative integers)            none
=============  ==========================================  =============================================

A standard deviation of 0 (or a column with no observed training entry) uses ``std = 1``; values whose mean or
standard deviation overflows float64 (e.g. ``1e300``) raise :class:`~ppl_vae.errors.DataError`. NaN (missing) maps to
NaN both ways.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd
import torch

from ppl_vae.data.schema import Column, TableSchema, sorted_categories, to_python_scalar
from ppl_vae.errors import DataError, SchemaError

__all__ = ["Normaliser"]


def _numeric_values(col: Column, s: pd.Series) -> np.ndarray:
    """Original values of a real / count column as float64 (NaN = missing)."""
    try:
        return pd.to_numeric(s, errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (ValueError, TypeError) as e:
        raise DataError(f"column {col.name!r} is declared {col.likelihood} but holds non-numeric values") from e


def _fit_column(col: Column, s: pd.Series) -> dict:
    """Statistics of one column, from its observed training entries."""
    if col.is_discrete:
        cats = col.categories
        if cats is None:
            cats = sorted_categories(pd.unique(s.dropna().to_numpy()), s.dtype)
            if len(cats) == 0:
                raise DataError(f"column {col.name!r}: no observed value in the training split to read its "
                                "categories from; give the categories in the schema")
            if col.likelihood == "bernoulli" and len(cats) != 2:
                raise SchemaError(f"column {col.name!r} is declared bernoulli but the training split has "
                                  f"{len(cats)} distinct values {cats}")
        return {"categories": list(cats)}
    if col.likelihood == "poisson":
        return {}
    v = _numeric_values(col, s)
    if col.likelihood == "loggaussian":
        v = _log1p_checked(col, v)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": 0.0, "std": 1.0}
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = float(v.mean()), float(v.std())
    if not (np.isfinite(mean) and np.isfinite(std)):
        big = to_python_scalar(v[np.argmax(np.abs(v))])
        raise DataError(f"column {col.name!r} has values too large to standardise (e.g. {big!r}: its mean / "
                        "standard deviation overflow float64); rescale the column or mark such values missing")
    if std <= 0.0:
        std = 1.0
    return {"mean": mean, "std": std}


def _log1p_checked(col: Column, v: np.ndarray) -> np.ndarray:
    if (v < 0).any():
        bad = to_python_scalar(v[v < 0][0])
        raise DataError(f"column {col.name!r} is loggaussian but holds the negative value {bad!r}")
    return np.log1p(v)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _float32(col: Column, v: np.ndarray, index, what: str = "column") -> np.ndarray:
    """Normalised float64 values -> float32; :class:`DataError` naming the column and row of the first value that
    would overflow (e.g. ``1e300`` in a test row of a column standardised on ordinary training values)."""
    bad = ~np.isnan(v) & ~(np.abs(v) <= _FLOAT32_MAX)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataError(f"{what} {col.name!r} row {to_python_scalar(index[r])}: the value is too large to normalise "
                        f"(it becomes {float(v[r]):g} after standardisation, beyond float32); rescale the column or "
                        "mark the value missing")
    return v.astype(np.float32)


def _encode(col: Column, stats: Mapping[str, Any], s: pd.Series | np.ndarray) -> np.ndarray:
    """Original values (a series, or a float64 vector for numeric frames) -> normalised float64 vector (NaN =
    missing)."""
    if col.is_discrete:
        return _encode_discrete(col, stats["categories"], s)
    v = s if isinstance(s, np.ndarray) else _numeric_values(col, s)
    if col.likelihood == "poisson":
        obs = v[~np.isnan(v)]
        if (obs < 0).any() or not np.all(obs == np.round(obs)):
            raise DataError(f"column {col.name!r} is poisson but holds negative or non-integer values")
        return v.copy()
    if col.likelihood == "loggaussian":
        v = _log1p_checked(col, v)
    return (v - stats["mean"]) / stats["std"]


def _encode_discrete(col: Column, cats: list, s: pd.Series | np.ndarray) -> np.ndarray:
    if isinstance(s, np.ndarray) and _numeric_categories(cats):
        # fast path: numeric values and numeric categories, vectorised search
        c = np.asarray(cats, dtype=np.float64)
        order = np.argsort(c, kind="stable")
        sc = c[order]
        missing = np.isnan(s)
        pos = np.clip(np.searchsorted(sc, s), 0, len(sc) - 1)
        found = sc[pos] == s
        codes = order[pos].astype(np.float64)
        raw = s
    else:
        raw = s.to_numpy() if isinstance(s, pd.Series) else s
        missing = pd.isna(raw)
        codes = pd.Index(cats).get_indexer(raw).astype(np.float64)
        found = codes >= 0
    unseen = ~found & ~missing
    if unseen.any():
        bad = to_python_scalar(raw[np.flatnonzero(unseen)[0]])
        raise DataError(f"column {col.name!r}: value {bad!r} was not seen when the normaliser was fitted "
                        f"(known categories: {list(cats)})")
    codes[missing] = np.nan
    return codes


def _encode_discrete_block(cols: list[Column], cats: list[list], values: np.ndarray) -> np.ndarray:
    """Vectorised coding of several discrete columns with numeric categories: ``values`` ``(N, Dd)`` float64 ->
    codes ``(N, Dd)`` float64 (NaN = missing). Raises :class:`DataError` naming the first column with an unseen
    value."""
    n, dd = values.shape
    kmax = max(len(c) for c in cats)
    table = np.full((kmax, dd), np.nan)
    for j, c in enumerate(cats):
        table[:len(c), j] = c
    codes = np.full((n, dd), np.nan)
    for k in range(kmax):  # K passes over (N, Dd); K is small for numeric discrete columns
        codes[values == table[k]] = k
    unseen = np.isnan(codes) & ~np.isnan(values)
    if unseen.any():
        r, j = np.argwhere(unseen)[0]
        raise DataError(f"column {cols[j].name!r}: value {to_python_scalar(values[r, j])!r} was not seen when the "
                        f"normaliser was fitted (known categories: {list(cats[j])})")
    return codes


def _numeric_categories(cats) -> bool:
    return all(isinstance(c, (bool, int, float)) for c in cats)


class Normaliser:
    """Invertible per-column normalisation fitted on the training split (Peis et al. 2022 §4, HH-VAEM protocol).

    Build it with :meth:`fit`; never fit it on test rows (the statistics would leak). The fitted schema
    (:attr:`schema`) has the categories of every discrete column filled in.

    Attributes:
        schema: the :class:`TableSchema` it was fitted for.
        feature_stats: one dict per feature: ``{"mean", "std"}`` (gaussian: of ``x``; loggaussian: of
            ``log1p(x)``), ``{"categories": [...]}`` (discrete) or ``{}`` (poisson).
        target_stats: the same for the target, or ``None``.
    """

    def __init__(self, schema: TableSchema, feature_stats: list[dict], target_stats: Optional[dict] = None):
        if len(feature_stats) != schema.num_features:
            raise SchemaError(f"{len(feature_stats)} feature statistics for {schema.num_features} schema columns")
        self.feature_stats = [dict(s) for s in feature_stats]
        self.target_stats = None if target_stats is None else dict(target_stats)
        # store the resolved categories in the schema too
        feats = [Column(c.name, c.likelihood, tuple(s["categories"])) if c.is_discrete else c
                 for c, s in zip(schema.features, self.feature_stats)]
        tgt = schema.target
        if tgt is not None and tgt.is_discrete and self.target_stats is not None:
            tgt = Column(tgt.name, tgt.likelihood, tuple(self.target_stats["categories"]))
        self.schema = TableSchema(feats, tgt)
        self._build_inverse_tables()

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, features: pd.DataFrame, target: pd.Series | None, schema: TableSchema) -> "Normaliser":
        """Fit the statistics on training rows.

        Args:
            features: ``(N_train, D')`` original-domain frame holding (at least) the schema's feature columns;
                NaN = missing. Only observed entries enter mean / std.
            target: ``(N_train,)`` original-domain target, or ``None`` (no target statistics are fitted).
            schema: the table schema (discrete categories are taken from it when given, otherwise read from the
                training rows).

        Raises:
            SchemaError: a schema column missing from ``features``; a bernoulli column without 2 training values.
            DataError: non-numeric values in a real column, negative values in a loggaussian column, no observed
                training value for a discrete column without declared categories.
        """
        missing = [n for n in schema.feature_names if n not in features.columns]
        if missing:
            raise SchemaError(f"schema feature column(s) {missing} not in the data frame")
        fstats = [_fit_column(c, features[c.name]) for c in schema.features]
        tstats = None
        if schema.target is not None and target is not None:
            tstats = _fit_column(schema.target, target)
        return cls(schema, fstats, tstats)

    # ------------------------------------------------------------------ forward
    def transform_features(self, features: pd.DataFrame) -> np.ndarray:
        """Original-domain frame -> ``(N, D)`` float32 normalised array, NaN where missing, columns in schema order.

        Raises:
            SchemaError: a schema column missing from ``features``.
            DataError: a discrete value not seen at fit time (message names column and value); negative values in
                a loggaussian column; negative / non-integer values in a poisson column; non-numeric real values; a
                value beyond the float32 range once normalised (names column and row).
        """
        missing = [n for n in self.schema.feature_names if n not in features.columns]
        if missing:
            raise SchemaError(f"schema feature column(s) {missing} not in the data frame")
        names = self.schema.feature_names
        frame = features[names]
        numeric = [n for n, t in frame.dtypes.items()
                   if pd.api.types.is_numeric_dtype(t) and not isinstance(t, pd.CategoricalDtype)]
        block = None
        if numeric:
            sub = frame[numeric]
            if all(isinstance(t, np.dtype) for t in sub.dtypes):
                block = sub.to_numpy(dtype=np.float64)
            else:  # nullable extension dtypes: pd.NA -> NaN
                block = sub.to_numpy(dtype=np.float64, na_value=np.nan)
        where = {n: j for j, n in enumerate(numeric)}
        out = np.empty((len(features), self.schema.num_features), dtype=np.float32)
        # discrete columns with numeric values and numeric categories: one vectorised pass
        fast = [d for d, (c, st) in enumerate(zip(self.schema.features, self.feature_stats))
                if c.is_discrete and c.name in where and _numeric_categories(st["categories"])]
        if fast:
            out[:, fast] = _encode_discrete_block([self.schema.features[d] for d in fast],
                                                  [self.feature_stats[d]["categories"] for d in fast],
                                                  block[:, [where[self.schema.features[d].name] for d in fast]])
        done = set(fast)
        for d, (col, st) in enumerate(zip(self.schema.features, self.feature_stats)):
            if d in done:
                continue
            src = block[:, where[col.name]] if col.name in where else frame[col.name]
            out[:, d] = _float32(col, _encode(col, st, src), features.index)
        return out

    def transform_target(self, target: pd.Series) -> np.ndarray:
        """Original-domain target ``(N,)`` -> ``(N, 1)`` float32 normalised (class code for classification), NaN
        where missing.

        Raises:
            DataError: no target was fitted; an unseen class (message names column and value).
        """
        tcol = self._target_column()
        target = pd.Series(target)
        return _float32(tcol, _encode(tcol, self.target_stats, target), target.index, "target column")[:, None]

    # ------------------------------------------------------------------ inverse
    def _build_inverse_tables(self) -> None:
        like = np.array(self.schema.likelihoods)
        self._mean = np.array([s.get("mean", 0.0) for s in self.feature_stats], dtype=np.float64)
        self._std = np.array([s.get("std", 1.0) for s in self.feature_stats], dtype=np.float64)
        self._real = np.flatnonzero((like == "gaussian") | (like == "loggaussian"))
        self._log = np.flatnonzero(like == "loggaussian")
        self._disc = [(d, np.array(s["categories"], dtype=np.float64) if _numeric_categories(s["categories"])
                       else None, len(s["categories"]))
                      for d, s in enumerate(self.feature_stats) if "categories" in s]

    @staticmethod
    def _as_numpy(x) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        return np.array(x, dtype=np.float64, copy=True)

    @staticmethod
    def _decode_codes(v: np.ndarray, lookup: Optional[np.ndarray], k: int) -> np.ndarray:
        nan = np.isnan(v)
        codes = np.clip(np.rint(np.where(nan, 0.0, v)), 0, k - 1).astype(np.int64)
        out = codes.astype(np.float64) if lookup is None else lookup[codes]
        out[nan] = np.nan
        return out

    def inverse_features(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Normalised ``(..., N, D)`` -> original-domain ``(..., N, D)`` float64 (any leading sample dims).

        Discrete columns: the code is rounded and clipped to ``0..K-1``, then mapped to the original category value
        when the categories are numeric; for non-numeric categories the code itself is returned. NaN stays NaN.

        Raises:
            SchemaError: last dimension is not ``D``.
        """
        out = self._as_numpy(x)
        if out.shape[-1] != self.schema.num_features:
            raise SchemaError(f"inverse_features expects last dim {self.schema.num_features}, got {out.shape}")
        r = self._real
        out[..., r] = out[..., r] * self._std[r] + self._mean[r]
        if self._log.size:
            out[..., self._log] = np.expm1(out[..., self._log])
        for d, lookup, k in self._disc:
            out[..., d] = self._decode_codes(out[..., d], lookup, k)
        return out

    def inverse_target(self, y) -> np.ndarray:
        """Normalised target ``(..., N, 1)`` -> original domain ``(..., N, 1)`` float64 (class value if numeric,
        else class code). NaN stays NaN.

        Raises:
            DataError: no target was fitted.
        """
        tcol = self._target_column()
        out = self._as_numpy(y)
        st = self.target_stats
        if tcol.is_discrete:
            cats = st["categories"]
            lookup = np.array(cats, dtype=np.float64) if _numeric_categories(cats) else None
            return self._decode_codes(out, lookup, len(cats))
        if tcol.likelihood == "poisson":
            return out
        out = out * st["std"] + st["mean"]
        return np.expm1(out) if tcol.likelihood == "loggaussian" else out

    def target_scale(self) -> float:
        """Standard deviation used to standardise a ``gaussian`` target (original units), so that an RMSE in the
        normalised domain times this scale is the RMSE in original units. ``1.0`` for discrete / poisson targets;
        for a (non-default) loggaussian target this is the std of ``log1p(y)`` (use :meth:`inverse_target`).

        Raises:
            DataError: no target was fitted.
        """
        self._target_column()
        return float(self.target_stats.get("std", 1.0))

    def _target_column(self) -> Column:
        if self.schema.target is None or self.target_stats is None:
            raise DataError("this normaliser was fitted without a target column")
        return self.schema.target

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        """JSON-serialisable dict ``{"schema", "features", "target"}`` (statistics as plain floats / lists)."""
        def clean(st):
            if st is None:
                return None
            return {k: ([to_python_scalar(c) for c in v] if k == "categories" else float(v)) for k, v in st.items()}
        return {"schema": self.schema.to_dict(), "features": [clean(s) for s in self.feature_stats],
                "target": clean(self.target_stats)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Normaliser":
        """Inverse of :meth:`to_dict`. Raises :class:`SchemaError` on a malformed dict."""
        try:
            return cls(TableSchema.from_dict(d["schema"]), list(d["features"]), d.get("target"))
        except KeyError as e:
            raise SchemaError(f"normaliser dict lacks key {e}") from e

    def __repr__(self) -> str:
        return f"Normaliser(D={self.schema.num_features}, target={None if self.schema.target is None else self.schema.target.name!r})"

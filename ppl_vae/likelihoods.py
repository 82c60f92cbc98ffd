"""Likelihood heads for mixed-type, partially observed tables (Ma et al. 2020; Peis et al. 2022 §2).

A decoder emits one flat parameter vector per row, ``(..., batch, param_dim)``; :class:`MixedLikelihood` slices it
into per-column parameters, builds one ``torch`` distribution per likelihood type (``gaussian``,
``loggaussian``, ``bernoulli``, ``categorical``, ``poisson``) and offers, all batched over leading dimensions:

- ``log_prob_entries``: per-entry log-likelihood ``(..., batch, D)``, exactly 0 on masked (missing) entries;
- ``observe``: the Pyro observation sites of a model (``dist.mask(m).to_event(1)`` per type, never zero-filling);
- ``impute`` (mean for real/count columns, mode for discrete ones), ``sample``;
- ``encode``/``expected_features``: the encoder/predictor feature space (one-hot for categorical columns).

Domain: everything is in the *normalised* domain of :class:`ppl_vae.data.Normaliser` (standardised real columns,
``log1p`` then standardised for ``loggaussian``, codes ``0..K-1`` for discrete columns, raw counts for ``poisson``).
A ``loggaussian`` density is therefore a Gaussian density of the transformed value (no Jacobian), as in the
paper's tables.

Real-valued columns use a *learned, bounded* standard deviation ``min_scale + (max_scale - min_scale) *
sigmoid(raw)`` (default ``[0.1, 2.0]``); the reference code fixes variance 0.1 (``gaussian_scale=0.1 ** 0.5``
reproduces it).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import pyro
import pyro.distributions as pdist
import torch
from torch import nn
import torch.nn.functional as F

from ppl_vae.errors import UnknownNameError

__all__ = ["LIKELIHOOD_TYPES", "MixedLikelihood", "param_width", "feature_width"]

LIKELIHOOD_TYPES = ("gaussian", "loggaussian", "bernoulli", "categorical", "poisson")
_REAL = ("gaussian", "loggaussian")
_NEG_INF_LOGIT = -1e4  # padded categorical logits: exp(-1e4) == 0 in float32, gradients stay finite


def _check_kind(kind: str, column: str) -> str:
    if kind not in LIKELIHOOD_TYPES:
        raise UnknownNameError(f"likelihood (column {column!r})", kind, LIKELIHOOD_TYPES)
    return kind


def param_width(kind: str, num_categories: Optional[int] = None, learned_scale: bool = True) -> int:
    """Number of decoder outputs a column of likelihood ``kind`` needs (``loc`` and raw scale for real columns when
    the scale is learned, one logit for bernoulli, K logits for categorical, one log-rate for poisson)."""
    if kind in _REAL:
        return 2 if learned_scale else 1
    if kind == "categorical":
        return int(num_categories)
    return 1


def feature_width(kind: str, num_categories: Optional[int] = None) -> int:
    """Width of a column in the encoder feature space (K for categorical one-hot, 1 otherwise)."""
    return int(num_categories) if kind == "categorical" else 1


class MixedLikelihood(nn.Module):
    """Per-column likelihoods of a mixed-type table, vectorised by likelihood type.

    Args:
        columns: sequence of column descriptions with attributes ``name``, ``likelihood`` (one of
            :data:`LIKELIHOOD_TYPES`) and ``num_categories`` (K for ``categorical``; ignored otherwise) — e.g.
            ``ppl_vae.data.Column`` objects of a ``TableSchema``.
        gaussian_scale: ``"learned"`` (bounded learned std) or a float (fixed std for every real column).
        min_scale, max_scale: bounds of the learned std (normalised domain).

    Shapes: ``params`` ``(..., batch, param_dim)``; ``x``/``mask`` ``(batch, D)`` (or broadcastable to
    ``(..., batch, D)``); results ``(..., batch, D)`` per entry, ``(..., batch)`` summed.

    Raises:
        UnknownNameError: a column's likelihood is not one of :data:`LIKELIHOOD_TYPES` (the message names the
            column and lists the choices).
        ValueError: a categorical column without ``num_categories >= 2``.
    """

    def __init__(self, columns: Sequence, gaussian_scale: Union[str, float] = "learned",
                 min_scale: float = 0.1, max_scale: float = 2.0):
        super().__init__()
        self.columns = list(columns)
        self.learned_scale = gaussian_scale == "learned"
        self.fixed_scale = None if self.learned_scale else float(gaussian_scale)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        kinds = [_check_kind(c.likelihood, c.name) for c in self.columns]
        ks = []
        for c, k in zip(self.columns, kinds):
            if k == "categorical":
                if c.num_categories is None or c.num_categories < 2:
                    raise ValueError(f"categorical column {c.name!r} needs num_categories >= 2")
                ks.append(int(c.num_categories))
            else:
                ks.append(2 if k == "bernoulli" else 1)
        self.kinds = kinds
        self.param_widths = [param_width(k, K, self.learned_scale) for k, K in zip(kinds, ks)]
        self.feature_widths = [feature_width(k, K) for k, K in zip(kinds, ks)]
        self.num_columns = len(self.columns)
        self.param_dim = sum(self.param_widths)
        self.feature_dim = sum(self.feature_widths)
        p_off = torch.tensor([0] + self.param_widths).cumsum(0)[:-1]
        f_off = torch.tensor([0] + self.feature_widths).cumsum(0)[:-1]
        self.present = [k for k in LIKELIHOOD_TYPES if k in kinds]
        for kind in self.present:
            cols = [d for d, k in enumerate(kinds) if k == kind]
            self.register_buffer(f"_cols_{kind}", torch.tensor(cols, dtype=torch.long), persistent=False)
            if kind == "categorical":
                kmax = max(ks[d] for d in cols)
                idx = torch.zeros(len(cols), kmax, dtype=torch.long)
                valid = torch.zeros(len(cols), kmax, dtype=torch.bool)
                for i, d in enumerate(cols):
                    idx[i, :ks[d]] = p_off[d] + torch.arange(ks[d])
                    valid[i, :ks[d]] = True
                self.register_buffer("_cat_index", idx, persistent=False)
                self.register_buffer("_cat_valid", valid, persistent=False)
            else:
                self.register_buffer(f"_p0_{kind}", p_off[cols].clone(), persistent=False)
        # feature-space bookkeeping: column of each feature, and one-hot offsets
        feat_col = torch.repeat_interleave(torch.arange(self.num_columns), torch.tensor(self.feature_widths))
        self.register_buffer("_feature_column", feat_col, persistent=False)
        self.register_buffer("_feature_offset", f_off, persistent=False)
        self.register_buffer("_num_cats", torch.tensor(ks), persistent=False)

    # ------------------------------------------------------------------ distributions
    def _cols(self, kind: str) -> torch.Tensor:
        return getattr(self, f"_cols_{kind}")

    def _scale(self, raw: torch.Tensor) -> torch.Tensor:
        return self.min_scale + (self.max_scale - self.min_scale) * torch.sigmoid(raw)

    def distributions(self, params: torch.Tensor) -> dict:
        """Per likelihood type, the ``torch`` distribution of its columns.

        Args:
            params: ``(..., batch, param_dim)`` decoder output.

        Returns:
            ``{kind: (distribution, columns)}`` where ``distribution`` has batch shape ``(..., batch, n_kind)``
            (categorical: logits ``(..., batch, n_kind, K_max)`` with padded levels at -1e4) and ``columns`` is
            the ``(n_kind,)`` long tensor of their positions in the table.

        Raises:
            ValueError: ``params.shape[-1] != param_dim``.
        """
        if params.shape[-1] != self.param_dim:
            raise ValueError(f"likelihood expects {self.param_dim} parameters per row, got {params.shape[-1]}")
        out = {}
        for kind in self.present:
            cols = self._cols(kind)
            if kind == "categorical":
                logits = params[..., self._cat_index].masked_fill(~self._cat_valid, _NEG_INF_LOGIT)
                d = pdist.Categorical(logits=logits)
            else:
                p0 = getattr(self, f"_p0_{kind}")
                first = params[..., p0]
                if kind in _REAL:
                    if self.learned_scale:
                        scale = self._scale(params[..., p0 + 1])
                    else:
                        scale = torch.full_like(first, self.fixed_scale)
                    d = pdist.Normal(first, scale)
                elif kind == "bernoulli":
                    d = pdist.Bernoulli(logits=first)
                else:  # poisson: log-rate, clamped for stability
                    d = pdist.Poisson(first.clamp(-10.0, 12.0).exp())
            out[kind] = (d, cols)
        return out

    @staticmethod
    def _value(kind: str, x: torch.Tensor) -> torch.Tensor:
        return x.long() if kind == "categorical" else x

    # ------------------------------------------------------------------ log-likelihood
    def log_prob_entries(self, params: torch.Tensor, x: torch.Tensor,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-entry log-likelihood ``log p(x_d | params_d)``.

        Args:
            params: ``(..., batch, param_dim)``.
            x: ``(batch, D)`` (or broadcastable to ``(..., batch, D)``) values in the normalised domain.
            mask: optional ``(batch, D)`` bool; masked (``False``) entries contribute exactly 0 and their value is
                never evaluated (a NaN there is harmless).

        Returns:
            ``(..., batch, D)`` log-probabilities (nats).
        """
        if mask is not None:
            x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
        lead = params.shape[:-1]
        out = params.new_zeros(*lead, self.num_columns)
        for kind, (d, cols) in self.distributions(params).items():
            value = self._value(kind, x[..., cols])
            lp = d.log_prob(value)
            out = out.index_copy(-1, cols, lp.expand(*lead, len(cols)))
        if mask is not None:
            out = out.masked_fill(~mask.bool(), 0.0)
        return out

    def log_prob(self, params: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sum of the observed entries' log-likelihoods per row: ``(..., batch)``."""
        return self.log_prob_entries(params, x, mask).sum(-1)

    def observe(self, prefix: str, params: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> None:
        """Emit the Pyro observation sites ``f"{prefix}_{kind}"`` (one per likelihood type present), each
        ``dist.mask(mask).to_event(1)`` observed at ``x``'s columns of that type. Call inside the data plate.

        Shapes: ``params (..., batch, param_dim)``, ``x``/``mask`` ``(batch, D)``.
        """
        mask = mask.bool()
        x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        for kind, (d, cols) in self.distributions(params).items():
            pyro.sample(f"{prefix}_{kind}", d.mask(mask[..., cols]).to_event(1),
                        obs=self._value(kind, x[..., cols]))

    # ------------------------------------------------------------------ point estimates and samples
    def impute(self, params: torch.Tensor) -> torch.Tensor:
        """Point imputation ``(..., batch, D)`` in the normalised domain: the mean for real and count columns,
        the mode for bernoulli/categorical (as a code)."""
        lead = params.shape[:-1]
        out = params.new_zeros(*lead, self.num_columns)
        for kind, (d, cols) in self.distributions(params).items():
            if kind in _REAL or kind == "poisson":
                v = d.mean
            elif kind == "bernoulli":
                v = (d.logits > 0).to(params.dtype)
            else:
                v = d.logits.argmax(-1).to(params.dtype)
            out = out.index_copy(-1, cols, v)
        return out

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        """One draw per entry ``(..., batch, D)`` (codes for discrete columns), normalised domain."""
        lead = params.shape[:-1]
        out = params.new_zeros(*lead, self.num_columns)
        for kind, (d, cols) in self.distributions(params).items():
            out = out.index_copy(-1, cols, d.sample().to(params.dtype))
        return out

    # ------------------------------------------------------------------ feature space
    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder features of observed values: ``(..., batch, feature_dim)``, zero on missing entries
        (zero imputation, the Partial-VAE input). Categorical columns are one-hot; count columns ``log1p``."""
        mask = mask.bool()
        x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        feats = x[..., self._feature_column]
        if "poisson" in self.present:
            is_pois = torch.tensor([k == "poisson" for k in self.kinds], device=x.device)[self._feature_column]
            feats = torch.where(is_pois, torch.log1p(feats.clamp_min(0)), feats)
        if "categorical" in self.present:
            is_cat = torch.tensor([k == "categorical" for k in self.kinds], device=x.device)[self._feature_column]
            level = torch.arange(self.feature_dim, device=x.device) - self._feature_offset[self._feature_column]
            feats = torch.where(is_cat, (feats.long() == level).to(x.dtype), feats)
        return feats * self.feature_mask(mask).to(x.dtype)

    def feature_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Expand a ``(..., batch, D)`` entry mask to the feature space ``(..., batch, feature_dim)``."""
        return mask[..., self._feature_column]

    def expected_features(self, params: torch.Tensor) -> torch.Tensor:
        """The model's expectation of each feature ``(..., batch, feature_dim)``: mean for real columns,
        ``log1p(rate)`` for counts, probability for bernoulli, class probabilities for categorical."""
        lead = params.shape[:-1]
        out = params.new_zeros(*lead, self.feature_dim)
        for kind, (d, cols) in self.distributions(params).items():
            start = self._feature_offset[cols]
            if kind == "categorical":
                probs = d.probs  # (..., batch, n, K_max)
                kmax = probs.shape[-1]
                fidx = start[:, None] + torch.arange(kmax, device=params.device)
                valid = self._cat_valid
                out = out.index_copy(-1, fidx[valid], probs[..., valid])
            else:
                v = {"bernoulli": lambda: d.probs, "poisson": lambda: torch.log1p(d.mean)}.get(kind, lambda: d.mean)()
                out = out.index_copy(-1, start, v)
        return out

    def fill_features(self, params: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x̂`` of the predictor (Peis et al. 2022 §3.2): observed entries' features, the model's expected features on
        missing entries. Shapes: ``params (..., batch, param_dim)``, ``x``/``mask`` ``(batch, D)`` ->
        ``(..., batch, feature_dim)``."""
        fmask = self.feature_mask(mask.bool())
        return torch.where(fmask, self.encode(x, mask), self.expected_features(params))


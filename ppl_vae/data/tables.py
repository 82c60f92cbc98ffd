"""Tensors of a normalised table, seeded train/test splits, train-time missingness and minibatch loading.

Evaluation protocol of Peis et al. 2022 (HH-VAEM, §4): seeded K-fold splits; the :class:`Normaliser` is fit on
the training fold only; during training every row of every minibatch draws a fresh missing rate
``rho ~ U(0.01, 0.99)`` and each observed entry of ``x`` and ``y`` is kept with probability ``1 - rho``
(:func:`sample_train_mask`); at test time a fixed, seeded ~50% MCAR mask hides observed ``x`` entries and ``y`` is
fully unobserved (:meth:`Split.test_input`). Natural missingness (NaN in the data) is never revealed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from ppl_vae.data.transforms import Normaliser
from ppl_vae.models.base import Batch

__all__ = ["TensorTable", "Split", "sample_train_mask", "RHO_LOW", "RHO_HIGH", "seed_for",
           "require_batch", "require_split"]

#: Bounds of the per-row train-time missing rate ``rho ~ U(RHO_LOW, RHO_HIGH)`` (Peis et al. 2022 §4).
RHO_LOW, RHO_HIGH = 0.01, 0.99


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from a tuple of integers (e.g. ``(seed, fold)``) with numpy's ``SeedSequence``;
    distinct tuples give unrelated streams."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def sample_train_mask(x_mask: torch.Tensor, y_mask: Optional[torch.Tensor],
                      generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Train-time missingness of Peis et al. 2022 §4: each row ``n`` draws ``rho_n ~ U(0.01, 0.99)`` and
    each *observed* entry of that row (every ``x`` column and the ``y`` entry) is kept with probability
    ``1 - rho_n``. Entries that are already missing stay missing.

    Args:
        x_mask: ``(B, D)`` bool, ``True`` = observed.
        y_mask: ``(B, Dy)`` bool or ``None``.
        generator: a CPU ``torch.Generator`` (the draws are made on CPU and moved to ``x_mask.device`` so that the
            result is the same on every device).

    Returns:
        ``(x_mask, y_mask)``: new bool masks of the same shapes (``y_mask`` stays ``None`` if given ``None``).
    """
    b, d = x_mask.shape
    rho = RHO_LOW + (RHO_HIGH - RHO_LOW) * torch.rand(b, 1, generator=generator)
    keep_x = torch.rand(b, d, generator=generator) >= rho
    new_x = x_mask & keep_x.to(x_mask.device)
    new_y = None
    if y_mask is not None:
        keep_y = torch.rand(b, y_mask.shape[1], generator=generator) >= rho
        new_y = y_mask & keep_y.to(y_mask.device)
    return new_x, new_y


@dataclass
class TensorTable:
    """Rows of a table in the normalised domain, as tensors.

    Attributes:
        x: ``(N, D)`` float32 normalised features (class code for discrete columns), ``0.0`` where missing.
        x_mask: ``(N, D)`` bool, ``True`` = observed.
        y: ``(N, 1)`` float32 normalised target (class code for classification), ``0.0`` where missing; or ``None``.
        y_mask: ``(N, 1)`` bool or ``None``.
        index: ``(N,)`` long row positions in the :class:`~ppl_vae.data.registry.TableDataset` these rows come from.
    """

    x: torch.Tensor
    x_mask: torch.Tensor
    y: Optional[torch.Tensor]
    y_mask: Optional[torch.Tensor]
    index: torch.Tensor

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: Optional[np.ndarray], index) -> "TensorTable":
        """Build from normalised arrays with NaN = missing: ``x`` ``(N, D)``, ``y`` ``(N, 1)`` or ``None``."""
        x = np.asarray(x, dtype=np.float32)
        xm = ~np.isnan(x)
        xt = torch.from_numpy(np.where(xm, x, np.float32(0.0)))
        yt = ym = None
        if y is not None:
            y = np.asarray(y, dtype=np.float32).reshape(len(x), -1)
            ymn = ~np.isnan(y)
            yt, ym = torch.from_numpy(np.where(ymn, y, np.float32(0.0))), torch.from_numpy(ymn)
        return cls(xt, torch.from_numpy(xm), yt, ym, torch.as_tensor(np.asarray(index), dtype=torch.long))

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def num_features(self) -> int:
        """``D``."""
        return self.x.shape[1]

    def to(self, device) -> "TensorTable":
        """Copy with every tensor on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TensorTable(mv(self.x), mv(self.x_mask), mv(self.y), mv(self.y_mask), mv(self.index))

    def batch(self, rows=None, device=None) -> Batch:
        """A :class:`~ppl_vae.models.base.Batch` of some rows (all rows when ``rows`` is ``None``).

        Args:
            rows: positions in this table (index tensor / array, slice or bool mask).
            device: move the batch there (default: where the table is).

        Returns:
            ``Batch(x, x_mask, y, y_mask, group=None, index=dataset row indices)`` in the normalised domain, natural
            missingness only.
        """
        sel = (lambda t: t) if rows is None else (lambda t: None if t is None else t[_rows(rows, t.device)])
        b = Batch(x=sel(self.x), x_mask=sel(self.x_mask), y=sel(self.y), y_mask=sel(self.y_mask), group=None,
                  index=sel(self.index))
        return b if device is None else b.to(device)

    def loader(self, batch_size: int, seed: int, train_missingness: bool = True, device=None,
               drop_last: bool = True) -> Iterator[Batch]:
        """Infinite minibatch iterator over shuffled epochs (Peis et al. 2022 training protocol).

        Each epoch is a permutation drawn from ``torch.Generator().manual_seed(seed)``. With ``train_missingness``
        every drawn batch passes through :func:`sample_train_mask` (fresh ``rho ~ U(0.01, 0.99)`` per row; each
        observed ``x`` entry and the ``y`` entry kept with probability ``1 - rho``), and the newly hidden entries
        of ``x`` / ``y`` are zeroed. Naturally missing entries are never revealed. Deterministic given ``seed``.

        Args:
            batch_size: rows per batch (capped at ``len(self)``).
            seed: seed of the shuffling and masking generator.
            train_missingness: apply the per-row random missingness.
            device: device of the yielded batches.
            drop_last: drop the last incomplete batch of each epoch (default; every row is still seen over epochs
                because each epoch is a fresh permutation).

        Yields:
            :class:`~ppl_vae.models.base.Batch` with ``x`` ``(B, D)``, ``x_mask`` ``(B, D)``, ``y``/``y_mask``
            ``(B, 1)`` (or ``None``), ``index`` ``(B,)`` dataset row indices.

        Raises:
            ValueError: ``batch_size < 1`` or an empty table.
        """
        n = len(self)
        if batch_size < 1 or n == 0:
            raise ValueError(f"loader needs batch_size >= 1 and a non-empty table (batch_size={batch_size}, N={n})")
        bs = min(int(batch_size), n)
        gen = torch.Generator().manual_seed(int(seed))
        src = self.to("cpu")
        while True:
            perm = torch.randperm(n, generator=gen)
            stop = n - n % bs if drop_last else n
            for start in range(0, stop, bs):
                b = src.batch(perm[start:start + bs])
                if train_missingness:
                    xm, ym = sample_train_mask(b.x_mask, b.y_mask, gen)
                    b = Batch(x=b.x * xm, x_mask=xm, y=None if b.y is None else b.y * ym, y_mask=ym,
                              group=None, index=b.index)
                yield b if device is None else b.to(device)


def _rows(rows, device):
    if isinstance(rows, slice):
        return rows
    if isinstance(rows, torch.Tensor):
        return rows.to(device)
    return torch.as_tensor(np.asarray(rows), device=device)


@dataclass
class Split:
    """One train/test split of a data set (Peis et al. 2022 §4, seeded).

    Attributes:
        fold: fold number ``0..n_splits-1``.
        train: training rows, natural missingness only (apply train-time missingness with ``train.loader``).
        test: test rows, natural missingness only: the ground truth for evaluation.
        test_mask: ``(N_test, D)`` bool, ``True`` = entry hidden at test time: a seeded MCAR mask with rate
            ``test_missing_rate`` over the entries that are observed in ``test`` (always ``False`` where
            ``test.x_mask`` is ``False``).
        normaliser: the :class:`Normaliser` fitted on the training rows only.
        train_rows, test_rows: ``int64`` row positions in the data set.
    """

    fold: int
    train: TensorTable
    test: TensorTable
    test_mask: torch.Tensor
    normaliser: Normaliser
    train_rows: np.ndarray
    test_rows: np.ndarray

    def test_input(self, device=None) -> Batch:
        """What a model sees at test time: ``x_mask = test.x_mask & ~test_mask``, ``x`` zeroed where not observed,
        ``y`` all zeros with ``y_mask`` all ``False`` (target fully unobserved), ``index`` = dataset rows.

        Returns:
            :class:`~ppl_vae.models.base.Batch` of all ``N_test`` rows, normalised domain.
        """
        t = self.test
        xm = t.x_mask & ~self.test_mask.to(t.x_mask.device)
        y = ym = None
        if t.y is not None:
            y, ym = torch.zeros_like(t.y), torch.zeros_like(t.y_mask)
        b = Batch(x=t.x * xm, x_mask=xm, y=y, y_mask=ym, group=None, index=t.index.clone())
        return b if device is None else b.to(device)

    @property
    def hidden_mask(self) -> torch.Tensor:
        """``(N_test, D)`` bool: entries observed in the data but hidden at test time (the imputation targets U)."""
        return self.test_mask & self.test.x_mask


def require_batch(obj, where: str) -> Batch:
    """``obj`` if it is a :class:`~ppl_vae.models.base.Batch`, else a :class:`TypeError` saying what to pass
    instead (a DataFrame goes to ``ppl_vae.impute``/``predict``; a Split's tensors are ``split.test_input()``).
    For functions that take normalised tensors."""
    if isinstance(obj, Batch):
        return obj
    kind = type(obj).__name__
    if kind in ("DataFrame", "Series", "TableDataset"):
        hint = ("for a table in original units use ppl_vae.impute(trained, df) / ppl_vae.predict(trained, df); "
                "for normalised tensors pass dataset.to_table().batch() or split.test_input()")
    elif isinstance(obj, Split):
        hint = "pass split.test_input() (test rows, hidden cells masked) or split.train.batch()"
    elif isinstance(obj, TensorTable):
        hint = "pass table.batch()"
    else:
        hint = "build one with ppl_vae.data.TensorTable.from_arrays(x, y, index).batch()"
    raise TypeError(f"{where} expects a ppl_vae Batch (normalised tensors), got {kind}; {hint}")


def require_split(obj, where: str) -> "Split":
    """``obj`` if it is a :class:`Split`, else a :class:`TypeError` saying what to pass instead (for functions that
    evaluate on a split, e.g. ``evaluate_split``)."""
    if isinstance(obj, Split):
        return obj
    kind = type(obj).__name__
    hint = ("pass one of dataset.splits(n_splits=10, seed=0)" if kind in ("TableDataset", "DataFrame") else
            "build splits with ppl_vae.from_dataframe(df, target=...).splits()")
    raise TypeError(f"{where} expects a ppl_vae.data.Split, got {kind}; {hint}")

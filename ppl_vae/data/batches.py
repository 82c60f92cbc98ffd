"""Structured image batches for global-factor models (UG-VAE, Peis et al. 2023; ML-VAE, Bouchacourt et al. 2018).

UG-VAE learns one global latent per *batch*, so the experiments build batches on purpose:

- ``"random"`` batches: rows drawn uniformly (the training batches);
- ``"class"`` batches: every row from one randomly chosen class (digit, attribute or source);
- ``"mixed"`` batches: rows drawn from two sources (domain alignment);
- "MNIST series" batches (:func:`series_batches`): 128 consecutive decimal digits of a number sequence (even
  numbers, odd numbers, Fibonacci numbers, primes), each digit drawn as a random MNIST image of that digit.

Everything is seeded by a :class:`torch.Generator`; each batch is a :class:`ppl_vae.models.base.Batch` with
``x (B, 784)`` in ``[0, 1]``, ``x_mask`` all ``True``, ``y = label (B, 1)`` float, ``y_mask`` all ``True``,
``group (B,)`` the batch category and ``index (B,)`` the rows used.

Images: the MNIST test set (LeCun et al. 1998; 10,000 28x28 digits), read from the copy vendored in
``ppl_vae/data/files/mnist`` by :func:`ppl_vae.data.registry.read_mnist_test` (the package's one MNIST reader); the
scikit-learn 8x8 digits (UCI optdigits test set, Alpaydin & Kaynak 1998) upsampled to 28x28 as a second source.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ppl_vae.data.registry import MNIST_FILES, read_mnist_test
from ppl_vae.errors import DataError, UnknownNameError
from ppl_vae.models.base import Batch

__all__ = ["MNIST_FILES", "load_mnist_images", "mnist_unless_given", "SERIES_KINDS", "series_digits",
           "series_batches", "StructuredBatchSampler", "SAMPLER_MODES", "RANDOM_CATEGORY", "TwoSourceData",
           "two_source_dataset", "load_sklearn_digits28", "make_batch"]

#: Kinds of "MNIST series" batches, in the order of their category code (``group`` value 0..3).
SERIES_KINDS = ("even", "odd", "fibonacci", "prime")
#: Modes of :class:`StructuredBatchSampler`.
SAMPLER_MODES = ("random", "class", "mixed")
#: ``group`` value of every row of a ``"random"`` batch.
RANDOM_CATEGORY = -1


# ---------------------------------------------------------------------------------------------------- loading
def load_mnist_images(directory: Optional[str | Path] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test set as flat float images and integer labels.

    Args:
        directory: a folder holding :data:`MNIST_FILES`; by default the copy vendored in
            ``ppl_vae/data/files/mnist``.

    Returns:
        ``(images (10000, 784) float32 in [0, 1], labels (10000,) int64 in 0..9)`` (fresh tensors, CPU).

    Raises:
        FileNotFoundError: ``directory`` lacks one of the files.
        ppl_vae.errors.DataError: a vendored file is missing, or the two files disagree in length.

    Source: LeCun et al. 1998, MNIST test set, read by :func:`ppl_vae.data.registry.read_mnist_test`.
    """
    images, labels = read_mnist_test(directory)
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def mnist_unless_given(images: Optional[torch.Tensor], labels: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` as given, or the MNIST test set (:func:`load_mnist_images`) when either is ``None``.

    Shapes: ``images (N, 784)``, ``labels (N,)``.
    """
    if images is None or labels is None:
        return load_mnist_images()
    return images, labels


def load_sklearn_digits28() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 images, values 0..16) scaled to ``[0, 1]`` and bilinearly upsampled to 28x28.

    Returns:
        ``(images (1797, 784) float32 in [0, 1], labels (1797,) int64 in 0..9)``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    small = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0          # (N, 1, 8, 8)
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return big.reshape(-1, 784).contiguous(), torch.as_tensor(data.target, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------- batches
def _generator(generator: Optional[torch.Generator], seed: Optional[int]) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


def make_batch(images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, category: torch.Tensor | int,
               device: torch.device | str = "cpu") -> Batch:
    """Build a :class:`Batch` from selected rows.

    Args:
        images: ``(N, D)`` float.
        labels: ``(N,)`` long.
        rows: ``(B,)`` long row indices.
        category: the batch category (int, same for every row) or a ``(B,)`` long tensor (per-row category).
        device: where the batch lives.

    Returns:
        a :class:`Batch` with ``x (B, D)``, ``x_mask`` all ``True``, ``y (B, 1)`` float labels, ``y_mask`` all
        ``True``, ``group (B,)`` long category, ``index (B,)`` = ``rows``.
    """
    x = images[rows].to(device)
    y = labels[rows].to(device=device, dtype=x.dtype).unsqueeze(-1)
    if isinstance(category, torch.Tensor):
        group = category.to(device=device, dtype=torch.long)
    else:
        group = torch.full((rows.numel(),), int(category), dtype=torch.long, device=device)
    return Batch(x=x, x_mask=torch.ones_like(x, dtype=torch.bool), y=y, y_mask=torch.ones_like(y, dtype=torch.bool),
                 group=group, index=rows.to(device))


def _primes(count: int) -> list[int]:
    out: list[int] = []
    n = 2
    while len(out) < count:
        if all(n % p for p in out if p * p <= n):
            out.append(n)
        n += 1
    return out


def series_digits(kind: str, num_digits: int = 256) -> torch.Tensor:
    """The first ``num_digits`` decimal digits of a number sequence written one number after another.

    ``"even"``: 0 2 4 6 8 10 12 ... -> ``0,2,4,6,8,1,0,1,2,...``; ``"odd"``: 1 3 5 ...; ``"fibonacci"``:
    0 1 1 2 3 5 8 13 ...; ``"prime"``: 2 3 5 7 11 ...

    Returns:
        ``(num_digits,)`` int64 tensor of digits ``0..9``.

    Raises:
        ppl_vae.errors.UnknownNameError: unknown ``kind``. ValueError: ``num_digits < 1``.

    Source: Peis et al. 2023 (UG-VAE), "MNIST series" experiment.
    """
    if kind not in SERIES_KINDS:
        raise UnknownNameError("series kind", kind, SERIES_KINDS)
    if num_digits < 1:
        raise ValueError(f"num_digits must be >= 1, got {num_digits}")
    text = ""
    if kind in ("even", "odd"):
        n = 0 if kind == "even" else 1
        while len(text) < num_digits:
            text += str(n)
            n += 2
    elif kind == "fibonacci":
        a, b = 0, 1
        while len(text) < num_digits:
            text += str(a)
            a, b = b, a + b
    else:
        count = 16
        while len(text) < num_digits:
            text = "".join(str(p) for p in _primes(count))
            count *= 2
    return torch.tensor([int(c) for c in text[:num_digits]], dtype=torch.long)


def _rows_by_class(labels: torch.Tensor) -> dict[int, torch.Tensor]:
    return {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}


def _pick(pool: torch.Tensor, count: int, generator: torch.Generator, replace: Optional[bool] = None) -> torch.Tensor:
    """``count`` entries of ``pool``: without replacement when the pool is large enough (or ``replace=False``)."""
    if replace is None:
        replace = pool.numel() < count
    if replace:
        return pool[torch.randint(pool.numel(), (count,), generator=generator)]
    return pool[torch.randperm(pool.numel(), generator=generator)[:count]]


def series_batches(kind: str, num_batches: int, images: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None, batch_size: int = 128, num_digits: int = 256,
                   generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                   device: torch.device | str = "cpu") -> list[Batch]:
    """"MNIST series" batches (Peis et al. 2023): each batch spells ``batch_size`` consecutive digits of a sequence.

    For each batch: write the sequence's first ``num_digits`` digits (:func:`series_digits`), draw an offset
    uniformly in ``0..num_digits - batch_size``, and fill digit ``t`` of the window with a uniformly chosen image
    of that digit.

    Args:
        kind: one of :data:`SERIES_KINDS`.
        num_batches: number of batches.
        images, labels: ``(N, 784)`` images and ``(N,)`` digit labels; default :func:`load_mnist_images`.
        batch_size: digits per batch (``<= num_digits``).
        num_digits: length of the written sequence.
        generator / seed: randomness (a fresh ``torch.Generator`` seeded with ``seed`` when no generator).
        device: where the batches live.

    Returns:
        ``num_batches`` :class:`Batch` es; ``y[:, 0]`` spells the digit window in order, ``group`` is
        ``SERIES_KINDS.index(kind)`` for every row.

    Raises:
        ppl_vae.errors.UnknownNameError: unknown kind. ValueError: ``batch_size > num_digits``.
        ppl_vae.errors.DataError: a digit of the sequence has no image.
    """
    if batch_size > num_digits:
        raise ValueError(f"batch_size {batch_size} exceeds num_digits {num_digits}")
    images, labels = mnist_unless_given(images, labels)
    g = _generator(generator, seed)
    digits = series_digits(kind, num_digits)
    by_class = _rows_by_class(labels)
    missing = sorted(set(digits.tolist()) - set(by_class))
    if missing:
        raise DataError(f"no image for digit(s) {missing} needed by the {kind!r} series")
    code = SERIES_KINDS.index(kind)
    out = []
    for _ in range(num_batches):
        start = int(torch.randint(num_digits - batch_size + 1, (1,), generator=g))
        window = digits[start:start + batch_size]
        rows = torch.empty(batch_size, dtype=torch.long)
        for digit in torch.unique(window).tolist():
            where = torch.nonzero(window == digit).flatten()
            rows[where] = _pick(by_class[digit], where.numel(), g, replace=True)
        out.append(make_batch(images, labels, rows, code, device))
    return out


class StructuredBatchSampler:
    """Seeded sampler of structured batches (Peis et al. 2023: random, single-class, or two-source batches).

    Args:
        images: ``(N, D)`` float images (``D = 784`` for MNIST) in ``[0, 1]``.
        labels: ``(N,)`` long class labels (digit, attribute...); used by ``"class"`` mode and stored in ``y``.
        batch_size: rows per batch.
        mode: ``"random"`` (uniform rows without replacement, ``group = -1``), ``"class"`` (all rows from one
            class chosen uniformly among ``classes``, ``group = that class``) or ``"mixed"`` (``mix_fraction`` of
            the rows from one source and the rest from another, both chosen at random among the sources,
            ``group = per-row source``).
        sources: ``(N,)`` long source ids (required by ``"mixed"``).
        classes: classes a ``"class"`` batch may use (default: every label present).
        mix_fraction: share of a mixed batch drawn from its first source, in ``(0, 1)``.
        num_batches: length of one iteration (``None``: iterate forever).
        generator / seed: randomness (``seed`` seeds a fresh CPU generator when no generator is given).
        device: where the batches live.

    Rows are drawn without replacement within a batch when the pool is large enough (else with replacement).
    Iterate (``for batch in sampler``) or call :meth:`sample`.

    Raises:
        ppl_vae.errors.UnknownNameError: unknown mode. ValueError: shape mismatch, empty class, ``batch_size < 1``,
        ``"mixed"`` without two sources, ``mix_fraction`` outside ``(0, 1)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128, mode: str = "random",
                 sources: Optional[torch.Tensor] = None, classes: Optional[Sequence[int]] = None,
                 mix_fraction: float = 0.5, num_batches: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 device: torch.device | str = "cpu"):
        if mode not in SAMPLER_MODES:
            raise UnknownNameError("batch mode", mode, SAMPLER_MODES)
        if images.dim() != 2 or labels.shape != images.shape[:1]:
            raise ValueError(f"images must be (N, D) and labels (N,), got {tuple(images.shape)} and "
                             f"{tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels.long()
        self.batch_size, self.mode, self.num_batches = batch_size, mode, num_batches
        self.device = device
        self.generator = _generator(generator, seed)
        self._by_class = _rows_by_class(self.labels)
        self.classes = sorted(self._by_class) if classes is None else [int(c) for c in classes]
        for c in self.classes:
            if c not in self._by_class:
                raise ValueError(f"class {c} has no rows")
        self.sources = None
        if mode == "mixed":
            if sources is None or sources.shape != labels.shape:
                raise ValueError("mode 'mixed' needs sources of shape (N,)")
            if not 0.0 < mix_fraction < 1.0:
                raise ValueError(f"mix_fraction must be in (0, 1), got {mix_fraction}")
            self.sources = sources.long()
            self._by_source = _rows_by_class(self.sources)
            if len(self._by_source) < 2:
                raise ValueError("mode 'mixed' needs at least two sources")
        self.mix_fraction = mix_fraction

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless sampler (num_batches=None) has no length")
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        count = 0
        while self.num_batches is None or count < self.num_batches:
            yield self.sample()
            count += 1

    def sample(self) -> Batch:
        """Draw one batch (see the class docstring). Returns a :class:`Batch` of ``batch_size`` rows."""
        g, B = self.generator, self.batch_size
        if self.mode == "random":
            rows = _pick(torch.arange(self.labels.numel()), B, g)
            return make_batch(self.images, self.labels, rows, RANDOM_CATEGORY, self.device)
        if self.mode == "class":
            c = self.classes[int(torch.randint(len(self.classes), (1,), generator=g))]
            rows = _pick(self._by_class[c], B, g)
            return make_batch(self.images, self.labels, rows, c, self.device)
        ids = sorted(self._by_source)
        first, second = (ids[int(i)] for i in torch.randperm(len(ids), generator=g)[:2])
        n_first = min(max(int(round(self.mix_fraction * B)), 1), B - 1) if B > 1 else 1
        rows = torch.cat([_pick(self._by_source[first], n_first, g), _pick(self._by_source[second], B - n_first, g)])
        rows = rows[torch.randperm(rows.numel(), generator=g)]
        return make_batch(self.images, self.labels, rows, self.sources[rows], self.device)


# ---------------------------------------------------------------------------------------------------- two sources
@dataclass
class TwoSourceData:
    """Images from two sources (domain alignment, Peis et al. 2023).

    Attributes:
        images: ``(N, 784)`` float in ``[0, 1]``.
        labels: ``(N,)`` long digit labels.
        sources: ``(N,)`` long source id (0 = MNIST, 1 = the other source).
        names: the two source names.
    """

    images: torch.Tensor
    labels: torch.Tensor
    sources: torch.Tensor
    names: tuple[str, str]


_TWO_SOURCE_KINDS = ("digits", "inverted")


def two_source_dataset(kind: str = "digits", n_per_source: Optional[int] = None,
                       images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> TwoSourceData:
    """Two-source digit images for domain alignment.

    Args:
        kind: ``"digits"`` (MNIST vs scikit-learn 8x8 digits upsampled to 28x28, :func:`load_sklearn_digits28`)
            or ``"inverted"`` (MNIST vs colour-inverted MNIST ``1 - x``; the two halves use disjoint rows).
        n_per_source: images per source (default: 1797 for ``"digits"``, half the MNIST rows for ``"inverted"``).
        images, labels: the MNIST images/labels (default :func:`load_mnist_images`).
        generator / seed: which rows are used.

    Returns:
        :class:`TwoSourceData`, source 0 first.

    Raises:
        ppl_vae.errors.UnknownNameError: unknown kind. ValueError: ``n_per_source`` larger than a source.
    """
    if kind not in _TWO_SOURCE_KINDS:
        raise UnknownNameError("two-source kind", kind, _TWO_SOURCE_KINDS)
    images, labels = mnist_unless_given(images, labels)
    g = _generator(generator, seed)
    perm = torch.randperm(labels.numel(), generator=g)
    if kind == "digits":
        other, other_labels = load_sklearn_digits28()
        n = n_per_source or other_labels.numel()
        if n > min(other_labels.numel(), labels.numel()):
            raise ValueError(f"n_per_source={n} exceeds the smaller source")
        pick = torch.randperm(other_labels.numel(), generator=g)[:n]
        x1, y1 = other[pick], other_labels[pick]
        rows0 = perm[:n]
        names = ("mnist", "sklearn-digits")
    else:
        n = n_per_source or labels.numel() // 2
        if 2 * n > labels.numel():
            raise ValueError(f"n_per_source={n} exceeds half the MNIST rows")
        rows0, rows1 = perm[:n], perm[n:2 * n]
        x1, y1 = 1.0 - images[rows1], labels[rows1]
        names = ("mnist", "mnist-inverted")
    x = torch.cat([images[rows0], x1])
    y = torch.cat([labels[rows0], y1])
    s = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    return TwoSourceData(images=x, labels=y, sources=s, names=names)

"""Seeded "moving digits" video sequences and their :class:`~ppl_vae.models.base.Batch` encoding.

A sequence is an 8x8 scikit-learn digit (``sklearn.datasets.load_digits``, the UCI optical-recognition digits of
Alpaydin & Kaynak 1998; grey levels ``0..16`` scaled to ``[0, 1]``) pasted onto a blank ``canvas x canvas`` frame
and moving with a constant random integer velocity, bouncing off the walls: the moving-MNIST construction of
Srivastava, Mansimov & Salakhutdinov (2015, "Unsupervised learning of video representations using LSTMs", ICML) and
of the SVG experiments (Denton & Fergus 2018, ICML, stochastic moving MNIST), shrunk to 8x8 digits so that it runs
on a CPU.

Bouncing: the digit's top-left corner ``p`` (per axis, integer) lies in ``[0, L]`` with ``L = canvas - 8``; it
moves by ``v`` per frame and is reflected at the walls, i.e. ``p_t = L - |L - ((p_0 + v t) mod 2L)|`` (a triangle
wave), so the whole 8x8 patch stays on the canvas at every frame.

A batch of sequences is flattened frame after frame, ``x (B, T*D)`` with ``D = canvas**2``, so that the package's
:class:`~ppl_vae.infer.svi.Trainer` and :class:`~ppl_vae.models.base.Batch` work unchanged; a missing frame is an
all-``False`` block of ``x_mask``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch

from ppl_vae.models.base import Batch

__all__ = ["DIGIT_SIZE", "SOURCES", "moving_digits", "sequence_batch", "bounce"]

#: side of the pasted digit (scikit-learn digits are 8x8)
DIGIT_SIZE = 8
#: digit sources understood by :func:`moving_digits`
SOURCES = ("sklearn",)


@lru_cache(maxsize=1)
def _sklearn_digits() -> np.ndarray:
    """The 1,797 scikit-learn digits as ``(1797, 8, 8)`` float32 in ``[0, 1]`` (grey level / 16)."""
    from sklearn.datasets import load_digits

    return (load_digits().images / 16.0).astype(np.float32)


def bounce(u: np.ndarray, limit) -> np.ndarray:
    """Reflect unconstrained integer positions ``u`` into ``[0, limit]`` (walls at 0 and ``limit``).

    ``bounce(u) = limit - |limit - (u mod 2 limit)|``, the position of a point moving along ``u`` and bouncing
    elastically off both walls; ``limit = 0`` pins the position to 0. Shapes: ``u`` and ``limit`` (an int or an
    array) broadcast; the result has their broadcast shape.
    """
    limit = np.asarray(limit)
    return np.where(limit > 0, limit - np.abs(limit - np.mod(u, np.maximum(2 * limit, 1))), 0)


def moving_digits(num_sequences: int, seq_len: int = 10, canvas: int = 20, seed: int = 0, source: str = "sklearn",
                  *, max_speed: int = 2, digit_rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Seeded moving-digit sequences (one digit per sequence, constant velocity, bouncing off the walls).

    Args:
        num_sequences: N sequences.
        seq_len: T frames per sequence.
        canvas: side of the square frame (``>= 8``); ``D = canvas**2`` pixels per frame.
        seed: seed of the digit choice, start positions and velocities (same seed, same data).
        source: ``"sklearn"`` (the 8x8 ``load_digits`` images).
        max_speed: each velocity component is drawn uniformly from ``-max_speed..max_speed`` (integers; a
            velocity ``(0, 0)`` is redrawn as ``(max_speed, max_speed)`` so every digit moves).
        digit_rows: rows of ``load_digits`` to draw the digits from (default: all 1,797), e.g. disjoint pools for
            training and held-out sequences.

    Returns:
        ``(N, T, canvas * canvas)`` float32 in ``[0, 1]`` (row-major frames).

    Raises:
        ValueError: ``num_sequences < 1``, ``seq_len < 1``, ``canvas < 8``, ``max_speed`` not in
            ``1..canvas-8`` (or ``canvas == 8``: the digit cannot move), an empty or out-of-range ``digit_rows``.
        ppl_vae.errors.UnknownNameError: unknown ``source``.
    """
    from ppl_vae.errors import UnknownNameError

    if source not in SOURCES:
        raise UnknownNameError("digit source", source, SOURCES)
    limit = canvas - DIGIT_SIZE
    if num_sequences < 1 or seq_len < 1:
        raise ValueError(f"num_sequences and seq_len must be >= 1, got {num_sequences} and {seq_len}")
    if limit < 1:
        raise ValueError(f"canvas must be > {DIGIT_SIZE} (the digit side) so the digit can move, got {canvas}")
    if not 1 <= max_speed <= limit:
        raise ValueError(f"max_speed must be in 1..{limit} (canvas - {DIGIT_SIZE}), got {max_speed}")
    digits = _sklearn_digits()
    pool = np.arange(len(digits)) if digit_rows is None else np.asarray(digit_rows, dtype=np.int64).reshape(-1)
    if pool.size == 0 or pool.min() < 0 or pool.max() >= len(digits):
        raise ValueError(f"digit_rows must be a non-empty subset of 0..{len(digits) - 1}")
    rng = np.random.default_rng(seed)
    which = pool[rng.integers(len(pool), size=num_sequences)]
    start = rng.integers(0, limit + 1, size=(num_sequences, 2))
    velocity = rng.integers(-max_speed, max_speed + 1, size=(num_sequences, 2))
    velocity[(velocity == 0).all(1)] = max_speed
    t = np.arange(seq_len)
    pos = bounce(start[:, None, :] + velocity[:, None, :] * t[None, :, None], limit)       # (N, T, 2) top-left
    offs = np.arange(DIGIT_SIZE)
    rows = (pos[..., 0, None] + offs)[..., :, None]                                        # (N, T, 8, 1)
    cols = (pos[..., 1, None] + offs)[..., None, :]                                        # (N, T, 1, 8)
    frames = np.zeros((num_sequences, seq_len, canvas, canvas), dtype=np.float32)
    n_idx = np.arange(num_sequences)[:, None, None, None]
    t_idx = t[None, :, None, None]
    frames[n_idx, t_idx, rows, cols] = digits[which][:, None]
    return torch.from_numpy(frames.reshape(num_sequences, seq_len, canvas * canvas))


def sequence_batch(frames: torch.Tensor, observed: Optional[torch.Tensor] = None) -> Batch:
    """Flatten sequences into one :class:`Batch`: ``x (B, T*D)`` frame after frame, ``x_mask`` True where observed.

    Args:
        frames: ``(B, T, D)`` float; NaN pixels count as missing.
        observed: optional ``(B, T)`` bool, ``False`` for a missing frame (its ``D`` mask entries are all False).

    Returns:
        ``Batch(x (B, T*D) with missing pixels set to 0, x_mask (B, T*D) bool)``, no target, on ``frames``' device.

    Raises:
        ValueError: ``frames`` not 3-D with ``T, D >= 1``, or ``observed`` not ``(B, T)``.
    """
    if frames.dim() != 3 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"frames must be (batch, seq_len, frame_dim) with seq_len, frame_dim >= 1, "
                         f"got shape {tuple(frames.shape)}")
    b, t, d = frames.shape
    mask = ~torch.isnan(frames)
    if observed is not None:
        if tuple(observed.shape) != (b, t):
            raise ValueError(f"observed must be (batch, seq_len) = {(b, t)}, got {tuple(observed.shape)}")
        mask = mask & observed.to(device=frames.device, dtype=torch.bool)[..., None]
    x = torch.where(mask, frames, torch.zeros_like(frames))
    return Batch(x=x.reshape(b, t * d), x_mask=mask.reshape(b, t * d))

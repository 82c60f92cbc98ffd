"""Next-frame prediction of the SVG-LP sequential VAE (Denton & Fergus 2018, §3) on moving digits, against the
last-frame and constant-velocity baselines.

Data: :func:`ppl_vae.data.sequences.moving_digits`, 8x8 scikit-learn digits bouncing on a 20x20 canvas, 10 frames
per sequence; training and held-out sequences draw their digits from a seeded 80 % / 20 % split of the 1,797
``load_digits`` images, so held-out sequences show unseen digit images.

Measured on the held-out sequences (frames numbered 1..T): the error of the prediction of frame ``t+1`` from frames
``1..t``,

- ``*_mse``: mean squared error per pixel at ``t = 5``; ``*_mse_avg``: the same averaged over ``t = 3..9``;
- ``model_nll``: Bernoulli negative log-likelihood (nats per frame) of the true frame ``t+1`` (``t = 5``) under the
  per-pixel Bernoulli of the model's mean prediction (the marginal of each pixel under the predictive mixture);

for the model (:meth:`SequentialVAE.predict_next`: posterior ``z`` for frames ``1..t``, ``z_{t+1}`` from the learned
prior, decoded and averaged over 20 draws), the last-frame baseline (frame ``t`` copied) and the constant-velocity
baseline (:func:`constant_velocity_prediction`). A PNG strip shows ground truth vs the predictions.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ppl_vae.experiments.lectures.common import save_trained

__all__ = ["run", "constant_velocity_prediction"]


def constant_velocity_prediction(frames: torch.Tensor, canvas: int) -> torch.Tensor:
    """Constant-velocity forecast of the next frame: frame ``t`` shifted by the (rounded) displacement of the centre
    of mass (grey-level weighted) between frames ``t-1`` and ``t``, bouncing off the walls: per axis the shifted ink
    bounding box is reflected into the canvas (:func:`ppl_vae.data.sequences.bounce`).

    Args:
        frames: ``(B, t, canvas**2)`` with ``t >= 2``, values ``>= 0``, each frame with some ink.
        canvas: side of the square frames.

    Returns:
        ``(B, canvas**2)``: the predicted frame ``t+1``.

    Raises:
        ValueError: fewer than 2 frames or a frame width other than ``canvas**2``.
    """
    from ppl_vae.data.sequences import bounce

    if frames.dim() != 3 or frames.shape[1] < 2 or frames.shape[2] != canvas * canvas:
        raise ValueError(f"frames must be (B, t >= 2, {canvas * canvas}), got {tuple(frames.shape)}")
    prev, cur = (frames[:, k].reshape(-1, canvas, canvas).cpu().numpy() for k in (-2, -1))
    grid = np.arange(canvas)
    shift = np.zeros((cur.shape[0], 2), dtype=np.int64)
    for axis in (0, 1):   # axis 0: rows (sum over columns), axis 1: columns
        p_prof, c_prof = prev.sum(2 - axis), cur.sum(2 - axis)                     # (B, canvas) ink profiles
        com = [(w * grid).sum(1) / np.maximum(w.sum(1), 1e-8) for w in (p_prof, c_prof)]
        d = np.rint(com[1] - com[0]).astype(np.int64)
        ink = c_prof > 0
        lo, hi = ink.argmax(1), canvas - 1 - ink[:, ::-1].argmax(1)                 # ink bounding box
        shift[:, axis] = bounce(lo + d, canvas - 1 - (hi - lo)) - lo
    src_r = grid[None, :] - shift[:, :1]                                            # (B, canvas)
    src_c = grid[None, :] - shift[:, 1:]
    valid = ((src_r >= 0) & (src_r < canvas))[:, :, None] & ((src_c >= 0) & (src_c < canvas))[:, None, :]
    b = np.arange(cur.shape[0])[:, None, None]
    out = np.where(valid, cur[b, src_r.clip(0, canvas - 1)[:, :, None], src_c.clip(0, canvas - 1)[:, None, :]], 0)
    return torch.as_tensor(out.reshape(-1, canvas * canvas), dtype=frames.dtype, device=frames.device)


def _strip(truth: torch.Tensor, rows: dict, canvas: int, path: Path) -> Path:
    """PNG: for each sequence a block of rows (ground truth, then each prediction row) of ``T`` frames."""
    from matplotlib.figure import Figure

    from ppl_vae.experiments.ugvae.common import save_figure

    n, T = truth.shape[:2]
    names = ["truth", *rows]
    tiles = torch.stack([truth, *rows.values()], 1).clamp(0, 1).reshape(n * len(names), T, canvas, canvas)
    side = canvas + 2
    img = torch.ones(tiles.shape[0] * side, T * side)
    for r in range(tiles.shape[0]):
        for c in range(T):
            img[r * side + 1:r * side + 1 + canvas, c * side + 1:c * side + 1 + canvas] = tiles[r, c]
    fig = Figure(figsize=(T * 0.55 + 1.2, tiles.shape[0] * 0.55 + 0.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(img.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([c * side + side // 2 for c in range(T)], [str(c + 1) for c in range(T)], fontsize=7)
    ax.set_yticks([r * side + side // 2 for r in range(tiles.shape[0])], names * n, fontsize=7)
    ax.set_title("moving digits: next-frame predictions from frames 1..t (blank: no prediction)", fontsize=8)
    return save_figure(fig, path)


def run(out_dir: Optional[str | Path] = None, *, steps: int = 2000, seed: int = 0, device: str = "cpu",
        smoke: bool = False, progress: bool = False, n_train: int = 2000, n_test: int = 500, t_eval: int = 5,
        batch_size: int = 64, lr: float = 4e-3, num_samples: int = 20) -> dict:
    """Train :class:`~ppl_vae.models.image.sequential.SequentialVAE` on ``n_train`` moving-digit sequences (10
    frames, 20x20) and measure next-frame prediction on ``n_test`` held-out sequences (see the module docstring).

    Settings: ``steps`` SVI steps (Trace_ELBO, ClippedAdam ``lr``, ``batch_size`` sequences per step) with the
    default model (``dim_z=8``, MLP frame networks of 256 units, GRUs of 128); ``smoke=True``: 300 / 100
    sequences, 30 steps, small networks (~15 s). Writes ``sequential_predictions.png`` into ``out_dir`` when given.

    Returns:
        ``{"model": "seq-vae", "model_mse", "last_frame_mse", "constant_velocity_mse" (t = t_eval), the same with
        ``_avg`` (t = 3..9), "model_nll", "t_eval", "train_rows", "test_rows", "steps", "final_loss", "seconds"}``.

    Raises:
        ValueError: ``t_eval`` not in ``2..9``.
    """
    from ppl_vae.data.sequences import moving_digits
    from ppl_vae.experiments.lectures.common import labelled_batches, train_model
    from ppl_vae.models.image.sequential import SequentialVAE

    seq_len, canvas = 10, 20
    if not 2 <= t_eval < seq_len:
        raise ValueError(f"t_eval must be in 2..{seq_len - 1}, got {t_eval}")
    start = time.time()
    sizes = {}
    if smoke:
        n_train, n_test, steps, num_samples = 300, 100, min(steps, 30), 5
        sizes = {"hidden": 64, "rnn_hidden": 64}
    rows = np.random.default_rng(seed).permutation(1797)
    train = moving_digits(n_train, seq_len, canvas, seed=seed, digit_rows=rows[:1437])
    test = moving_digits(n_test, seq_len, canvas, seed=seed + 1, digit_rows=rows[1437:]).to(device)
    torch.manual_seed(seed)
    model = SequentialVAE(seq_len=seq_len, frame_dim=canvas * canvas, **sizes)
    losses = train_model(model, labelled_batches(train.reshape(n_train, -1), None, batch_size, seed=seed), steps,
                         lr=lr, seed=seed, device=device, progress=progress)
    model.eval()
    out = {"model": "seq-vae"}
    errors = {"model": [], "last_frame": [], "constant_velocity": []}
    preds = {}
    for t in range(1, seq_len):   # predict frame t+1 (index t) from frames 1..t
        target = test[:, t]
        preds[t] = {"model": model.predict_next(test[:, :t], num_samples), "last_frame": test[:, t - 1]}
        if t >= 2:
            preds[t]["constant_velocity"] = constant_velocity_prediction(test[:, :t], canvas)
        if t >= 3:
            for name, err in errors.items():
                err.append(float(((preds[t][name] - target) ** 2).mean()))
        if t == t_eval:
            for name in errors:
                out[f"{name}_mse"] = float(((preds[t][name] - target) ** 2).mean())
            p = preds[t]["model"].clamp(1e-6, 1 - 1e-6)
            out["model_nll"] = float(-(target * p.log() + (1 - target) * (1 - p).log()).sum(-1).mean())
    for name, err in errors.items():
        out[f"{name}_mse_avg"] = float(np.mean(err))
    out.update(t_eval=t_eval, train_rows=n_train, test_rows=n_test, steps=steps,
               final_loss=float(np.mean(losses[-50:])), seconds=round(time.time() - start, 1))
    if out_dir is not None:
        blank = torch.zeros_like(test[:4, 0])
        strip = {name: torch.stack([blank] + [preds[t].get(name, blank)[:4] for t in range(1, seq_len)], 1)
                 for name in errors}                                                  # (4, T, D); frame 1 blank
        _strip(test[:4].cpu(), {k: v.cpu() for k, v in strip.items()}, canvas,
               Path(out_dir) / "sequential_predictions.png")
    save_trained(model, out_dir)
    return out

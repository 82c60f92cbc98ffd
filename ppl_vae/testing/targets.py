"""Two-dimensional test densities used to check and tune HMC samplers, and a plotting helper.

Every density is a plain torch function ``log_prob(x) -> tensor`` with shape ``(..., 2) -> (...)``, differentiable,
defined on all of R^2 (no constraints). The energy functions come from Rezende & Mohamed (ICML 2015, Table 1,
"U1" = :func:`dual_moon`, "U3" = :func:`wave`), the eight-component ring from the HMC-tuning experiments of
Campbell et al. (ICML 2021) and Peis et al. (HH-VAEM, NeurIPS 2022). They are *unnormalised* (:func:`wave` is even
improper: it does not decay along x1) except :func:`correlated_gaussian`, which is normalised and has closed-form
moments and an exact sampler, for tests.

:data:`TARGETS` maps a name to a :class:`Target` (callable like the log density itself) that also carries the
initial Gaussian proposal used in the tuning experiments, a plotting window, and an exact sampler where one exists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ppl_vae.errors import UnknownNameError

__all__ = [
    "wave",
    "dual_moon",
    "gaussian_ring",
    "correlated_gaussian",
    "Target",
    "TARGETS",
    "get_target",
    "plot_samples",
]

LogProb = Callable[[torch.Tensor], torch.Tensor]


def _check_2d(x: torch.Tensor) -> None:
    if x.shape[-1] != 2:
        raise ValueError(f"2-D target expects a trailing dimension of size 2, got shape {tuple(x.shape)}")


def wave(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised log density of the two-branch "wave" (Rezende & Mohamed 2015, Table 1, energy U3).

    ``log p(x) = log[ exp(-½((x2 - w1)/0.35)²) + exp(-½((x2 - w1 + w2)/0.35)²) ]`` with ``w1 = sin(π x1 / 2)`` and
    ``w2 = 3 exp(-½((x1 - 1)/0.6)²)``. The maximum is ``log 1 ≈ 0`` on the ridges. The density is *improper*: it is
    bounded but does not decay along x1, so only its shape near the initial proposal matters (as in the HMC-tuning
    experiments, which start from N(0, diag(5.5, 1))).

    Args:
        x: ``(..., 2)`` points in R^2.

    Returns:
        ``(...)`` log density (computed with ``logaddexp``: finite everywhere).

    Raises:
        ValueError: trailing dimension is not 2.
    """
    _check_2d(x)
    x1, x2 = x[..., 0], x[..., 1]
    w1 = torch.sin(0.5 * math.pi * x1)
    w2 = 3.0 * torch.exp(-0.5 * ((x1 - 1.0) / 0.6) ** 2)
    a = -0.5 * ((x2 - w1) / 0.35) ** 2
    b = -0.5 * ((x2 - w1 + w2) / 0.35) ** 2
    return torch.logaddexp(a, b)


def dual_moon(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised log density of the "dual moon" (Rezende & Mohamed 2015, Table 1, energy U1).

    ``log p(x) = -½((‖x‖ - 2)/0.4)² + log[ exp(-½((x1 - 2)/0.6)²) + exp(-½((x1 + 2)/0.6)²) ]``: a ring of radius 2
    with two modes at ``x ≈ (±2, 0)``. Proper (integrable); its maximum is ≈ 0.

    Args:
        x: ``(..., 2)`` points in R^2.

    Returns:
        ``(...)`` log density.

    Raises:
        ValueError: trailing dimension is not 2.
    """
    _check_2d(x)
    x1 = x[..., 0]
    radius = torch.linalg.vector_norm(x, dim=-1)
    ring = -0.5 * ((radius - 2.0) / 0.4) ** 2
    modes = torch.logaddexp(-0.5 * ((x1 - 2.0) / 0.6) ** 2, -0.5 * ((x1 + 2.0) / 0.6) ** 2)
    return ring + modes


_RING_K = 8
_RING_RADIUS = 1.0
_RING_SCALE = 0.12


_RING_CACHE: dict = {}


def _ring_means(dtype=torch.float32, device=None) -> torch.Tensor:
    key = (dtype, str(device))
    if key not in _RING_CACHE:
        _RING_CACHE[key] = _ring_means_uncached(dtype, device)
    return _RING_CACHE[key]


def _ring_means_uncached(dtype=torch.float32, device=None) -> torch.Tensor:
    angles = torch.arange(_RING_K, dtype=torch.float64) * (2 * math.pi / _RING_K)
    return torch.stack([torch.cos(angles), torch.sin(angles)], -1).mul(_RING_RADIUS).to(dtype=dtype, device=device)


def gaussian_ring(x: torch.Tensor) -> torch.Tensor:
    """Log density of an equal-weight mixture of 8 isotropic Gaussians on the unit circle (normalised).

    Component k has mean ``(cos(2πk/8), sin(2πk/8))`` and standard deviation 0.12 in each coordinate: eight well
    separated modes (adjacent means are 0.77 apart, ≈ 6 standard deviations), the multimodal target of the
    HMC-tuning experiments (Campbell et al. 2021; HH-VAEM code's ``gaussian_mixture``).

    Args:
        x: ``(..., 2)`` points in R^2.

    Returns:
        ``(...)`` normalised log density.

    Raises:
        ValueError: trailing dimension is not 2.
    """
    _check_2d(x)
    # ‖x - μ_k‖² = ‖x‖² - 2 xᵀμ_k + R²: one (…, 8) projection instead of (…, 8, 2) differences (faster, and it
    # vectorises better under torch.compile)
    means = _ring_means(x.dtype, x.device)
    inv_var = 1.0 / _RING_SCALE**2
    proj = (x[..., :1] * means[:, 0] + x[..., 1:] * means[:, 1]) * inv_var  # (..., K)
    sq = (x * x).sum(-1)
    const = -2 * math.log(_RING_SCALE) - math.log(2 * math.pi) - math.log(_RING_K)
    return torch.logsumexp(proj, -1) - 0.5 * (sq + _RING_RADIUS**2) * inv_var + const


def _sample_ring(n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    k = torch.randint(0, _RING_K, (n,), generator=generator)
    return _ring_means()[k] + _RING_SCALE * torch.randn(n, 2, generator=generator)


def _sample_dual_moon(n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Exact samples by rejection from the uniform distribution on [-4, 4]^2 (log density ≤ log(1 + e^-22) there;
    the mass outside the box is below 1e-5)."""
    out: list[torch.Tensor] = []
    got = 0
    bound = math.log1p(math.exp(-0.5 * (4.0 / 0.6) ** 2)) + 1e-6
    while got < n:
        cand = (torch.rand(4 * n + 64, 2, generator=generator) * 8.0) - 4.0
        u = torch.rand(cand.shape[0], generator=generator)
        keep = cand[u.log() < dual_moon(cand) - bound]
        out.append(keep)
        got += keep.shape[0]
    return torch.cat(out)[:n]


def correlated_gaussian(mean: Sequence[float] | torch.Tensor, cov: Sequence[Sequence[float]] | torch.Tensor) -> "Target":
    """A normalised multivariate Gaussian target ``N(mean, cov)`` (any dimension), with an exact sampler.

    Args:
        mean: ``(dim,)`` mean.
        cov: ``(dim, dim)`` symmetric positive-definite covariance.

    Returns:
        a :class:`Target` whose call is ``log N(x; mean, cov)`` with shape ``(..., dim) -> (...)``; ``.mean`` and
        ``.cov`` hold the parameters and ``.sample(n, generator)`` draws ``(n, dim)`` exact samples.

    Raises:
        ValueError: shapes disagree or ``cov`` is not positive definite.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    cov_t = torch.as_tensor(cov, dtype=torch.float32)
    if mean_t.dim() != 1 or cov_t.shape != (mean_t.shape[0], mean_t.shape[0]):
        raise ValueError(f"mean must be (dim,) and cov (dim, dim); got {tuple(mean_t.shape)} and {tuple(cov_t.shape)}")
    chol, info = torch.linalg.cholesky_ex(cov_t.double())
    if int(info) != 0 or not torch.allclose(cov_t, cov_t.T):
        raise ValueError("cov must be symmetric positive definite")
    chol = chol.float()
    dim = mean_t.shape[0]
    log_det = 2 * torch.log(torch.diagonal(chol)).sum()
    precision = torch.cholesky_inverse(chol.double()).float()
    const = -0.5 * dim * math.log(2 * math.pi) - 0.5 * float(log_det)

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != dim:
            raise ValueError(f"expected trailing dimension {dim}, got shape {tuple(x.shape)}")
        d = x - mean_t.to(x)
        return const - 0.5 * ((d @ precision.to(x)) * d).sum(-1)

    def sample(n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return mean_t + torch.randn(n, dim, generator=generator) @ chol.T

    return Target(
        name="correlated_gaussian",
        log_prob=log_prob,
        init_loc=tuple(float(v) for v in mean_t),
        init_scale=tuple(1.0 for _ in range(dim)),
        extent=(float(mean_t[0]) - 4 * float(cov_t[0, 0]) ** 0.5, float(mean_t[0]) + 4 * float(cov_t[0, 0]) ** 0.5,
                float(mean_t[-1]) - 4 * float(cov_t[-1, -1]) ** 0.5, float(mean_t[-1]) + 4 * float(cov_t[-1, -1]) ** 0.5),
        sampler=sample,
        normalised=True,
        mean=mean_t,
        cov=cov_t,
    )


@dataclass(frozen=True)
class Target:
    """A named log density with the settings the HMC-tuning experiments use for it.

    Calling a :class:`Target` evaluates its log density: ``target(x)`` with ``(..., dim) -> (...)``.

    Attributes:
        name: registry name.
        log_prob: the log density function.
        init_loc: mean of the initial Gaussian proposal ``(dim,)``.
        init_scale: standard deviation of the initial proposal ``(dim,)`` (before inflation).
        extent: plotting window ``(x1_min, x1_max, x2_min, x2_max)``.
        sampler: ``sample(n, generator) -> (n, dim)`` exact sampler, or ``None`` when none exists.
        normalised: whether ``log_prob`` integrates to one.
        mean, cov: closed-form moments when known (:func:`correlated_gaussian`), else ``None``.
    """

    name: str
    log_prob: LogProb
    init_loc: tuple = (0.0, 0.0)
    init_scale: tuple = (1.0, 1.0)
    extent: tuple = (-4.0, 4.0, -4.0, 4.0)
    sampler: Optional[Callable[..., torch.Tensor]] = None
    normalised: bool = False
    mean: Optional[torch.Tensor] = field(default=None, compare=False)
    cov: Optional[torch.Tensor] = field(default=None, compare=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    @property
    def dim(self) -> int:
        return len(self.init_loc)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``(n, dim)`` exact samples.

        Raises:
            NotImplementedError: the target has no exact sampler (e.g. the improper :func:`wave`).
        """
        if self.sampler is None:
            raise NotImplementedError(f"target {self.name!r} has no exact sampler")
        return self.sampler(n, generator)


#: name -> :class:`Target`. Initial proposals follow the HMC-tuning experiments: N(0, diag(5.5, 1)) (variances)
#: for the wave, N(0, 0.1 I) for the ring; the dual moon starts from N(0, I).
TARGETS: dict[str, Target] = {
    "wave": Target("wave", wave, init_loc=(0.0, 0.0), init_scale=(math.sqrt(5.5), 1.0), extent=(-5.0, 5.0, -4.0, 4.0)),
    "dual_moon": Target("dual_moon", dual_moon, init_loc=(0.0, 0.0), init_scale=(1.0, 1.0), extent=(-4.0, 4.0, -3.5, 3.5),
                        sampler=_sample_dual_moon),
    "gaussian_ring": Target("gaussian_ring", gaussian_ring, init_loc=(0.0, 0.0),
                            init_scale=(math.sqrt(0.1), math.sqrt(0.1)), extent=(-1.8, 1.8, -1.8, 1.8),
                            sampler=_sample_ring, normalised=True),
}


def get_target(name: str | Target | LogProb) -> Target:
    """Look a target up by name (a :class:`Target` passes through; a bare function is wrapped).

    Raises:
        UnknownNameError: unknown name (the message lists :data:`TARGETS`).
    """
    if isinstance(name, Target):
        return name
    if callable(name):
        return Target(getattr(name, "__name__", "target"), name)
    try:
        return TARGETS[name]
    except KeyError:
        raise UnknownNameError("target", name, TARGETS) from None


def plot_samples(target, samples_before, samples_after, path=None, *, titles=("before tuning", "after tuning"),
                 grid: int = 200, max_points: int = 2000):
    """Density contours of a 2-D target with two sample clouds (e.g. untuned vs tuned HMC), side by side.

    Args:
        target: a :class:`Target`, a registry name, or a log density ``(..., 2) -> (...)``.
        samples_before, samples_after: ``(n, 2)`` arrays or tensors (any leading dims are flattened).
        path: where to save the figure (PNG/PDF by extension); ``None`` to skip saving.
        titles: panel titles.
        grid: contour grid resolution per axis.
        max_points: at most this many points per panel are drawn.

    Returns:
        the ``matplotlib.figure.Figure``.

    Raises:
        UnknownNameError: unknown target name.
        ValueError: samples are not 2-D points.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    tgt = get_target(target)
    x1_min, x1_max, x2_min, x2_max = tgt.extent
    g1, g2 = torch.meshgrid(torch.linspace(x1_min, x1_max, grid), torch.linspace(x2_min, x2_max, grid), indexing="xy")
    with torch.no_grad():
        dens = tgt(torch.stack([g1, g2], -1)).exp().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharex=True, sharey=True)
    for ax, pts, title in zip(axes, (samples_before, samples_after), titles):
        pts = np.asarray(torch.as_tensor(pts).detach().cpu().reshape(-1, torch.as_tensor(pts).shape[-1]))
        if pts.shape[-1] != 2:
            raise ValueError(f"samples must be 2-D points, got trailing size {pts.shape[-1]}")
        ax.contourf(g1.numpy(), g2.numpy(), dens, levels=20, cmap="Blues")
        ax.scatter(pts[:max_points, 0], pts[:max_points, 1], s=3, c="tab:red", alpha=0.5)
        ax.set_xlim(x1_min, x1_max)
        ax.set_ylim(x2_min, x2_max)
        ax.set_title(f"{tgt.name}: {title}")
        ax.set_xlabel("x1")
    axes[0].set_ylabel("x2")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig

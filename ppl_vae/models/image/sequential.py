"""Sequential VAE for video: SVG-LP, "stochastic video generation with a learned prior" (Denton & Fergus 2018,
ICML, §3), written as a Pyro program with a ``pyro.markov`` time loop (MLP frame networks, GRU cells).

Generative model (per sequence ``i`` of the data plate; ``h_t = Enc(x̃_t)``, ``h_{-1}`` a learned start code)::

    for t in markov(range(T)):
        r_t = GRU_ψ(h_{t-1}, r_{t-1});   z_t ~ N(μ_ψ(r_t), σ_ψ(r_t))          learned prior p_ψ(z_t | x_{1:t-1})
        g_t = GRU_θ([h_{t-1}, z_t], g_{t-1})                                   frame predictor
        x_t ~ Bernoulli(logits = Dec([g_t, h_{t-1}]))  (masked pixels)         p(x_t | z_{1:t}, x_{1:t-1})
        x̃_t = x_t where observed, else the predicted mean sigmoid(Dec([g_t, h_{t-1}]))

(``h_{t-1}`` into the decoder: SVG's skip connection from the encoder of the last frame), so observed frames
are teacher-forced (Denton & Fergus 2018, §3) and a missing frame is replaced by the model's own
prediction, which is how SVG generates the future. Guide (inference network, §3): ``e_t = Enc(x_t)`` for an
observed frame (missing pixels zero-filled), a learned ``missing`` code for an all-missing one;
``q_φ(z_t | x_{1:t}) = N(μ_φ(s_t), σ_φ(s_t))`` with ``s_t = GRU_φ(e_t, s_{t-1})``. ``Trace_ELBO`` then estimates
``Σ_t E_q[log p(x_t | z_{1:t}, x_{1:t-1})] - KL(q_φ(z_t | x_{1:t}) || p_ψ(z_t | x_{1:t-1}))`` (§3, with
``β = 1``). ``pyro.markov`` declares the time loop; the history enters through deterministic recurrent states,
every latent is continuous, so nothing is enumerated. Model and guide accept any whole number of frames and an
extra particle dimension left of the data plate (the recurrent cells broadcast over it).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from ppl_vae.models.base import Batch, LatentVariableModel
from ppl_vae.models.config import resolve_config
from ppl_vae.models.schedules import KLScheduleConfig, annealed_stage
from ppl_vae.models.image.image import PixelScale, build_image_decoder, build_image_encoder, check_arch
from ppl_vae.models.image.image import mean_image, pixel_likelihood
from ppl_vae.nn import GaussianHead

__all__ = ["SequentialVAE", "SequentialVAEConfig"]


@dataclass
class SequentialVAEConfig(KLScheduleConfig):
    """Options of :class:`SequentialVAE`: ``seq_len`` T (10) and ``frame_dim`` D (400 = 20x20) give
    ``x_dim = T * D``; ``dim_z`` (8) per frame; ``hidden`` (256) width of the frame encoder / decoder MLPs;
    ``rnn_hidden`` (128) GRU state size; ``likelihood`` ``"bernoulli"`` or ``"gaussian"``; ``pixel_scale`` fixed
    Gaussian scale or ``None`` to learn it (Gaussian only); ``kl_schedule`` etc.: the KL schedule of training
    (:class:`~ppl_vae.models.schedules.KLScheduleConfig`, applied to every ``z_t``)."""

    seq_len: int = 10
    frame_dim: int = 400
    dim_z: int = 8
    hidden: int = 256
    rnn_hidden: int = 128
    likelihood: str = "bernoulli"
    pixel_scale: Optional[float] = None


def _cat(*xs: torch.Tensor) -> torch.Tensor:
    """Concatenate on the last dim after broadcasting the leading dims (particles ``(S, B, .)`` with ``(B, .)``)."""
    lead = torch.broadcast_shapes(*(x.shape[:-1] for x in xs))
    return torch.cat([x.expand(*lead, x.shape[-1]) for x in xs], -1)


def _step(cell: nn.GRUCell, inp: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One GRU step over any broadcast leading dims: ``(..., in), (..., H) -> (..., H)``."""
    lead = torch.broadcast_shapes(inp.shape[:-1], state.shape[:-1])
    out = cell(inp.expand(*lead, inp.shape[-1]).reshape(-1, inp.shape[-1]),
               state.expand(*lead, state.shape[-1]).reshape(-1, state.shape[-1]))
    return out.reshape(*lead, state.shape[-1])


class SequentialVAE(LatentVariableModel):
    """SVG-LP sequential VAE (Denton & Fergus 2018, §3) over flattened sequences ``x (B, T*D)`` in ``[0, 1]``.

    Args: ``config`` (a :class:`SequentialVAEConfig` or dict) and/or its fields as keyword options.

    Pyro sites in ``plate("data", B)``, for ``t = 0..T-1``: ``z_t`` (event ``(dim_z,)``), ``x_t`` (observed frame,
    event ``(D,)``, masked pixels add 0).

    Raises:
        TypeError: an unknown option, named. ppl_vae.errors.UnknownNameError: unknown ``likelihood``.
        ValueError: a non-positive size or ``pixel_scale``; from ``model``/``guide``: ``x`` not ``(B, k*D)``.
    """

    name = "seq-vae"
    Config = SequentialVAEConfig

    def __init__(self, config: Optional[SequentialVAEConfig] = None, **options: Any):
        cfg = resolve_config(self.Config, config, options, type(self).__name__)
        super().__init__(**cfg.to_dict())
        for f in fields(cfg):
            if f.type in (int, "int") and not f.name.startswith("kl_") and not getattr(cfg, f.name) > 0:
                raise ValueError(f"SequentialVAE: {f.name} must be positive, got {getattr(cfg, f.name)}")
        check_arch("mlp", cfg.likelihood, cfg.frame_dim)
        cfg.check_kl_options()
        self.cfg, self.likelihood = cfg, cfg.likelihood
        self.x_dim, self.frame_dim, self.dim_z = cfg.seq_len * cfg.frame_dim, cfg.frame_dim, cfg.dim_z
        H = cfg.rnn_hidden
        self.encoder = build_image_encoder("mlp", cfg.frame_dim, cfg.hidden)      # Enc: (.., D) -> (.., hidden)
        self.start = nn.Parameter(torch.zeros(cfg.hidden))                       # h_{-1}: no frame seen yet
        self.missing = nn.Parameter(torch.zeros(cfg.hidden))                     # guide's code of a missing frame
        self.prior_rnn, self.prior_head = nn.GRUCell(cfg.hidden, H), GaussianHead(H, cfg.dim_z)
        self.posterior_rnn, self.posterior_head = nn.GRUCell(cfg.hidden, H), GaussianHead(H, cfg.dim_z)
        self.predictor_rnn = nn.GRUCell(cfg.hidden + cfg.dim_z, H)
        self.decoder = build_image_decoder("mlp", H + cfg.hidden, cfg.frame_dim, cfg.hidden)
        self.pixel_scale = PixelScale(cfg.frame_dim, cfg.pixel_scale) if cfg.likelihood == "gaussian" else None

    def training_stages(self, steps: int, lr: float = 1e-3):
        """One ``Trace_ELBO`` stage under the config's KL schedule."""
        return [annealed_stage(self.cfg, "elbo", self.model, self.guide, pyro.infer.Trace_ELBO(), steps, lr)]

    @property
    def pyro_name(self) -> str:
        """The ``pyro.module`` name: ``"seqvae"``."""
        return self.name.replace("-", "")

    def _frames(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x (B, T, D) with missing pixels 0, mask (B, T, D))``. Raises ValueError: width not ``k * D``."""
        B, width = batch.x.shape
        if width == 0 or width % self.frame_dim:
            raise ValueError(f"SequentialVAE expects x of shape (B, T*{self.frame_dim}), got {tuple(batch.x.shape)}")
        mask = batch.x_mask.bool().reshape(B, -1, self.frame_dim)
        x = batch.x.reshape(B, -1, self.frame_dim)
        return torch.where(mask, x, torch.zeros_like(x)), mask

    def model(self, batch: Batch) -> None:
        """p(x, z) = Π_t p(x_t | z_{1:t}, x̃_{1:t-1}) p_ψ(z_t | x̃_{1:t-1}) for every sequence of ``batch``."""
        pyro.module(self.pyro_name, self)
        x, mask = self._frames(batch)
        scale = self.pixel_scale() if self.pixel_scale is not None else None
        h, r = self.start, x.new_zeros(x.shape[0], self.cfg.rnn_hidden)
        g = r
        with pyro.plate("data", x.shape[0], device=x.device):
            for t in pyro.markov(range(x.shape[1])):
                r = _step(self.prior_rnn, h, r)
                z = pyro.sample(f"z_{t}", dist.Normal(*self.prior_head(r)).to_event(1))
                g = _step(self.predictor_rnn, _cat(h, z), g)
                out = self.decoder(_cat(g, h))
                pyro.sample(f"x_{t}", pixel_likelihood(out, mask[:, t], self.likelihood, scale), obs=x[:, t])
                h = self.encoder(torch.where(mask[:, t], x[:, t], mean_image(out, self.likelihood)))

    def guide(self, batch: Batch) -> None:
        """q_φ(z | x) = Π_t q_φ(z_t | x_{1:t}), a GRU over the frame codes (a learned code for missing frames)."""
        pyro.module(self.pyro_name, self)
        x, mask = self._frames(batch)
        e = torch.where(mask.any(-1, keepdim=True), self.encoder(x), self.missing)       # (B, T, hidden)
        s = x.new_zeros(x.shape[0], self.cfg.rnn_hidden)
        with pyro.plate("data", x.shape[0], device=x.device):
            for t in pyro.markov(range(x.shape[1])):
                s = _step(self.posterior_rnn, e[:, t], s)
                pyro.sample(f"z_{t}", dist.Normal(*self.posterior_head(s)).to_event(1))

    @torch.no_grad()
    def rollout(self, frames: torch.Tensor, horizon: int, num_samples: int = 1) -> torch.Tensor:
        """Mean frames of ``horizon`` future steps given ``frames (B, t, D)``, ``t >= 1``: ``z`` of the observed
        frames from the guide, future ``z`` from the learned prior, each predicted frame fed back (SVG §3).

        Returns ``(num_samples, B, horizon, D)``. Raises ValueError: bad shapes, ``horizon`` or ``num_samples < 1``.
        """
        from ppl_vae.data.sequences import sequence_batch

        if frames.dim() != 3 or frames.shape[1] < 1 or frames.shape[2] != self.frame_dim:
            raise ValueError(f"frames must be (B, t >= 1, {self.frame_dim}), got {tuple(frames.shape)}")
        if horizon < 1 or num_samples < 1:
            raise ValueError(f"horizon and num_samples must be >= 1, got {horizon} and {num_samples}")
        B, t, _ = frames.shape
        future = torch.cat([frames, frames.new_zeros(B, horizon, self.frame_dim)], 1)
        seen = torch.arange(t + horizon, device=frames.device).expand(B, -1) < t
        with pyro.plate("samples", num_samples, dim=-2):
            guide_tr = poutine.trace(self.guide).get_trace(sequence_batch(frames))
            model_tr = poutine.trace(poutine.replay(self.model, trace=guide_tr)).get_trace(
                sequence_batch(future, seen))
        means = [model_tr.nodes[f"x_{k}"]["fn"].mean for k in range(t, t + horizon)]
        return torch.stack([m.expand(num_samples, B, self.frame_dim) for m in means], -2)

    def predict_next(self, frames: torch.Tensor, num_samples: int = 20) -> torch.Tensor:
        """Mean prediction of frame ``t+1`` from ``frames (B, t, D)``, averaged over ``num_samples`` draws of
        ``z_{t+1}`` from the learned prior: ``-> (B, D)`` in ``[0, 1]`` (Bernoulli)."""
        return self.rollout(frames, 1, num_samples)[:, :, 0].mean(0)

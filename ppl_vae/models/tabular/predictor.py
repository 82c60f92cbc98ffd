"""The predictor p(y | x̂, h_1) shared by every table model (Peis et al. 2022 §3.2).

``x̂`` is the feature vector of the row with observed entries kept and missing entries filled by the model's own
imputation (expected features decoded from the same latent), followed by the missing-indicator mask; the predictor
also reads the latent ``h_1`` the decoder reads. It is trained jointly with the model on the rows whose target is
observed (the target's likelihood site is masked by ``y_mask``).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from ppl_vae.likelihoods import MixedLikelihood
from ppl_vae.nn import MLP

__all__ = ["Predictor"]


class Predictor(nn.Module):
    """``p(y | x̂, h_1)`` with the target's likelihood head.

    Args:
        feature_dim: width of ``x̂`` (the feature space of the table's :class:`MixedLikelihood`).
        num_columns: D, the width of the missing-indicator mask appended to ``x̂``.
        latent_dim: width of ``h_1``.
        target: the target column (``name``, ``likelihood``, ``num_categories``).
        hidden: hidden widths of the MLP.
        gaussian_scale: as in :class:`MixedLikelihood`.

    Shapes: ``x_hat (..., batch, feature_dim)``, ``mask (batch, D)``, ``h (..., batch, latent_dim)`` ->
    target parameters ``(..., batch, likelihood.param_dim)``.
    """

    def __init__(self, feature_dim: int, num_columns: int, latent_dim: int, target, hidden: Sequence[int] = (64,),
                 gaussian_scale: Union[str, float] = "learned"):
        super().__init__()
        self.likelihood = MixedLikelihood([target], gaussian_scale=gaussian_scale)
        self.net = MLP(feature_dim + num_columns + latent_dim, hidden, self.likelihood.param_dim)

    def forward(self, x_hat: torch.Tensor, mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        lead = torch.broadcast_shapes(x_hat.shape[:-1], h.shape[:-1])
        m = mask.to(h.dtype).expand(*lead, mask.shape[-1])
        return self.net(torch.cat([x_hat.expand(*lead, x_hat.shape[-1]), m, h.expand(*lead, h.shape[-1])], -1))

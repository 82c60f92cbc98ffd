"""Networks shared by every model family: MLPs, column-wise (grouped) MLPs, Gaussian heads and 28x28 conv nets.

Every module maps ``(..., in_features)`` to ``(..., out_features)`` so that extra leading sample/chain dimensions
(``(num_chains, batch, ...)``) pass through unchanged.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["MLP", "ColumnwiseMLP", "GaussianHead", "ConvEncoder28", "ConvDecoder28", "MaskedConvEncoder28"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "softplus": nn.Softplus, "silu": nn.SiLU}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


class MLP(nn.Sequential):
    """Fully connected network ``in_features -> hidden... -> out_features`` (no activation on the output).

    Args:
        in_features: input width.
        hidden: widths of the hidden layers (may be empty: a single linear map).
        out_features: output width.
        activation: ``"relu" | "tanh" | "elu" | "softplus" | "silu"``.

    Shapes: ``(..., in_features) -> (..., out_features)``.

    Raises:
        ValueError: unknown activation.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, activation: str = "relu"):
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _activation(activation)]
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
        self.in_features, self.out_features = in_features, out_features


class ColumnwiseMLP(nn.Module):
    """``D`` independent MLPs evaluated in one batched call (one per table column, e.g. VAEM's marginal VAEs).

    Column ``d`` maps its own ``in_features`` inputs through its own weights; implemented with ``einsum`` over a
    ``(D, in, out)`` weight tensor so the D networks cost one kernel per layer, not D Python calls.

    Args:
        num_columns: D.
        in_features: per-column input width.
        hidden: per-column hidden widths.
        out_features: per-column output width (pad to the widest column and slice per column if they differ).
        activation: as in :class:`MLP`.

    Shapes: ``(..., D, in_features) -> (..., D, out_features)``.
    """

    def __init__(self, num_columns: int, in_features: int, hidden: Sequence[int], out_features: int,
                 activation: str = "relu"):
        super().__init__()
        widths = [in_features, *hidden, out_features]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            bound = 1.0 / math.sqrt(w_in)
            self.weights.append(nn.Parameter(torch.empty(num_columns, w_in, w_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_columns, w_out).uniform_(-bound, bound)))
        self.act = _activation(activation)
        self.num_columns, self.in_features, self.out_features = num_columns, in_features, out_features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h = inputs
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.einsum("...di,dio->...do", h, w) + b
            if i < last:
                h = self.act(h)
        return h


class GaussianHead(nn.Module):
    """Maps features to the ``(loc, scale)`` of a diagonal Gaussian: ``scale = softplus(raw) + min_scale``.

    Shapes: ``(..., in_features) -> ((..., out_features), (..., out_features))``; ``scale > 0``.
    """

    def __init__(self, in_features: int, out_features: int, min_scale: float = 1e-3):
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)
        self.min_scale = min_scale

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.linear(h).chunk(2, dim=-1)
        return loc, F.softplus(raw) + self.min_scale


class ConvEncoder28(nn.Module):
    """Convolutional feature extractor for 28x28 single-channel images.

    Shapes: ``(..., 784)`` or ``(..., 1, 28, 28)`` in ``[0, 1]`` -> ``(..., out_features)``.
    """

    def __init__(self, out_features: int = 256, channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 4, 2, 1), nn.ReLU(),            # 14x14
            nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.ReLU(),  # 7x7
            nn.Flatten(), nn.Linear(2 * channels * 49, out_features), nn.ReLU(),
        )
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1] if x.shape[-1] == 784 else x.shape[:-3]
        h = self.net(x.reshape(-1, 1, 28, 28))
        return h.reshape(*lead, self.out_features)


class ConvDecoder28(nn.Module):
    """Transposed-convolution decoder to 28x28 single-channel image logits/means.

    Shapes: ``(..., in_features) -> (..., 784)`` (unnormalised: apply sigmoid for Bernoulli probabilities).
    """

    def __init__(self, in_features: int, channels: int = 32):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(nn.Linear(in_features, 2 * channels * 49), nn.ReLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1), nn.ReLU(),  # 14x14
            nn.ConvTranspose2d(channels, 1, 4, 2, 1),                        # 28x28
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        out = self.net(self.fc(h.reshape(-1, h.shape[-1])).reshape(-1, 2 * self.channels, 7, 7))
        return out.reshape(*lead, 784)


class MaskedConvEncoder28(nn.Module):
    """Encoder of a partially observed 28x28 image plus side inputs (the Partial-VAE input of a table model whose
    784 columns are the pixels; Ma et al. 2018, Peis et al. 2022 §4.2).

    The flat input is ``[x ⊙ m (784), m (784), extra (extra_features)]``: the observed pixels (zero where missing)
    and the observation mask become the two channels of a convolutional net (two stride-2 4x4 convolutions,
    28 -> 14 -> 7), whose flattened output is concatenated with ``extra`` (e.g. ``[y ⊙ m_y, m_y]``) and mapped to
    ``out_features`` by a linear layer. Not followed by an activation (the table models apply ReLU before their
    Gaussian head).

    Args:
        out_features: output width.
        extra_features: width of the side input after the two image channels (may be 0).
        channels: channels of the first convolution (the second has twice as many).

    Shapes: ``(..., 2 * 784 + extra_features) -> (..., out_features)``.

    Raises:
        ValueError: the input's last dimension is not ``2 * 784 + extra_features``.
    """

    def __init__(self, out_features: int, extra_features: int = 0, channels: int = 32):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(2, channels, 4, 2, 1), nn.ReLU(),             # 14x14
            nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.ReLU(),  # 7x7
            nn.Flatten(),
        )
        self.linear = nn.Linear(2 * channels * 49 + extra_features, out_features)
        self.extra_features, self.out_features = int(extra_features), int(out_features)
        self.in_features = 2 * 784 + self.extra_features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[-1] != self.in_features:
            raise ValueError(f"MaskedConvEncoder28 expects {self.in_features} input features "
                             f"(784 pixels, 784 mask, {self.extra_features} extra), got {inputs.shape[-1]}")
        lead = inputs.shape[:-1]
        flat = inputs.reshape(-1, self.in_features)
        image = flat[:, :2 * 784].reshape(-1, 2, 28, 28)
        h = torch.cat([self.conv(image), flat[:, 2 * 784:]], -1)
        return self.linear(h).reshape(*lead, self.out_features)

"""Building blocks shared by the built-in models (their perm specs are derived from the graph:
:mod:`cyclemerge.models.graph_spec`)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NormKind = Literal["layernorm", "batchnorm"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis at every spatial position (Flax-style LN in Git Re-Basin).

    Unlike GroupNorm(1, C), which normalizes over channels AND space, this only mixes channels of
    one pixel; it is permutation-equivariant over channels, so its weight and bias simply follow
    their channel's permutation.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (self.num_channels,), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


class ChannelAffine(nn.Module):
    """Per-channel ``x * scale + shift`` with non-trainable buffers; an identity until REPAIR sets it.

    It stands on ResNet identity shortcuts so that the skip branch of a residual sum has its own
    per-channel statistics and correction, like the "junctures" of REPAIR, without changing the
    architecture between the seed models and the merged one.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.register_buffer("scale", torch.ones(num_channels))
        self.register_buffer("shift", torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return str(self.num_channels)


def make_norm(kind: NormKind, num_channels: int) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm2d(num_channels)
    if kind == "batchnorm":
        return nn.BatchNorm2d(num_channels)
    raise ValueError(f"unknown norm {kind!r}; known: layernorm, batchnorm")

"""Building blocks shared by the models, and the small helpers their perm specs are made of.

Specs are derived from the modules' own state dicts, so a buffer added to a norm (BatchNorm's running
statistics, a ChannelAffine's scale) is covered without anyone writing its name by hand.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cyclemerge.permutation import PermSpec

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


def layer_spec(prefix: str, module: nn.Module, out_group: str | None, in_group: str | None = None) -> PermSpec:
    """Spec entries of one module's own tensors.

    Linear/Conv weights are (out, in, kernel...); every 1-D tensor (bias, norm affine, running
    statistics, shortcut scale/shift) follows the output channels; scalars such as BatchNorm's
    ``num_batches_tracked`` are never permuted.
    """
    spec: PermSpec = {}
    for name, tensor in module.state_dict().items():
        key = f"{prefix}.{name}"
        if name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d)):
            spec[key] = (out_group, in_group) + (None,) * (tensor.dim() - 2)
        elif tensor.dim() == 1:
            spec[key] = (out_group,)
        elif tensor.dim() == 0:
            spec[key] = ()
        else:
            raise TypeError(f"layer_spec: no rule for {key} of shape {tuple(tensor.shape)} in {type(module).__name__}")
    return spec


def part_keys(model: nn.Module, *paths: str) -> list[str]:
    """State-dict keys of the modules at ``paths`` (a layer and the norm that follows it), in order."""
    keys: list[str] = []
    for path in paths:
        keys += [f"{path}.{name}" for name in model.get_submodule(path).state_dict()]
    return keys

"""Multi-layer perceptron on flattened images (C2M3's MNIST/EMNIST model: 784-512-512-512-256-C)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cyclemerge.models.layers import layer_spec, part_keys
from cyclemerge.permutation import PermSpec


class MLP(nn.Module):
    """``layers.{i}`` are Linear layers with ReLU between them; hidden layer ``i`` is group ``h{i}``."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    @property
    def num_hidden(self) -> int:
        return len(self.layers) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)

    def perm_spec(self) -> PermSpec:
        spec: PermSpec = {}
        prev = None
        for i, layer in enumerate(self.layers):
            group = f"h{i}" if i < self.num_hidden else None
            spec |= layer_spec(f"layers.{i}", layer, group, prev)
            prev = group
        return spec

    def layer_parts(self) -> dict[str, list[str]]:
        return {f"layers.{i}": part_keys(self, f"layers.{i}") for i in range(len(self.layers))}

    def stat_points(self) -> dict[str, str]:
        # No norms: the pre-ReLU output of each hidden Linear is where REPAIR rescales.
        return {f"layers.{i}": f"h{i}" for i in range(self.num_hidden)}

"""Multi-layer perceptron on flattened images (C2M3's MNIST/EMNIST model: 784-512-512-512-256-C)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cyclemerge.models.graph_spec import GraphSpec, GroupNames, example_like


class MLP(GraphSpec, nn.Module):
    """``layers.{i}`` are Linear layers with ReLU between them; hidden layer ``i`` is group ``h{i}``.

    With no norms, the stat point of hidden layer ``i`` is its Linear's (pre-ReLU) output.
    """

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

    def spec_input(self) -> torch.Tensor:
        return example_like(self, 1, self.layers[0].in_features)

    def group_names(self) -> GroupNames:
        return {(f"layers.{i}.weight", 0): f"h{i}" for i in range(self.num_hidden)}

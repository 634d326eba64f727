"""VGG16 with a norm after every conv (LayerNorm2d by default), as in C2M3's CIFAR-10 experiments.

Groups: the output channels of the k-th conv are ``conv{k}`` (its rows, bias and norm, and the next
conv's or the classifier's columns); the classifier's hidden units are ``fc0`` and ``fc1``.

Small images: five 2x2 max-pools take 32 -> 1, but 28 -> 14 -> 7 -> 3 -> 1 -> (nothing). The pools
use ``ceil_mode`` so 28 -> 14 -> 7 -> 4 -> 2 -> 1 keeps the border pixels that floor pooling would drop
at 7 -> 3, and a pool that would act on a 1x1 map becomes an ``nn.Identity`` (same index, so state-dict
keys do not depend on the image size). A global average pool before the classifier then makes any
larger image (e.g. 64x64) end at 512w features too, instead of failing on a shape mismatch.
"""

from __future__ import annotations

import torch
from torch import nn

from cyclemerge.models.graph_spec import GraphSpec, GroupNames, example_like
from cyclemerge.models.layers import NormKind, make_norm

VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
CLASSIFIER_WIDTH = 512


class VGG16(GraphSpec, nn.Module):
    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 1, norm: NormKind = "layernorm") -> None:
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        layers: list[nn.Module] = []
        self.conv_paths: list[str] = []
        channels, size = in_channels, image_size
        for item in VGG16_LAYOUT:
            if item == "M":
                if size > 1:
                    layers.append(nn.MaxPool2d(2, ceil_mode=True))
                    size = (size + 1) // 2
                else:
                    layers.append(nn.Identity())
                continue
            out = int(item) * width
            self.conv_paths.append(f"features.{len(layers)}")
            layers += [nn.Conv2d(channels, out, 3, padding=1), make_norm(norm, out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(channels, CLASSIFIER_WIDTH),
            nn.ReLU(),
            nn.Linear(CLASSIFIER_WIDTH, CLASSIFIER_WIDTH),
            nn.ReLU(),
            nn.Linear(CLASSIFIER_WIDTH, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def spec_input(self) -> torch.Tensor:
        return example_like(self, 1, self.in_channels, self.image_size, self.image_size)

    def group_names(self) -> GroupNames:
        names = {(f"{path}.weight", 0): f"conv{k}" for k, path in enumerate(self.conv_paths)}
        dense = [f"classifier.{i}" for i, m in enumerate(self.classifier) if isinstance(m, nn.Linear)]
        return names | {(f"{path}.weight", 0): f"fc{k}" for k, path in enumerate(dense[:-1])}

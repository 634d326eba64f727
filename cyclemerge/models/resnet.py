"""ResNet20 for 28x28 and 32x32 images, as in Git Re-Basin and C2M3 (LayerNorm by default).

Permutation groups: the residual stream of stage ``s`` is ONE group ``res{s}`` shared by everything
that writes into it (stem for stage 0, every block's conv2/norm2, the transition shortcut, the
identity shortcuts' affines) and everything that reads from it (the next blocks' conv1 and
shortcut columns, the classifier's columns). Each block's hidden channels are ``stages.{s}.{b}.inner``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cyclemerge.models.graph_spec import GraphSpec, GroupNames, example_like
from cyclemerge.models.layers import ChannelAffine, NormKind, make_norm

STAGE_WIDTHS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)
BLOCKS_PER_STAGE = 3


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormKind) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        self.downsample = stride != 1 or in_channels != out_channels
        if self.downsample:
            # 3x3 stride-2 projection as in the C2M3 reference model.
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                make_norm(norm, out_channels),
            )
        else:
            self.shortcut = ChannelAffine(out_channels)
        # A named identity on the sum, so a forward hook can read the residual stream's statistics.
        self.residual = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(self.residual(out + self.shortcut(x)))


class ResNet20(GraphSpec, nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 1, norm: NormKind = "layernorm") -> None:
        super().__init__()
        widths = [w * width for w in STAGE_WIDTHS]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, widths[0])
        stages = []
        prev = widths[0]
        for w, stride in zip(widths, STAGE_STRIDES):
            blocks = [BasicBlock(prev if b == 0 else w, w, stride if b == 0 else 1, norm) for b in range(BLOCKS_PER_STAGE)]
            stages.append(nn.Sequential(*blocks))
            prev = w
        self.stages = nn.ModuleList(stages)
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        for stage in self.stages:
            x = stage(x)
        return self.linear(x.mean(dim=(2, 3)))

    def spec_input(self) -> torch.Tensor:
        # Any image size gives the same spec (the convs and the mean over space see no size); 16 is cheap.
        return example_like(self, 1, self.conv1.in_channels, 16, 16)

    def group_names(self) -> GroupNames:
        names = {("conv1.weight", 0): "res0"}
        for s, stage in enumerate(self.stages):
            names[(f"stages.{s}.0.conv2.weight", 0)] = f"res{s}"
            for b in range(len(stage)):
                names[(f"stages.{s}.{b}.conv1.weight", 0)] = f"stages.{s}.{b}.inner"
        return names

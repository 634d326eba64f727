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

from cyclemerge.models.layers import ChannelAffine, NormKind, layer_spec, make_norm, part_keys
from cyclemerge.permutation import PermSpec

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

    def perm_spec(self, prefix: str, in_group: str, out_group: str) -> PermSpec:
        inner = f"{prefix}.inner"
        spec = layer_spec(f"{prefix}.conv1", self.conv1, inner, in_group)
        spec |= layer_spec(f"{prefix}.norm1", self.norm1, inner)
        spec |= layer_spec(f"{prefix}.conv2", self.conv2, out_group, inner)
        spec |= layer_spec(f"{prefix}.norm2", self.norm2, out_group)
        if self.downsample:
            spec |= layer_spec(f"{prefix}.shortcut.0", self.shortcut[0], out_group, in_group)
            spec |= layer_spec(f"{prefix}.shortcut.1", self.shortcut[1], out_group)
        else:
            spec |= layer_spec(f"{prefix}.shortcut", self.shortcut, out_group)
        return spec

    def stat_points(self, prefix: str, out_group: str) -> dict[str, str]:
        shortcut_out = f"{prefix}.shortcut.1" if self.downsample else f"{prefix}.shortcut"
        return {
            f"{prefix}.norm1": f"{prefix}.inner",
            f"{prefix}.norm2": out_group,
            shortcut_out: out_group,
            f"{prefix}.residual": out_group,
        }


class ResNet20(nn.Module):
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

    def _blocks(self):
        """(module path, block, group read from, group written to) in forward order."""
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                yield f"stages.{s}.{b}", block, f"res{max(s - 1, 0) if b == 0 else s}", f"res{s}"

    def perm_spec(self) -> PermSpec:
        spec = layer_spec("conv1", self.conv1, "res0", None)
        spec |= layer_spec("norm1", self.norm1, "res0")
        for path, block, in_group, out_group in self._blocks():
            spec |= block.perm_spec(path, in_group, out_group)
        spec |= layer_spec("linear", self.linear, None, f"res{len(self.stages) - 1}")
        return spec

    def layer_parts(self) -> dict[str, list[str]]:
        parts = {"conv1": part_keys(self, "conv1", "norm1")}
        for path, _, _, _ in self._blocks():
            parts[f"{path}.conv1"] = part_keys(self, f"{path}.conv1", f"{path}.norm1")
            parts[f"{path}.conv2"] = part_keys(self, f"{path}.conv2", f"{path}.norm2")
            parts[f"{path}.shortcut"] = part_keys(self, f"{path}.shortcut")
        parts["linear"] = part_keys(self, "linear")
        return parts

    def stat_points(self) -> dict[str, str]:
        points = {"norm1": "res0"}
        for path, block, _, out_group in self._blocks():
            points |= block.stat_points(path, out_group)
        return points

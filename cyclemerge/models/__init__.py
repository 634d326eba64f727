"""The architectures cyclemerge can merge, each carrying its own permutation spec.

Every model returned by :func:`build_model` follows :class:`PermutableModel`: besides ``forward``
(float images [N, C, H, W] -> logits [N, num_classes]) it describes how its state dict permutes
(``perm_spec``), how it splits into gated "layers" (``layer_parts``) and where REPAIR reads
per-channel statistics (``stat_points``). All three come from the spec derived from the model's graph
(``derived_spec()``, a :class:`cyclemerge.spec.DerivedSpec`), for the built-in MLP, ResNet20 and VGG16
as for a user's own architecture (``model.arch: custom``, :mod:`cyclemerge.models.custom`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from torch import nn

from cyclemerge.config import ModelConfig
from cyclemerge.models.custom import build_custom
from cyclemerge.models.graph_spec import spec_of
from cyclemerge.models.layers import ChannelAffine, LayerNorm2d
from cyclemerge.models.mlp import MLP
from cyclemerge.models.resnet import ResNet20
from cyclemerge.models.vgg import VGG16
from cyclemerge.permutation import PermSpec

__all__ = [
    "MLP",
    "MODELS",
    "ChannelAffine",
    "LayerNorm2d",
    "PermutableModel",
    "ResNet20",
    "VGG16",
    "build_model",
    "spec_of",
]


@runtime_checkable
class PermutableModel(Protocol):
    def perm_spec(self) -> PermSpec:
        """Every state-dict key -> one permutation group (or None) per tensor axis."""
        ...

    def layer_parts(self) -> dict[str, list[str]]:
        """Ordered part name (module path) -> the state-dict keys of that layer; covers every key once."""
        ...

    def stat_points(self) -> dict[str, str]:
        """Ordered module path -> group of its output channels, where REPAIR needs statistics."""
        ...


Builder = Callable[[ModelConfig, int, int, int], nn.Module]


def _mlp(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return MLP(in_channels * image_size * image_size, cfg.hidden, num_classes)


def _resnet20(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return ResNet20(in_channels, num_classes, width=cfg.width, norm=cfg.norm)


def _vgg16(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return VGG16(in_channels, image_size, num_classes, width=cfg.width, norm=cfg.norm)


def _custom(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return build_custom(cfg, in_channels=in_channels, image_size=image_size, num_classes=num_classes)


MODELS: dict[str, Builder] = {"mlp": _mlp, "resnet20": _resnet20, "vgg16": _vgg16, "custom": _custom}


def build_model(cfg: ModelConfig, *, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """A freshly initialized model (seed torch yourself); ``cfg.width`` does not apply to the MLP and
    ``cfg.hidden`` only to the MLP. A custom model's factory is imported and called and its spec
    derived and verified here, so a model that cannot be merged fails before any training."""
    builder = MODELS.get(cfg.arch)
    if builder is None:
        raise ValueError(f"unknown model architecture {cfg.arch!r}; known: {', '.join(sorted(MODELS))}")
    return builder(cfg, in_channels, image_size, num_classes)

"""The hand-written permutation specs of the built-in models, kept as test oracles.

The models answer ``perm_spec()``, ``layer_parts()`` and ``stat_points()`` from the spec derived from
their own graph (cyclemerge.models.graph_spec); these functions are the specs as they were written by
hand before, read off the modules' structure, and tests/test_models.py and tests/test_spec.py assert
that the derived ones equal them exactly (keys, group names, order).
"""

from __future__ import annotations

from torch import nn

from cyclemerge.models import MLP, VGG16, ResNet20
from cyclemerge.permutation import PermSpec


def layer_spec(prefix: str, module: nn.Module, out_group: str | None, in_group: str | None = None) -> PermSpec:
    """Linear/Conv weights are (out, in, kernel...); every 1-D tensor (bias, norm affine, running
    statistics, shortcut scale/shift) follows the output channels; scalars are never permuted."""
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
    keys: list[str] = []
    for path in paths:
        keys += [f"{path}.{name}" for name in model.get_submodule(path).state_dict()]
    return keys


# --- MLP: hidden layer i is group h{i} -------------------------------------------------------------

def _mlp_spec(model: MLP) -> PermSpec:
    spec: PermSpec = {}
    prev = None
    for i, layer in enumerate(model.layers):
        group = f"h{i}" if i < model.num_hidden else None
        spec |= layer_spec(f"layers.{i}", layer, group, prev)
        prev = group
    return spec


def _mlp_parts(model: MLP) -> dict[str, list[str]]:
    return {f"layers.{i}": part_keys(model, f"layers.{i}") for i in range(len(model.layers))}


def _mlp_points(model: MLP) -> dict[str, str]:
    return {f"layers.{i}": f"h{i}" for i in range(model.num_hidden)}


# --- ResNet20: one group res{s} per stage's residual stream, one inner group per block ----------------

def _blocks(model: ResNet20):
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            yield f"stages.{s}.{b}", block, f"res{max(s - 1, 0) if b == 0 else s}", f"res{s}"


def _resnet_spec(model: ResNet20) -> PermSpec:
    spec = layer_spec("conv1", model.conv1, "res0", None)
    spec |= layer_spec("norm1", model.norm1, "res0")
    for p, block, in_group, out_group in _blocks(model):
        inner = f"{p}.inner"
        spec |= layer_spec(f"{p}.conv1", block.conv1, inner, in_group)
        spec |= layer_spec(f"{p}.norm1", block.norm1, inner)
        spec |= layer_spec(f"{p}.conv2", block.conv2, out_group, inner)
        spec |= layer_spec(f"{p}.norm2", block.norm2, out_group)
        if block.downsample:
            spec |= layer_spec(f"{p}.shortcut.0", block.shortcut[0], out_group, in_group)
            spec |= layer_spec(f"{p}.shortcut.1", block.shortcut[1], out_group)
        else:
            spec |= layer_spec(f"{p}.shortcut", block.shortcut, out_group)
    spec |= layer_spec("linear", model.linear, None, f"res{len(model.stages) - 1}")
    return spec


def _resnet_parts(model: ResNet20) -> dict[str, list[str]]:
    parts = {"conv1": part_keys(model, "conv1", "norm1")}
    for p, _, _, _ in _blocks(model):
        parts[f"{p}.conv1"] = part_keys(model, f"{p}.conv1", f"{p}.norm1")
        parts[f"{p}.conv2"] = part_keys(model, f"{p}.conv2", f"{p}.norm2")
        parts[f"{p}.shortcut"] = part_keys(model, f"{p}.shortcut")
    parts["linear"] = part_keys(model, "linear")
    return parts


def _resnet_points(model: ResNet20) -> dict[str, str]:
    points = {"norm1": "res0"}
    for p, block, _, out_group in _blocks(model):
        shortcut_out = f"{p}.shortcut.1" if block.downsample else f"{p}.shortcut"
        points |= {f"{p}.norm1": f"{p}.inner", f"{p}.norm2": out_group, shortcut_out: out_group,
                   f"{p}.residual": out_group}
    return points


# --- VGG16: conv k is group conv{k}, the classifier's hidden units fc0, fc1 ------------------------

def _norm_path(conv_path: str) -> str:
    return f"features.{int(conv_path.rsplit('.', 1)[1]) + 1}"


def _dense_paths(model: VGG16) -> list[str]:
    return [f"classifier.{i}" for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear)]


def _vgg_spec(model: VGG16) -> PermSpec:
    spec: PermSpec = {}
    prev = None
    for k, path in enumerate(model.conv_paths):
        spec |= layer_spec(path, model.get_submodule(path), f"conv{k}", prev)
        spec |= layer_spec(_norm_path(path), model.get_submodule(_norm_path(path)), f"conv{k}")
        prev = f"conv{k}"
    dense = _dense_paths(model)
    for k, path in enumerate(dense):
        group = f"fc{k}" if k < len(dense) - 1 else None
        spec |= layer_spec(path, model.get_submodule(path), group, prev)
        prev = group
    return spec


def _vgg_parts(model: VGG16) -> dict[str, list[str]]:
    parts = {path: part_keys(model, path, _norm_path(path)) for path in model.conv_paths}
    return parts | {path: part_keys(model, path) for path in _dense_paths(model)}


def _vgg_points(model: VGG16) -> dict[str, str]:
    points = {_norm_path(path): f"conv{k}" for k, path in enumerate(model.conv_paths)}
    return points | {path: f"fc{k}" for k, path in enumerate(_dense_paths(model)[:-1])}


_ORACLES = {MLP: (_mlp_spec, _mlp_parts, _mlp_points), ResNet20: (_resnet_spec, _resnet_parts, _resnet_points),
            VGG16: (_vgg_spec, _vgg_parts, _vgg_points)}


def _oracle(model: nn.Module, which: int):
    return _ORACLES[type(model)][which](model)


def perm_spec(model: nn.Module) -> PermSpec:
    return _oracle(model, 0)


def layer_parts(model: nn.Module) -> dict[str, list[str]]:
    return _oracle(model, 1)


def stat_points(model: nn.Module) -> dict[str, str]:
    return _oracle(model, 2)

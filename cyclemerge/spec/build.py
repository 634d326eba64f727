"""From the joined axes to a :class:`DerivedSpec`: group names, stat points and layer parts.

Groups are named after the module of the first state-dict entry that holds them (in state-dict order,
which follows the model's definition), e.g. ``layer1.0.conv1`` for that conv's output channels.

Stat points (where REPAIR measures and rescales, :mod:`cyclemerge.repair`) are module outputs whose
channel axis (axis 1) is one whole group and whose module REPAIR can fold a correction into:
- a norm with an affine transform (BatchNorm with running statistics, GroupNorm, LayerNorm2d) and
  ChannelAffine;
- a Linear/Conv with a bias whose output does not go straight into a norm (the norm is the point then);
- an ``nn.Identity`` on a residual sum whose summands are both stat points of its group under the same
  parent module (REPAIR's residual-sum correction).
A module called more than once has no single output, so it is never a stat point.

Layer parts (one gate vector each, :mod:`cyclemerge.gates`): one per module that owns state, with a
norm joining the Linear/Conv that feeds it alone; an opaque module is one part. A part is named after
the smallest module holding exactly its tensors (``stages.1.0.shortcut`` for a conv + norm pair in a
Sequential), else after its first module.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from cyclemerge.models.layers import ChannelAffine, LayerNorm2d
from cyclemerge.spec.axes import FIXED, AxisGraph, TensorAxes, trivial
from cyclemerge.spec.derived import AxisSpec, DerivedSpec

DENSE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, LayerNorm2d)
ADDS = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__"}


def _owner(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def resolve(graph: AxisGraph, state: dict[str, torch.Tensor]) -> tuple[dict[int, str], dict[str, tuple[AxisSpec, ...]]]:
    """Group name of every root node that reaches a state tensor, and every tensor's axis layouts."""
    names: dict[int, str] = {}
    used: Counter = Counter()
    axes: dict[str, tuple[AxisSpec, ...]] = {}
    for key, tensor in state.items():
        per_axis = []
        for a, n in enumerate(tensor.shape):
            layout = graph.normalize(graph.bound.get((key, a), trivial(n)))
            segments = []
            for s in layout:
                if s.node == FIXED:
                    segments.append((None, s.length, 1))
                    continue
                if s.node not in names:
                    base = _owner(key) or key
                    used[base] += 1
                    names[s.node] = base if used[base] == 1 else f"{base}#{used[base]}"
                segments.append((names[s.node], s.size, s.inner))
            per_axis.append(tuple(segments))
        axes[key] = tuple(per_axis)
    return names, axes


def _within(path: str, parent: str) -> bool:
    return not parent or path.startswith(parent + ".")


def _group_of(graph: AxisGraph, names: dict[int, str], value) -> str | None:
    if not isinstance(value, TensorAxes) or len(value.axes) < 2:
        return None
    layout = graph.normalize(graph.concrete(value.axes[1]))
    if len(layout) != 1 or layout[0].node == FIXED or layout[0].inner != 1:
        return None
    return names.get(layout[0].node)


def _foldable(module: nn.Module) -> bool:
    if isinstance(module, _BatchNorm):
        return module.affine and module.track_running_stats
    if isinstance(module, (nn.GroupNorm, LayerNorm2d)):
        return getattr(module, "weight", None) is not None and getattr(module, "bias", None) is not None
    return isinstance(module, ChannelAffine)


def _is_add(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in ADDS


def stat_points(gm: fx.GraphModule, graph: AxisGraph, values: dict, groups_by_node: dict[int, str],
                opaque: frozenset[str]) -> dict[str, str]:
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    points: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] > 1 or node.target in opaque:
            continue
        path, module = str(node.target), gm.get_submodule(node.target)
        group = _group_of(graph, groups_by_node, values.get(node))
        if group is None:
            continue
        if _foldable(module):
            points[path] = group
        elif isinstance(module, DENSE) and module.bias is not None:
            users = list(node.users)
            into_norm = len(users) == 1 and users[0].op == "call_module" and \
                isinstance(gm.get_submodule(users[0].target), NORMS)
            if not into_norm:
                points[path] = group
        elif isinstance(module, nn.Identity) and isinstance(node.args[0], fx.Node) and _is_add(node.args[0]):
            parent = _owner(path)
            summands = [a for a in node.args[0].args if isinstance(a, fx.Node)]
            if len(summands) == 2 and all(
                a.op == "call_module" and points.get(str(a.target)) == group
                and _within(str(a.target), parent) for a in summands
            ):
                points[path] = group
    return points


def _direct_keys(state: dict[str, torch.Tensor], opaque: frozenset[str]) -> dict[str, list[str]]:
    """Module path -> the state entries it owns (an opaque module owns its whole subtree)."""
    owned: dict[str, list[str]] = {}
    for key in state:
        inside = [p for p in opaque if key.startswith(p + ".")]
        owner = min(inside, key=len) if inside else _owner(key)
        owned.setdefault(owner, []).append(key)
    return owned


def layer_parts(model: nn.Module, gm: fx.GraphModule, state: dict[str, torch.Tensor],
                opaque: frozenset[str]) -> dict[str, list[str]]:
    owned = _direct_keys(state, opaque)
    root_keys = owned.pop("", [])
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    joins: dict[str, str] = {}
    order: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            path, src = str(node.target), node.args[0] if node.args else None
            if (isinstance(gm.get_submodule(path), NORMS) and isinstance(src, fx.Node) and src.op == "call_module"
                    and isinstance(gm.get_submodule(src.target), DENSE) and len(src.users) == 1
                    and calls[path] == 1 and calls[src.target] == 1):
                joins[path] = str(src.target)
            order.append(path)
        elif node.op == "get_attr":
            target = str(node.target)
            order.append(target if target in root_keys else _owner(target))
    # Modules the forward never reaches still need a part: every key is covered once.
    order += list(owned) + root_keys
    by_first: dict[str, list[str]] = {}
    seen: set[str] = set()
    for path in order:
        keys = [path] if path in root_keys else owned.get(path, [])
        if path in seen or not keys:
            continue
        seen.add(path)
        by_first.setdefault(joins.get(path, path), []).extend(keys)
    modules = dict(model.named_modules())
    parts: dict[str, list[str]] = {}
    for first, keys in by_first.items():
        name = _part_name(first, keys, modules)
        while name in parts:
            name += "#2"
        parts[name] = keys
    return parts


def _part_name(first: str, keys: list[str], modules: dict[str, nn.Module]) -> str:
    owners = [_owner(k).split(".") for k in keys]
    common: list[str] = []
    for pieces in zip(*owners):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    prefix = ".".join(common)
    if prefix and prefix in modules:
        inside = [f"{prefix}.{k}" for k in modules[prefix].state_dict()]
        if sorted(inside) == sorted(keys):
            return prefix
    return first


def build(model: nn.Module, gm: fx.GraphModule, graph: AxisGraph, values: dict,
          opaque: frozenset[str]) -> DerivedSpec:
    state = model.state_dict()
    names, axes = resolve(graph, state)
    return DerivedSpec(
        groups={name: graph.sizes[node] for node, name in names.items()},
        axes=axes,
        shapes={k: tuple(v.shape) for k, v in state.items()},
        stat_points=stat_points(gm, graph, values, names, opaque),
        layer_parts=layer_parts(model, gm, state, opaque),
        notes=list(graph.notes),
    )

"""One graph node as the rules see it: its arguments, their layouts and shapes, its output's shape."""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from cyclemerge.spec.axes import Axis, AxisGraph, ParamAxis, TensorAxes, trivial
from cyclemerge.spec.trace import TensorMeta, module_path

Value = Any  # TensorAxes | tuple/list/dict of Values | None (not a tensor)
_MISSING = object()


class Site:
    def __init__(self, node: fx.Node, graph: AxisGraph, values: dict[fx.Node, Value], meta: dict[fx.Node, Any],
                 module: nn.Module | None, state_keys: set[str]) -> None:
        self.node = node
        self.graph = graph
        self.values = values
        self.meta = meta
        self.module = module
        self.path = module_path(node)
        self.state_keys = state_keys

    @property
    def where(self) -> str:
        return f"node {self.node.name!r}" + (f" in {self.path!r}" if self.path else "")

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def const(self, a: Any) -> Any:
        """The runtime value of an argument (tensors as their TensorMeta)."""
        if isinstance(a, fx.Node):
            return self.meta.get(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self.const(v) for v in a)
        if isinstance(a, slice):
            return slice(self.const(a.start), self.const(a.stop), self.const(a.step))
        if isinstance(a, dict):
            return {k: self.const(v) for k, v in a.items()}
        return a

    def value(self, a: Any) -> Value:
        return self.values.get(a) if isinstance(a, fx.Node) else None

    def tensor(self, a: Any) -> TensorAxes | None:
        v = self.value(a)
        return v if isinstance(v, TensorAxes) else None

    def shape(self, a: Any) -> tuple[int, ...] | None:
        m = self.const(a)
        return m.shape if isinstance(m, TensorMeta) else None

    @property
    def out(self) -> Any:
        return self.meta.get(self.node)

    @property
    def out_shape(self) -> tuple[int, ...]:
        m = self.out
        if not isinstance(m, TensorMeta):
            raise TypeError(f"{self.where}: expected a tensor output, got {type(m).__name__}")
        return m.shape

    def tensor_args(self) -> list[Any]:
        """Every argument (positional or keyword, also inside lists) whose value is a tensor."""
        found: list[Any] = []

        def walk(a: Any) -> None:
            if isinstance(a, fx.Node):
                if isinstance(self.values.get(a), TensorAxes):
                    found.append(a)
            elif isinstance(a, (list, tuple)):
                for v in a:
                    walk(v)
            elif isinstance(a, dict):
                for v in a.values():
                    walk(v)

        walk(self.node.args)
        walk(self.node.kwargs)
        return found

    def params(self, name: str) -> TensorAxes | None:
        """Lazy axes of ``{module path}.{name}`` when it is a state-dict entry of the called module."""
        key = f"{self.path}.{name}" if self.path else name
        tensor = getattr(self.module, name, None)
        if key not in self.state_keys or tensor is None:
            return None
        return TensorAxes(tuple(ParamAxis(key, i, n) for i, n in enumerate(tensor.shape)))


def trivial_value(meta: Any) -> Value:
    """Fixed layouts shaped like a runtime value."""
    if isinstance(meta, TensorMeta):
        return TensorAxes(tuple(trivial(n) for n in meta.shape))
    if isinstance(meta, (list, tuple)):
        return type(meta)(trivial_value(m) for m in meta)
    if isinstance(meta, dict):
        return {k: trivial_value(m) for k, m in meta.items()}
    return None


def axes_in(value: Value) -> list[Axis]:
    if isinstance(value, TensorAxes):
        return list(value.axes)
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in axes_in(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in axes_in(v)]
    return []


def fix_value(graph: AxisGraph, value: Value, why: str) -> None:
    for axis in axes_in(value):
        graph.fix(axis, why)


def fix_all(site: Site, why: str) -> Value:
    """Sound for any deterministic op: if none of its inputs move, its output does not either."""
    for a in site.tensor_args():
        fix_value(site.graph, site.value(a), f"{site.where}: {why}")
    return trivial_value(site.out)

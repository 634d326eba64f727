"""Tracing with torch.fx, and shape propagation on a real example input.

The tracer keeps torch.nn modules as leaves (as fx does), plus cyclemerge's own per-channel layers and
the modules the user marks opaque. A custom ``torch.autograd.Function`` would otherwise be traced
through silently (fx runs its ``forward`` on proxies); while tracing, its ``apply`` is recorded as one
graph node instead, so that the refusal can name it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from cyclemerge.models.layers import ChannelAffine, LayerNorm2d
from cyclemerge.spec.errors import SpecError, how_to_proceed

OWN_LEAVES = (LayerNorm2d, ChannelAffine)


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype


class _Tracer(fx.Tracer):
    def __init__(self, opaque: frozenset[str]) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.opaque or isinstance(m, OWN_LEAVES) or super().is_leaf_module(m, qualname)

    def current_module(self) -> str:
        for qualname, _ in reversed(list(self.module_stack.values())):
            if qualname:
                return qualname
        return ""


def custom_function_target(cls: type) -> Any:
    """A stand-in graph target for ``cls.apply`` that the rule table recognises (and refuses)."""

    def apply(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{cls.__qualname__}.apply is a tracing stand-in and cannot run")

    apply.__qualname__ = apply.__name__ = f"{cls.__qualname__}.apply"
    apply.__module__ = cls.__module__
    apply.autograd_function = cls  # type: ignore[attr-defined]
    return apply


@contextmanager
def _record_autograd_functions(tracer: _Tracer):
    base = torch.autograd.Function
    original = base.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(a, fx.Proxy) for a in leaves):
            return tracer.create_proxy("call_function", custom_function_target(cls), args, kwargs)
        return original.__func__(cls, *args, **kwargs)

    base.apply = classmethod(apply)
    try:
        yield
    finally:
        base.apply = original


def _defaults_beyond(model: nn.Module, given: int) -> dict[str, Any]:
    """Arguments of ``forward`` after the ``given`` example inputs keep their defaults while tracing
    (``mask=None`` would otherwise be a proxy, and ``if mask is not None`` untraceable)."""
    params = list(inspect.signature(model.forward).parameters.values())[given:]
    return {p.name: p.default for p in params
            if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def trace(model: nn.Module, opaque_modules: Sequence[str], num_inputs: int = 1) -> fx.GraphModule:
    names = dict(model.named_modules())
    unknown = [p for p in opaque_modules if p not in names or p == ""]
    if unknown:
        known = [n for n in names if n][:12]
        raise SpecError(
            f"opaque_modules lists {unknown}, which are not submodules of {type(model).__name__}; "
            f"use dotted module paths as in model.named_modules(), e.g. {known}"
        )
    tracer = _Tracer(frozenset(opaque_modules))
    was_training = model.training
    model.eval()
    try:
        with _record_autograd_functions(tracer):
            graph = tracer.trace(model, concrete_args=_defaults_beyond(model, num_inputs) or None)
    except SpecError:
        raise
    except Exception as err:
        path = tracer.current_module()
        where = (f"module {path!r} ({type(names[path]).__name__})" if path
                 else f"the top-level forward of {type(model).__name__}")
        raise SpecError(
            f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__} in {where}: {err}. "
            "Typical causes are data-dependent control flow (if/for on tensor values) or a call fx cannot "
            f"record. {how_to_proceed(path)}"
        ) from err
    finally:
        model.train(was_training)
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def describe_value(value: Any) -> Any:
    """What the rules need to know of a runtime value: shapes of tensors, the value of anything small."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return tuple(int(v) for v in value)
    if isinstance(value, (list, tuple)):
        items = [describe_value(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: describe_value(v) for k, v in value.items()}
    return value


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.meta: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.meta[n] = describe_value(result)
        return result


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> dict[fx.Node, Any]:
    """Run the traced graph once (eval mode, no grad) and keep every node's shapes and small values."""
    recorder = _ShapeRecorder(gm)
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            recorder.run(*inputs)
    except Exception as err:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        raise SpecError(
            f"the model fails on the example input of shape {shapes}: {type(err).__name__}: {err}; pass an "
            "example_input the model accepts (a batch shaped like the dataset's images)"
        ) from err
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return recorder.meta


def module_path(node: fx.Node) -> str:
    """The module a node belongs to: its own target for call_module, else the innermost traced module."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    for qualname, _ in reversed(list(stack.values())):
        if qualname:
            return qualname
    return ""

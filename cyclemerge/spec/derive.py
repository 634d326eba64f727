"""``derive_spec``: trace, refuse early, propagate shapes, join axes, build, verify."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import fx, nn

from cyclemerge.spec.axes import AxisGraph, ParamAxis, TensorAxes
from cyclemerge.spec.build import build
from cyclemerge.spec.derived import DerivedSpec
from cyclemerge.spec.errors import Refusal, SpecError, refusal_error
from cyclemerge.spec.site import Site, fix_value, trivial_value
from cyclemerge.spec.table import lookup, target_name
from cyclemerge.spec.trace import module_path, propagate_shapes, trace
from cyclemerge.spec.verify import verify as verify_spec


def plan(gm: fx.GraphModule, opaque: frozenset[str]) -> dict[fx.Node, object]:
    """The rule of every call node; raises one SpecError listing every node without one."""
    rules, refusals = {}, []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        rule = lookup(node, gm, opaque)
        if isinstance(rule, str):
            refusals.append(Refusal(target_name(node, gm), node.name, module_path(node), rule))
        else:
            rules[node] = rule
    if refusals:
        raise refusal_error(refusals)
    return rules


def _state_axes(key: str, tensor: torch.Tensor) -> TensorAxes:
    return TensorAxes(tuple(ParamAxis(key, i, n) for i, n in enumerate(tensor.shape)))


def _tie_aliases(graph: AxisGraph, model: nn.Module) -> None:
    """A tensor reachable under two keys (tied weights) must be permuted the same way under both."""
    first: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride())) if t.numel() else (id(t),)
        if ident in first:
            for a, n in enumerate(t.shape):
                graph.tie(ParamAxis(first[ident], a, n), ParamAxis(key, a, n), f"tied tensors {first[ident]}, {key}")
        else:
            first[ident] = key


def join_axes(model: nn.Module, gm: fx.GraphModule, rules: dict, meta: dict, opaque: frozenset[str]):
    graph = AxisGraph()
    state = model.state_dict()
    keys = set(state)
    _tie_aliases(graph, model)
    values: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            values[node] = trivial_value(meta.get(node))
        elif node.op == "get_attr":
            target = str(node.target)
            values[node] = _state_axes(target, state[target]) if target in keys else trivial_value(meta.get(node))
        elif node.op == "output":
            fix_value(graph, _collect(values, node.args[0]), "")
        else:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            site = Site(node, graph, values, meta, module, keys)
            try:
                values[node] = rules[node](site)
            except SpecError:
                raise
            except Exception as err:
                raise SpecError(
                    f"cyclemerge.spec: the rule for {target_name(node, gm)} (graph node {node.name!r} in module "
                    f"{site.path!r}) failed: {type(err).__name__}: {err}; mark that module opaque "
                    f'(opaque_modules=["{site.path}"]) and report the model'
                ) from err
    return graph, values


def _collect(values: dict, arg) -> list:
    """Every value in a (possibly nested) output structure."""
    if isinstance(arg, fx.Node):
        return [values.get(arg)]
    if isinstance(arg, (list, tuple)):
        return [v for a in arg for v in _collect(values, a)]
    if isinstance(arg, dict):
        return [v for a in arg.values() for v in _collect(values, a)]
    return []


def derive_spec(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    opaque_modules: Sequence[str] = (),
    verify: bool = True,
    rtol: float = 1e-5,
    seed: int = 0,
) -> DerivedSpec:
    """The permutation spec, stat points and layer parts of ``model``, read off its torch.fx graph.

    ``example_input``: one batch the model accepts (a tuple for several arguments); only its shape and
    dtype matter, the model is run once on it in eval mode. ``opaque_modules``: module paths kept whole,
    with every axis at their boundary fixed. With ``verify``, random permutations of all groups must
    leave the outputs of a float64 copy unchanged to ``rtol``, or a SpecError is raised. Raises
    SpecError (a ValueError) when the model cannot be traced or uses an op with no rule, before any
    shape propagation. The model is not modified.
    """
    t0 = time.perf_counter()
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    opaque = frozenset(opaque_modules)
    gm = trace(model, opaque_modules, len(inputs))
    rules = plan(gm, opaque)
    meta = propagate_shapes(gm, inputs)
    graph, values = join_axes(model, gm, rules, meta, opaque)
    spec = build(model, gm, graph, values, opaque)
    spec.seconds["derive"] = time.perf_counter() - t0
    if verify:
        t1 = time.perf_counter()
        worst = verify_spec(model, inputs, spec, rtol=rtol, seed=seed)
        spec.seconds["verify"] = time.perf_counter() - t1
        spec.max_relative_change = worst
    return spec


"""Every model's permutation spec, stat points and layer parts come from its own graph (cyclemerge.spec).

One source of truth: the built-in models derive their specs like any user model and only rename the
groups to the papers' names (``h0``, ``res1``, ``conv3``, ...), so logs, gates and reports keep them;
tests/spec_oracles.py keeps the hand-written specs they replaced, and the tests assert equality.

A spec depends on the architecture, not on the weights, so it is derived once per process for each
structure (class, example-input shape, state-dict keys and shapes, opaque modules, and whatever the
caller adds, e.g. a factory's kwargs) and shared by every instance and copy of it.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Hashable, Sequence

import torch
from torch import nn

from cyclemerge.permutation import PermSpec, StateDict, group_sizes
from cyclemerge.spec.derived import DerivedSpec

_CACHE: dict[tuple, DerivedSpec] = {}
_LOCK = threading.Lock()

GroupNames = dict[tuple[str, int], str]
"""(state-dict key, axis) -> the name of the group that axis belongs to."""


def structure_key(model: nn.Module, example_input: torch.Tensor, opaque_modules: Sequence[str] = (),
                  extra: Hashable = ()) -> tuple:
    cls = type(model)
    tensors = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return cls.__module__, cls.__qualname__, tuple(example_input.shape), tensors, tuple(opaque_modules), extra


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
          "_forward_hooks_always_called")


def without_hooks(model: nn.Module) -> nn.Module:
    """``model`` itself, or a copy without forward hooks when it has some: tracing runs hooks with
    proxies for tensors, and a hook that reads a shape (REPAIR's, a user's) would break the trace."""
    if not any(getattr(m, h, None) for m in model.modules() for h in _HOOKS):
        return model
    work = copy.deepcopy(model)
    for m in work.modules():
        for h in _HOOKS:
            if getattr(m, h, None):
                getattr(m, h).clear()
    return work


def name_groups(spec: DerivedSpec, names: GroupNames) -> DerivedSpec:
    """``spec`` with each group renamed after the (key, axis) that anchors it; every group needs one."""
    rename: dict[str, str] = {}
    for (key, axis), name in names.items():
        segments = spec.axes[key][axis]
        if len(segments) != 1 or segments[0][0] is None:
            raise RuntimeError(f"group names: {key} axis {axis} is not one permuted group in the derived spec "
                               f"({segments}); the names of {name!r} no longer fit the model")
        rename[segments[0][0]] = name
    unnamed = sorted(set(spec.groups) - set(rename))
    if unnamed:
        raise RuntimeError(f"group names: derived groups {unnamed} have no name; add them to group_names()")
    return spec.renamed(rename)


def cached_spec(model: nn.Module, example_input: torch.Tensor, *, opaque_modules: Sequence[str] = (),
                names: GroupNames | None = None, verify: bool = True, extra: Hashable = ()) -> DerivedSpec:
    """The derived (and, with ``verify``, verified) spec of ``model``'s structure, from the process cache.

    Derivation never draws from torch's global RNG stream (the verifier has its own generator, and
    the stream is forked besides), so building a model for training gives the same weights as before.
    """
    # cyclemerge.spec reads cyclemerge.models.layers, so it is imported when first needed, not at import time
    from cyclemerge.spec.derive import derive_spec

    key = structure_key(model, example_input, opaque_modules, extra)
    with _LOCK:
        spec = _CACHE.get(key)
        if spec is None:
            with torch.random.fork_rng(devices=[]):
                spec = derive_spec(without_hooks(model), example_input, opaque_modules=opaque_modules,
                                   verify=verify)
            if names is not None:
                spec = name_groups(spec, names)
            _CACHE[key] = spec
    return spec


def example_like(model: nn.Module, *shape: int) -> torch.Tensor:
    """A zero input batch on the device and in the float dtype of the model's weights."""
    weight = next((t for t in model.state_dict().values() if torch.is_floating_point(t)), None)
    if weight is None:
        return torch.zeros(*shape)
    return torch.zeros(*shape, device=weight.device, dtype=weight.dtype)


def attach(model: nn.Module, spec: DerivedSpec) -> nn.Module:
    """Give ``model`` ``derived_spec()`` and the PermutableModel methods, answered from ``spec``."""
    spec.attach(model)
    model.derived_spec = lambda: spec
    return model


class GraphSpec:
    """Mixin of the built-in models: ``perm_spec()``, ``layer_parts()`` and ``stat_points()`` read off
    the model's graph. A subclass says what one input batch looks like and what its groups are called.

    Built-in specs are not re-verified at run time: tests/test_models.py checks them by permutation on
    every architecture and tests/test_spec.py against the hand-written oracles, which is the same check.
    """

    def spec_input(self) -> torch.Tensor:
        raise NotImplementedError

    def group_names(self) -> GroupNames:
        raise NotImplementedError

    def derived_spec(self) -> DerivedSpec:
        return cached_spec(self, self.spec_input(), names=self.group_names(), verify=False)

    def perm_spec(self) -> PermSpec:
        return dict(self.derived_spec().perm_spec)

    def layer_parts(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.derived_spec().layer_parts.items()}

    def stat_points(self) -> dict[str, str]:
        return dict(self.derived_spec().stat_points)


def plain_spec(spec: PermSpec, state_dict: StateDict, *, stat_points: dict[str, str] | None = None,
               layer_parts: dict[str, list[str]] | None = None) -> DerivedSpec:
    """A hand-written PermSpec as a DerivedSpec (no blocks); keys it does not list are fixed."""
    axes = {}
    # the spec's own key order first: the matchers visit groups in the order they first appear
    for key in [*(k for k in spec if k in state_dict), *(k for k in state_dict if k not in spec)]:
        tensor = state_dict[key]
        groups = spec.get(key, (None,) * tensor.dim())
        axes[key] = tuple(((g, n, 1),) for g, n in zip(groups, tensor.shape))
    return DerivedSpec(groups=group_sizes(spec, state_dict), axes=axes,
                       shapes={k: tuple(t.shape) for k, t in state_dict.items()},
                       stat_points=dict(stat_points or {}), layer_parts={k: list(v) for k, v in (layer_parts or {}).items()})


def spec_of(model: nn.Module) -> DerivedSpec:
    """The model's derived spec (``model.derived_spec()``, every model of ``build_model``), or one made
    from a model that only writes ``perm_spec()`` by hand."""
    derived = getattr(model, "derived_spec", None)
    if callable(derived):
        return derived()
    if not hasattr(model, "perm_spec"):
        raise TypeError(f"{type(model).__name__} has neither derived_spec() nor perm_spec(); build it with "
                        "cyclemerge.models.build_model or derive one with cyclemerge.spec.derive_spec(...).attach")
    points = model.stat_points() if hasattr(model, "stat_points") else None
    parts = model.layer_parts() if hasattr(model, "layer_parts") else None
    return plain_spec(model.perm_spec(), model.state_dict(), stat_points=points, layer_parts=parts)

"""User architectures (``model.arch: custom``): a factory function is imported and called, never a
pickle loaded, and the model's permutation spec is derived from its graph and verified before use.

    model:
      arch: custom
      factory: "tests.fixtures.user_cnn:build"   # package.module:function, importable from the project
      kwargs: {width: 16}                        # keyword arguments of the factory
      opaque_modules: []                         # module paths kept whole (see cyclemerge.spec)

The factory is called with ``model.kwargs``; the dataset's ``in_channels``, ``num_classes`` and
``image_size`` are passed too when the factory takes a parameter of that name and the kwargs do not
set it. The model must map one batch of the dataset's images to ``num_classes`` logits. Everything that
can go wrong here is a :class:`~cyclemerge.config.ConfigError` that names ``model.factory``.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cyclemerge.config import ConfigError, ModelConfig
from cyclemerge.models.graph_spec import attach, cached_spec
from cyclemerge.spec.derived import DerivedSpec
from cyclemerge.spec.errors import SpecError

DATASET_ARGUMENTS = ("in_channels", "num_classes", "image_size")


def _where(cfg: ModelConfig) -> str:
    return f"model.factory {cfg.factory!r}"


def resolve_factory(cfg: ModelConfig) -> Callable[..., nn.Module]:
    """The callable named by ``model.factory`` ("package.module:function", attribute paths allowed)."""
    if cfg.factory is None or ":" not in cfg.factory:
        raise ConfigError(f'model.factory: {cfg.factory!r} is not "package.module:function"')
    module_name, attr_path = cfg.factory.split(":", 1)
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = f"module {err.name!r}" if err.name and err.name != module_name else f"module {module_name!r}"
        raise ConfigError(f"{_where(cfg)}: cannot import {missing} ({err}); the module must be importable from "
                          f"the project folder (check with: python -c 'import {module_name}')") from err
    except Exception as err:
        raise ConfigError(f"{_where(cfg)}: importing module {module_name!r} failed with {type(err).__name__}: "
                          f"{err}") from err
    for i, part in enumerate(attr_path.split(".")):
        if not hasattr(target, part):
            owner = module_name if i == 0 else f"{module_name}:{'.'.join(attr_path.split('.')[:i])}"
            public = sorted(n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n, None)))
            raise ConfigError(f"{_where(cfg)}: {owner} has no attribute {part!r}; callables there: "
                              f"{', '.join(public[:12]) or '(none)'}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{_where(cfg)}: is a {type(target).__name__}, not callable; name a function or class "
                          "that returns the torch.nn.Module")
    return target


def factory_kwargs(fn: Callable, cfg: ModelConfig, *, in_channels: int, image_size: int,
                   num_classes: int) -> dict[str, Any]:
    """``model.kwargs`` plus the dataset's shape for each parameter the factory takes and they leave out."""
    dataset = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
    kwargs = dict(cfg.kwargs)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    for name in DATASET_ARGUMENTS:
        p = params.get(name)
        if name not in kwargs and p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            kwargs[name] = dataset[name]
    return kwargs


def _check_outputs(model: nn.Module, cfg: ModelConfig, x: torch.Tensor, num_classes: int) -> None:
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model.eval()(x)
    except Exception as err:
        raise ConfigError(f"{_where(cfg)}: the model fails on one batch of the dataset's shape "
                          f"{list(x.shape)} with {type(err).__name__}: {err}; check model.kwargs "
                          f"({json.dumps(cfg.kwargs)}) against the dataset") from err
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{_where(cfg)}: the model maps a batch of shape {list(x.shape)} to {got}, but the "
                          f"pipeline needs logits of shape [{x.shape[0]}, {num_classes}] (the dataset's classes); "
                          "set model.kwargs (e.g. num_classes) to match the dataset")


def custom_spec(model: nn.Module, cfg: ModelConfig, *, in_channels: int, image_size: int) -> DerivedSpec:
    """The verified spec of a model of ``cfg`` (derived once per process per factory, kwargs and shape)."""
    x = torch.zeros(1, in_channels, image_size, image_size)
    weight = next((t for t in model.state_dict().values() if torch.is_floating_point(t)), None)
    if weight is not None:
        x = x.to(weight.device, weight.dtype)
    try:
        return cached_spec(model, x, opaque_modules=cfg.opaque_modules, verify=True,
                           extra=(cfg.factory, json.dumps(cfg.kwargs, sort_keys=True, default=str)))
    except SpecError as err:
        raise ConfigError(f"{_where(cfg)}: {err}") from err


def build_custom(cfg: ModelConfig, *, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Import and call the factory, check the model on the dataset's shape, attach its verified spec."""
    fn = resolve_factory(cfg)
    kwargs = factory_kwargs(fn, cfg, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    try:
        model = fn(**kwargs)
    except Exception as err:
        raise ConfigError(f"{_where(cfg)} raised {type(err).__name__}: {err} when called with "
                          f"{json.dumps(kwargs, default=str)}; fix model.kwargs or the factory") from err
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{_where(cfg)}: returned a {type(model).__name__}, not a torch.nn.Module")
    _check_outputs(model, cfg, torch.zeros(2, in_channels, image_size, image_size), num_classes)
    missing = [p for p in cfg.opaque_modules if p not in dict(model.named_modules())]
    if missing:
        raise ConfigError(f"model.opaque_modules: {missing} are not modules of the model of {_where(cfg)}; "
                          f"its top-level modules are {[n for n, _ in model.named_children()]}")
    return attach(model, custom_spec(model, cfg, in_channels=in_channels, image_size=image_size))


def describe(cfg: ModelConfig) -> str:
    """The architecture in the words of the params file, for messages about checkpoints."""
    if cfg.arch == "custom":
        return f"{_where(cfg)} with model.kwargs {json.dumps(cfg.kwargs, default=str)}"
    return f"model.arch={cfg.arch!r}"


def how_to_fit(cfg: ModelConfig) -> str:
    if cfg.arch == "custom":
        return "set model.factory and model.kwargs to the architecture the checkpoints were trained with"
    return "set model.arch and its widths to those the checkpoints were trained with"

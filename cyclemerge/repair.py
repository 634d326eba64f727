"""REPAIR and BatchNorm reset: give the merged model back the activation statistics of its endpoints.

Averaging aligned models shrinks the spread of their activations (units that were not perfectly
matched partly cancel), and the shrinkage compounds with depth. REPAIR (Jordan et al. 2022, as run in
C2M3) measures, at every stat point and in forward order, the merged model's own per-channel mean and
std with the corrections of all earlier points already in place, and rescales the channel to the
*goal statistics*: the (gate-)weighted average of the universe-aligned endpoints' means and variances.

Every correction ``a -> s·a + t`` is folded into the tensors of the module at that point, so the
result is a plain state dict of the same architecture (no wrapper, no extra layer):

- Linear/Conv not followed by a norm: rows of the weight times ``s``, bias ``s·b + t``;
- LayerNorm2d / BatchNorm / GroupNorm: their affine weight times ``s``, bias ``s·b + t``;
- ChannelAffine on an identity shortcut: its ``scale``/``shift`` buffers the same way;
- BatchNorm also gets its running statistics recomputed first from the merged model's own input
  (with the earlier corrections active), so its buffers describe the network actually returned, as
  the BN reset in C2M3's REPAIR does as a side effect;
- residual sum ``branch + shortcut`` (a parameter-free ``nn.Identity`` point): the sum is what the
  next blocks read, so its statistics take precedence over those of its summands. After each summand
  was corrected to its own goal, the sum's mean is already right (means add up, the goal means are
  the same weighted average); only its variance is off, by the cross-covariance of the two branches.
  The sum's correction is therefore a common scale ``s`` applied to every summand around its current
  mean: each summand keeps its goal mean, the sum hits its goal mean and std exactly, and the
  summands' stds end up off their goals by that common factor ``s``.

A channel with (numerically) zero variance cannot be rescaled; it keeps scale 1 and only its mean
is moved. Everything is measured on the calibration tensors passed in (a slice of the TRAIN split).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cyclemerge.activations import Moments, Stats, stream
from cyclemerge.models.layers import ChannelAffine, LayerNorm2d
from cyclemerge.permutation import StateDict

REPAIR_METHODS = ("repair", "reset_bn", "none")
MIN_VAR = 1e-12
PointWeights = torch.Tensor | Sequence[float] | Mapping[str, torch.Tensor] | None


def _point_weights(weights: PointWeights, path: str, n_models: int, n_channels: int) -> torch.Tensor:
    """Convex weights of one stat point as float64 [C, N], rows summing to one."""
    if weights is None:
        w = torch.ones(n_models, dtype=torch.float64)
    elif isinstance(weights, Mapping):
        if path not in weights:
            raise KeyError(f"goal_statistics: no weights for stat point {path!r}; given for {', '.join(weights)}")
        w = torch.as_tensor(weights[path])
    else:
        w = torch.as_tensor(weights)
    w = w.detach().to("cpu", torch.float64)
    if w.dim() == 1 and w.numel() == n_models:
        w = w.expand(n_channels, n_models)
    elif w.shape != (n_channels, n_models):
        raise ValueError(
            f"goal_statistics: weights for {path!r} have shape {tuple(w.shape)}; expected [{n_models}] "
            f"(one per model) or [{n_channels}, {n_models}] (per channel, per model)"
        )
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"goal_statistics: weights for {path!r} must be finite and non-negative")
    total = w.sum(dim=1, keepdim=True)
    if (total <= 0).any():
        raise ValueError(
            f"goal_statistics: weights for {path!r} are all zero for some channel; no model to take statistics from"
        )
    return w / total


def goal_statistics(endpoint_stats: Sequence[Mapping[str, Stats]], weights: PointWeights = None) -> dict[str, Stats]:
    """Per-channel goal mean Σ_k w_k μ_k and goal variance Σ_k w_k σ²_k of every stat point.

    ``endpoint_stats`` must be those of the UNIVERSE-ALIGNED endpoints (``permute_stats`` applied), so
    that channel c means the same unit in every model. ``weights``: None (uniform, C2M3's REPAIR), one
    weight per model, or a dict stat point -> [N] or [C, N] (e.g. the final gates, see
    ``stat_point_weights``). Weights are normalised to sum to one per channel.
    """
    if not endpoint_stats:
        raise ValueError("goal_statistics: no endpoint statistics")
    n = len(endpoint_stats)
    points = list(endpoint_stats[0])
    for k, stats in enumerate(endpoint_stats):
        if list(stats) != points:
            raise ValueError(f"goal_statistics: endpoint {k} has stat points {list(stats)}, endpoint 0 has {points}")
    goal: dict[str, Stats] = {}
    for path in points:
        means = torch.stack([s[path].mean.to(torch.float64) for s in endpoint_stats], dim=1)
        variances = torch.stack([s[path].var.to(torch.float64) for s in endpoint_stats], dim=1)
        w = _point_weights(weights, path, n, means.shape[0])
        count = min(s[path].count for s in endpoint_stats)
        goal[path] = Stats((w * means).sum(dim=1), (w * variances).sum(dim=1), count)
    return goal


def _summands(stat_points: Mapping[str, str], path: str) -> list[str]:
    """Earlier points of the same group under the same parent module: the branch and the shortcut that
    a residual sum adds up (``stages.0.1.norm2`` and ``stages.0.1.shortcut`` for ``stages.0.1.residual``)."""
    parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
    order = list(stat_points)
    earlier = order[: order.index(path)]
    return [q for q in earlier if stat_points[q] == stat_points[path] and q.startswith(parent)]


def stat_point_weights(
    part_weights: Mapping[str, torch.Tensor], layer_parts: Mapping[str, Sequence[str]], stat_points: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Per-stat-point weights from per-part gate weights ([N], or [C, N] at channel granularity).

    A point takes the weights of the part holding its module's tensors (a norm belongs to its conv's
    part). A parameter-free residual sum takes the mean of its summands' weights.
    """
    owner = {key: part for part, keys in layer_parts.items() for key in keys}
    out: dict[str, torch.Tensor] = {}
    for path in stat_points:
        parts = {part for key, part in owner.items() if key.startswith(path + ".")}
        if len(parts) > 1:
            raise ValueError(f"stat point {path!r} has tensors in several parts: {sorted(parts)}")
        if parts:
            part = parts.pop()
            if part not in part_weights:
                raise KeyError(f"stat_point_weights: no weights for part {part!r} (holds stat point {path!r})")
            out[path] = torch.as_tensor(part_weights[part], dtype=torch.float64)
            continue
        summands = _summands(stat_points, path)
        if not summands:
            raise ValueError(f"stat point {path!r} owns no tensors and sums no earlier points of its group")
        out[path] = torch.stack(torch.broadcast_tensors(*[out[q] for q in summands])).mean(dim=0)
    return out


def _affine(current: Stats, goal: Stats, min_var: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (s, t) with s·a + t having the goal mean and std."""
    if current.mean.shape != goal.mean.shape:
        raise ValueError(f"REPAIR: {current.mean.numel()} channels measured but the goal has {goal.mean.numel()}")
    live = current.var > min_var
    s = torch.where(live, (goal.var / current.var.clamp_min(min_var)).sqrt(), torch.ones_like(current.var))
    return s, goal.mean - s * current.mean


def _fold(module: nn.Module, path: str, s: torch.Tensor, t: torch.Tensor) -> None:
    """Edit the module's own tensors so that its output becomes s·out + t per channel."""
    if isinstance(module, ChannelAffine):
        gain, offset = module.scale, module.shift
    elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, LayerNorm2d, _BatchNorm, nn.GroupNorm)):
        gain, offset = module.weight, module.bias
    else:
        raise TypeError(f"REPAIR: cannot fold a correction into {path!r} ({type(module).__name__})")
    if gain is None or offset is None:
        raise ValueError(f"REPAIR: {path!r} ({type(module).__name__}) needs a weight and a bias to take the correction")
    s = s.to(gain.device)
    t = t.to(gain.device)
    gain.copy_(gain.to(torch.float64) * s.view((-1,) + (1,) * (gain.dim() - 1)))
    offset.copy_(offset.to(torch.float64) * s + t)


def _measure(
    model: nn.Module, x: torch.Tensor, batch_size: int, outputs: list[str], inputs: Sequence[str] = ()
) -> dict[str, Stats]:
    moments: dict[str, Moments] = {}

    def sink(name: str, a: torch.Tensor) -> None:
        moments.setdefault(name, Moments()).add(a)

    stream(model, x, batch_size=batch_size, outputs=outputs, inputs=inputs, sink=sink, stop_early=True)
    return {name: m.stats() for name, m in moments.items()}


def _repair_batchnorm(
    model: nn.Module, path: str, goal: Stats, x: torch.Tensor, batch_size: int, min_var: float
) -> None:
    bn = model.get_submodule(path)
    if bn.weight is None or bn.bias is None:
        raise ValueError(f"REPAIR: BatchNorm {path!r} has no affine weight and bias to take the correction")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"REPAIR: BatchNorm {path!r} tracks no running statistics; its eval output is not a fixed affine map"
        )
    inp = _measure(model, x, batch_size, [path], inputs=[path])[f"{path}:in"]
    bn.running_mean.copy_(inp.mean)
    bn.running_var.copy_(inp.var)
    # Eval BN is the affine map a·(in - running_mean) + bias; its output statistics follow exactly.
    a = bn.weight.to(torch.float64).cpu() / (inp.var + bn.eps).sqrt()
    out = Stats(bn.bias.to(torch.float64).cpu(), a.square() * inp.var, inp.count)
    _fold(bn, path, *_affine(out, goal, min_var))


def _repair_sum(
    model: nn.Module,
    points: Mapping[str, str],
    path: str,
    goal: Stats,
    x: torch.Tensor,
    batch_size: int,
    min_var: float,
) -> None:
    summands = _summands(points, path)
    if len(summands) < 2:
        raise ValueError(
            f"REPAIR: residual sum {path!r} needs its branch and shortcut as earlier stat points of group "
            f"{points[path]!r} under the same parent module; found {summands}"
        )
    measured = _measure(model, x, batch_size, summands + [path])
    s, t = _affine(measured[path], goal, min_var)
    # Each summand is scaled around its own mean; the last one also absorbs the sum's mean error.
    for q in summands[:-1]:
        keep = (1 - s) * measured[q].mean
        _fold(model.get_submodule(q), q, s, keep)
        t = t - keep
    _fold(model.get_submodule(summands[-1]), summands[-1], s, t)


def _state_dict(model: nn.Module) -> StateDict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def repair(
    model: nn.Module,
    merged_state_dict: StateDict,
    goal: Mapping[str, Stats],
    x: torch.Tensor,
    *,
    batch_size: int,
    min_var: float = MIN_VAR,
) -> StateDict:
    """The merged state dict with every stat point in ``goal`` rescaled to its goal statistics on ``x``.

    ``model`` is any instance of the architecture (it is not modified); points are processed in
    ``model.stat_points()`` order, each measured with the earlier corrections already folded in. Each
    point costs one forward pass over ``x``, cut short right after that point. Returns CPU tensors.
    """
    points = model.stat_points()
    unknown = [p for p in goal if p not in points]
    if unknown:
        raise KeyError(f"REPAIR: goal has statistics for {unknown}, which are not stat points of this model")
    work = copy.deepcopy(model)
    work.load_state_dict(merged_state_dict)
    with torch.no_grad():
        for path in (p for p in points if p in goal):
            module = work.get_submodule(path)
            if isinstance(module, nn.Identity):
                _repair_sum(work, points, path, goal[path], x, batch_size, min_var)
            elif isinstance(module, _BatchNorm):
                _repair_batchnorm(work, path, goal[path], x, batch_size, min_var)
            else:
                current = _measure(work, x, batch_size, [path])[path]
                _fold(module, path, *_affine(current, goal[path], min_var))
    return _state_dict(work)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def _no_batchnorm_error() -> ValueError:
    return ValueError(
        "repair.method=reset_bn needs BatchNorm layers, but this model has none (an MLP, or model.norm: "
        "layernorm); use repair.method: repair, which folds the statistics into any model's weights, or none"
    )


def reset_batchnorm(model: nn.Module, state_dict: StateDict, x: torch.Tensor, *, batch_size: int) -> StateDict:
    """The state dict with every BatchNorm's running statistics recomputed on ``x``.

    Cumulative average over the batches (``momentum=None``: every batch counts once, so a batch size
    that divides the calibration size gives the exact mean), other modules in eval mode; all other
    tensors are returned unchanged. Raises on a model without BatchNorm.
    """
    if not has_batchnorm(model):
        raise _no_batchnorm_error()
    work = copy.deepcopy(model)
    work.load_state_dict(state_dict)
    work.eval()
    norms = [m for m in work.modules() if isinstance(m, _BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    device = next(iter(work.state_dict().values())).device
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            work(x[start : start + batch_size].to(device))
    return _state_dict(work)


def apply_repair(
    method: str,
    model: nn.Module,
    merged_state_dict: StateDict,
    x: torch.Tensor,
    *,
    batch_size: int,
    endpoint_stats: Sequence[Mapping[str, Stats]] | None = None,
    weights: PointWeights = None,
) -> StateDict:
    """Dispatch on ``repair.method``: ``repair`` (goal statistics from the aligned endpoints' stats and
    the weights), ``reset_bn`` (BatchNorm running statistics only; an error on a model without
    BatchNorm, since the request cannot mean anything there) or ``none`` (a copy)."""
    if method == "none":
        return {k: v.detach().cpu().clone() for k, v in merged_state_dict.items()}
    if method == "reset_bn":
        return reset_batchnorm(model, merged_state_dict, x, batch_size=batch_size)
    if method == "repair":
        if endpoint_stats is None:
            raise ValueError(
                "repair.method=repair needs the statistics of the universe-aligned endpoints (endpoint_stats)"
            )
        return repair(model, merged_state_dict, goal_statistics(endpoint_stats, weights), x, batch_size=batch_size)
    raise ValueError(f"unknown repair method {method!r}; known: {', '.join(REPAIR_METHODS)}")

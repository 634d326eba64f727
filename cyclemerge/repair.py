"""REPAIR and BatchNorm reset: give the merged model back the activation statistics of its endpoints.

Averaging aligned models shrinks the spread of their activations (units that were not perfectly
matched partly cancel), and the shrinkage compounds with depth. REPAIR (Jordan et al. 2022, as run in
C2M3) rescales every stat point's channels, in forward order, from the merged model's own per-channel
mean and std (measured with the corrections of all earlier points in place) to the *goal
statistics*: the (gate-)weighted average of the universe-aligned endpoints' means and variances.

One pass over the calibration data does it, whatever the number of points. In each batch's forward,
a hook at every point standardises the point's output with that batch's own statistics and moves it
to the goal (a BatchNorm in train mode whose affine is the goal, like the REPAIR paper's reset
layers), so every later point already reads corrected inputs; the same hook pools the point's raw
moments over all batches, and the correction folded into the weights comes from the pooled moments.
With the whole calibration set in one batch (``batch_size >= len(x)``) the in-pass corrections ARE
the final ones, and the result is the point-by-point definition above, to float rounding. With
N/B batches of B, a point's in-pass correction is off its final one by the batch's sampling
deviation (~1/sqrt(B)); later points see it through products of two such deviations, so their
pooled statistics end up off the goal by about K/sqrt(B·N), K ~ 3-10 (measured, tests/test_repair.py
bounds it): 0.3% at B=500, N=5000 on trained MLPs, below the ~1/sqrt(N) sampling error of the goal
statistics themselves. It is the REPAIR paper's own estimator (train-mode BN with cumulative
statistics); where exactness matters, a batch of the whole calibration set gives it.

Every correction ``a -> s·a + t`` is folded into the tensors of the module at that point, so the
result is a plain state dict of the same architecture (no wrapper, no extra layer):

- Linear/Conv not followed by a norm: rows of the weight times ``s``, bias ``s·b + t``;
- LayerNorm2d / BatchNorm / GroupNorm: their affine weight times ``s``, bias ``s·b + t``;
- ChannelAffine on an identity shortcut: its ``scale``/``shift`` buffers the same way;
- BatchNorm also gets its running statistics set to the pooled statistics of its input (with the
  earlier corrections active), so its buffers describe the network actually returned, as the BN
  reset in C2M3's REPAIR does as a side effect;
- residual sum ``branch + shortcut`` (a parameter-free ``nn.Identity`` point): the sum is what the
  next blocks read, so its statistics take precedence over those of its summands. After each summand
  was corrected to its own goal, the sum's mean is already right (means add up, the goal means are
  the same weighted average); only its variance is off, by the cross-covariance of the two branches.
  The sum's correction is therefore a common scale ``s`` applied to every summand around its goal
  mean: each summand keeps its goal mean, the sum hits its goal mean and std, and the summands'
  stds end up off their goals by that common factor ``s``.

A channel with (numerically) zero variance cannot be rescaled; it keeps scale 1 and only its mean
is moved. Everything is measured on the calibration tensors passed in (a slice of the TRAIN split).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cyclemerge.activations import Moments, Stats, batch_moments, row_chunks, run_hooked
from cyclemerge.config import REPAIR_METHODS
from cyclemerge.models.layers import ChannelAffine, LayerNorm2d
from cyclemerge.permutation import StateDict

MIN_VAR = 1e-12
# Below this std/|mean| a float32 channel is constant up to the rounding of its own values (float32
# resolves 6e-8 relative), so what variance it shows is rounding noise, not something to rescale.
FLOAT32_CONSTANT = 1e-6
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


def _live(mean: torch.Tensor, var: torch.Tensor, min_var: float) -> torch.Tensor:
    """Channels with a variance to rescale: above ``min_var`` and above float32 rounding of the mean."""
    return (var > min_var) & (var > (FLOAT32_CONSTANT * mean).square())


def _affine(current: Stats, goal: Stats, min_var: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (s, t) with s·a + t having the goal mean and std."""
    if current.mean.shape != goal.mean.shape:
        raise ValueError(f"REPAIR: {current.mean.numel()} channels measured but the goal has {goal.mean.numel()}")
    live = _live(current.mean, current.var, min_var)
    s = torch.where(live, (goal.var / current.var.clamp_min(min_var)).sqrt(), torch.ones_like(current.var))
    return s, goal.mean - s * current.mean


def _affine_tensors(module: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (gain, offset) tensors that scale and shift the module's output channels."""
    if isinstance(module, ChannelAffine):
        gain, offset = module.scale, module.shift
    elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, LayerNorm2d, _BatchNorm, nn.GroupNorm)):
        gain, offset = module.weight, module.bias
    else:
        raise TypeError(f"REPAIR: cannot fold a correction into {path!r} ({type(module).__name__})")
    if gain is None or offset is None:
        raise ValueError(f"REPAIR: {path!r} ({type(module).__name__}) needs a weight and a bias to take the correction")
    return gain, offset


def _fold(module: nn.Module, path: str, s: torch.Tensor, t: torch.Tensor) -> None:
    """Edit the module's own tensors so that its output becomes s·out + t per channel."""
    gain, offset = _affine_tensors(module, path)
    s = s.to(gain.device)
    t = t.to(gain.device)
    gain.copy_(gain.to(torch.float64) * s.view((-1,) + (1,) * (gain.dim() - 1)))
    offset.copy_(offset.to(torch.float64) * s + t)


def _check_batchnorm(bn: _BatchNorm, path: str) -> None:
    if bn.weight is None or bn.bias is None:
        raise ValueError(f"REPAIR: BatchNorm {path!r} has no affine weight and bias to take the correction")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"REPAIR: BatchNorm {path!r} tracks no running statistics; its eval output is not a fixed affine map"
        )


def _residual_sums(work: nn.Module, points: Mapping[str, str], targets: Sequence[str]) -> dict[str, list[str]]:
    """Residual sum point -> its summand points, for every sum to repair."""
    sums = {}
    for path in targets:
        if isinstance(work.get_submodule(path), nn.Identity):
            summands = _summands(points, path)
            if len(summands) < 2:
                raise ValueError(
                    f"REPAIR: residual sum {path!r} needs its branch and shortcut as earlier stat points of group "
                    f"{points[path]!r} under the same parent module; found {summands}"
                )
            sums[path] = summands
    return sums


def _standardiser(raw: Moments, goal: Stats | None, device: torch.device, min_var: float):
    """Output hook of one point: pool the batch's raw moments; with a goal, move the batch from its
    own statistics to the goal ones (in place), so the points after it read a corrected input."""
    if goal is None:
        return raw.add_batch
    goal_mean, goal_std = goal.mean.to(device), goal.var.sqrt().to(device)

    def hook(out: torch.Tensor) -> torch.Tensor:
        n, mean, m2 = batch_moments(out)
        raw.merge(n, mean, m2)
        var = m2 / max(n, 1)
        scale = torch.where(_live(mean, var, min_var), goal_std / var.clamp_min(min_var).sqrt(), torch.ones_like(var))
        shape = (1, -1) + (1,) * (out.dim() - 2)
        gain = scale.to(out.dtype).view(shape)
        offset = (goal_mean - scale * mean).to(out.dtype).view(shape)
        for chunk in row_chunks(out):
            chunk.mul_(gain).add_(offset)
        return out

    return hook


def _fold_batchnorm(bn: _BatchNorm, path: str, inp: Stats, goal: Stats, min_var: float) -> None:
    bn.running_mean.copy_(inp.mean)
    bn.running_var.copy_(inp.var)
    # Eval BN is the affine map a·(in - running_mean) + bias; its output statistics follow exactly.
    a = bn.weight.to(torch.float64).cpu() / (inp.var + bn.eps).sqrt()
    out = Stats(bn.bias.to(torch.float64).cpu(), a.square() * inp.var, inp.count)
    _fold(bn, path, *_affine(out, goal, min_var))


def _fold_sum(work: nn.Module, summands: Sequence[str], measured: Stats, goal: Stats,
              summand_means: Sequence[torch.Tensor], min_var: float) -> None:
    s, t = _affine(measured, goal, min_var)
    # Each summand is scaled around its own (corrected) mean; the last one also absorbs the sum's mean error.
    for q, mean in zip(summands[:-1], summand_means[:-1]):
        keep = (1 - s) * mean
        _fold(work.get_submodule(q), q, s, keep)
        t = t - keep
    _fold(work.get_submodule(summands[-1]), summands[-1], s, t)


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

    ``model`` is any instance of the architecture (it is not modified). One forward per batch of
    ``x``, cut short after the last point that needs measuring, whatever the number of points; exact
    (the point-by-point REPAIR) when ``batch_size >= len(x)``, else within the batches' sampling
    noise, about K/sqrt(batch_size·len(x)) (module docstring). Returns CPU tensors.
    """
    points = model.stat_points()
    unknown = [p for p in goal if p not in points]
    if unknown:
        raise KeyError(f"REPAIR: goal has statistics for {unknown}, which are not stat points of this model")
    work = copy.deepcopy(model)
    work.load_state_dict(merged_state_dict)
    targets = [p for p in points if p in goal]
    sums = _residual_sums(work, points, targets)
    # A sum's correction is folded into its summands, so they are measured even without goals of their own.
    measured = [p for p in points if p in goal or any(p in s for s in sums.values())]
    norms = [p for p in targets if isinstance(work.get_submodule(p), _BatchNorm)]
    for p in measured:  # fail before the pass, not after it
        module = work.get_submodule(p)
        if isinstance(module, _BatchNorm) and p in norms:
            _check_batchnorm(module, p)
        elif not isinstance(module, nn.Identity):
            _affine_tensors(module, p)
    if not measured:
        return _state_dict(work)
    device = next(iter(work.state_dict().values())).device
    raw = {p: Moments() for p in measured}
    norm_inputs = {p: Moments() for p in norms}
    with torch.no_grad():
        run_hooked(work, x, batch_size=batch_size,
                   outputs={p: _standardiser(raw[p], goal.get(p), device, min_var) for p in measured},
                   inputs={p: norm_inputs[p].add_batch for p in norms}, stop_early=True, writes=True)
        for path in targets:
            module = work.get_submodule(path)
            if path in sums:
                summand_means = [goal[q].mean if q in goal else raw[q].stats().mean for q in sums[path]]
                _fold_sum(work, sums[path], raw[path].stats(), goal[path], summand_means, min_var)
            elif path in norm_inputs:
                _fold_batchnorm(module, path, norm_inputs[path].stats(), goal[path], min_var)
            else:
                _fold(module, path, *_affine(raw[path].stats(), goal[path], min_var))
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

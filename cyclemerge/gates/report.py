"""Reading a GateResult: the per-part gate table, and the model weights REPAIR needs per stat point.

REPAIR's goal statistics become gate-weighted (soft-gates-reference §6.4): at every stat point the
goal mean / variance of channel c is ``sum_k w[c, k] * stat_k[c]`` over the aligned endpoints. The
weights of a stat point come from the parts that produce it:

- a point owning state-dict keys that differ between models (a Linear/Conv, a norm): the mean of
  the final weights of those keys (at ``layer`` granularity simply its layer part's weights);
- a residual sum (no keys of its own): the mean of the weights of the points inside its block that
  write into the same stream (the branch's last norm and the shortcut);
- a pass-through whose keys are equal in every model (an identity ``ChannelAffine`` shortcut before
  REPAIR): its gates carry no information, so it takes the weights of the stream entering the block,
  i.e. the last earlier point of the same permutation group outside the block.

Each value is an [N] vector, or [C, N] at ``channel`` granularity (C = the point's channels); rows
are normalised to sum to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cyclemerge.gates.learning import GateResult


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch.broadcast_tensors(*tensors)).mean(0)


def _normalised(w: torch.Tensor) -> torch.Tensor:
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-300), torch.full_like(w, 1.0 / w.shape[-1]))


def stat_point_weights(result: GateResult, stat_points: dict[str, str]) -> dict[str, torch.Tensor]:
    """Final model weights of every stat point (``model.stat_points()``: module path -> group)."""
    plan = result.plan
    float_keys = list(plan.key_part) + list(plan.ungated)
    order = list(stat_points)
    resolved: dict[str, torch.Tensor] = {}

    def own_keys(point: str) -> list[str]:
        return [k for k in float_keys if k.startswith(point + ".")]

    def block_of(point: str) -> str:
        return point.rpartition(".")[0]

    def inside(point: str, block: str) -> bool:
        return block == "" or point.startswith(block + ".")

    def overall() -> torch.Tensor:
        # last resort: the average weight a model has over all gate parts
        return _mean([w.reshape(-1, w.shape[-1]).mean(0) for w in result.weights.values()])

    def resolve(point: str, visiting: frozenset[str]) -> torch.Tensor:
        if point in resolved:
            return resolved[point]
        if point in visiting:
            raise ValueError(f"stat_point_weights: circular stream definition at {point!r}")
        visiting = visiting | {point}
        group, keys = stat_points[point], own_keys(point)
        informative = [k for k in keys if k not in result.constant_keys]
        block = block_of(point)
        if informative:
            w = _mean([result.key_weights(k) for k in informative])
        elif not keys:
            writers = [q for q in order if q != point and stat_points[q] == group and inside(q, block) and own_keys(q)]
            w = _mean([resolve(q, visiting) for q in writers]) if writers else overall()
        else:
            earlier = order[: order.index(point)]
            entering = [q for q in earlier if stat_points[q] == group and not (block and q.startswith(block + "."))]
            w = resolve(entering[-1], visiting) if entering else overall()
        resolved[point] = _normalised(w.to(torch.float64))
        return resolved[point]

    return {p: resolve(p, frozenset()) for p in order}


def layer_weights(result: GateResult) -> dict[str, torch.Tensor]:
    """Layer part -> mean weight of its float keys ([N] or [C, N]); the form ``repair.stat_point_weights`` takes.

    Unlike :func:`stat_point_weights` it cannot tell an identity shortcut's uninformative gates from
    real ones, so prefer that function for goal statistics.
    """
    plan = result.plan
    out = {}
    for layer, keys in plan.layer_parts.items():
        floats = [k for k in keys if k in plan.key_part or k in plan.ungated]
        if floats:
            out[layer] = _normalised(_mean([result.key_weights(k) for k in floats]).to(torch.float64))
    return out


def weights_for_stat_point(result: GateResult, stat_points: dict[str, str], point: str) -> torch.Tensor:
    if point not in stat_points:
        raise KeyError(f"{point!r} is not a stat point; known: {list(stat_points)}")
    return stat_point_weights(result, stat_points)[point]


def gate_table(
    result: GateResult,
    part_names: Sequence[str] | None = None,
    model_names: Sequence[str] | None = None,
) -> list[dict]:
    """One row per (part, model) for reports: gates of the gated parts, rule weights of the others.

    Channel parts are summarised over channels: mean log_alpha, mean P(z != 0), mean test-time
    gate, mean weight, and the fraction of channels where the model keeps a non-zero weight.
    Ungated layers appear with ``gated: False`` and their rule weight.
    """
    plan = result.plan
    n = plan.num_models
    names = list(model_names) if model_names is not None else [f"model{k}" for k in range(n)]
    if len(names) != n:
        raise ValueError(f"gate_table: {len(names)} model names for {n} models")
    ungated_layers = [l for l, ks in plan.layer_parts.items() if any(k in plan.ungated for k in ks)]
    known = list(plan.parts) + [l for l in ungated_layers if l not in plan.parts]
    wanted = list(part_names) if part_names is not None else known
    unknown = [p for p in wanted if p not in known]
    if unknown:
        raise ValueError(f"gate_table: unknown parts {unknown}; known: {known}")
    hc = result.concrete
    rows = []
    for part in wanted:
        if part in plan.parts:
            la = result.log_alpha[part].reshape(-1, n).to(torch.float64)
            w = result.weights[part].reshape(-1, n)
            stats = {
                "log_alpha": la.mean(0),
                "p_active": hc.prob_nonzero(la).mean(0),
                "z_hat": hc.deterministic(la).mean(0),
                "weight": w.mean(0),
                "open_fraction": (w > 0).to(torch.float64).mean(0),
            }
            for k in range(n):
                rows.append({"part": part, "model": names[k], "gated": True, **{s: float(v[k]) for s, v in stats.items()}})
        else:
            for k in range(n):
                wk = float(plan.ungated_weights[k])
                rows.append({"part": part, "model": names[k], "gated": False, "log_alpha": None, "p_active": None,
                             "z_hat": None, "weight": wk, "open_fraction": float(wk > 0)})
    return rows

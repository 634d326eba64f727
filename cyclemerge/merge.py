"""Weighted averaging of state dicts that already share one basis (the universe)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cyclemerge.permutation import StateDict


def average(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None) -> StateDict:
    """Convex combination of N state dicts; integer buffers (BatchNorm's counter) come from the first.

    Averaging is done in float64 and cast back, so the mean of N identical models is bit-identical
    to that model.
    """
    if not state_dicts:
        raise ValueError("average: need at least one state dict")
    n = len(state_dicts)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.numel() != n:
        raise ValueError(f"average: {n} state dicts but {w.numel()} weights")
    w = w / w.sum()
    out: StateDict = {}
    for key, first in state_dicts[0].items():
        if not torch.is_floating_point(first):
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for wk, sd in zip(w.tolist(), state_dicts):
            acc += wk * sd[key].to(torch.float64)
        out[key] = acc.to(first.dtype)
    return out


def to_universe_all(state_dicts: Sequence[StateDict], spec, perms: Sequence) -> list[StateDict]:
    """Every model mapped into the universe by its own permutations."""
    from cyclemerge.permutation import apply_perms

    return [apply_perms(sd, spec, p) for sd, p in zip(state_dicts, perms)]


def merge_and_repair(model, universe_sds: Sequence[StateDict], *, method: str, x: torch.Tensor, batch_size: int,
                     endpoint_stats: Sequence | None = None, perms: Sequence | None = None,
                     weights=None, merged: StateDict | None = None) -> tuple[StateDict, StateDict]:
    """(merged, repaired): the (given or uniform) merge of universe models and its REPAIR/BN reset.

    ``endpoint_stats`` are each model's statistics in its OWN basis; they are carried into the
    universe with ``perms`` here, because goal statistics of unaligned endpoints would be wrong.
    """
    from cyclemerge.activations import permute_stats
    from cyclemerge.repair import apply_repair

    merged = average(universe_sds) if merged is None else merged
    aligned_stats = None
    if method == "repair":
        if endpoint_stats is None or perms is None:
            raise ValueError("REPAIR needs the endpoints' activation statistics and their permutations")
        points = model.stat_points()
        aligned_stats = [permute_stats(s, p, points) for s, p in zip(endpoint_stats, perms)]
    repaired = apply_repair(method, model, merged, x, batch_size=batch_size, endpoint_stats=aligned_stats,
                            weights=weights)
    return merged, repaired


def baseline_merges(model, state_dicts: Sequence[StateDict], *, methods: Sequence[str], align_config, repair_method: str,
                    x: torch.Tensor, batch_size: int, endpoint_stats: Sequence | None = None) -> dict[str, dict]:
    """For each alignment method: its uniform merge in the universe, before and after repair.

    Returns ``{method: {"perms", "merged", "repaired", "seconds", "objective"}}``; ``repaired`` is None
    when ``repair_method`` is ``none``.
    """
    import time

    from cyclemerge import matching

    spec = model.perm_spec()
    out: dict[str, dict] = {}
    for method in methods:
        start = time.perf_counter()
        result = matching.match(state_dicts=list(state_dicts), spec=spec,
                                config=align_config.model_copy(update={"method": method, "restarts": 1}))
        seconds = time.perf_counter() - start
        universe = to_universe_all(state_dicts, spec, result.perms)
        merged, repaired = merge_and_repair(model, universe, method=repair_method, x=x, batch_size=batch_size,
                                            endpoint_stats=endpoint_stats, perms=result.perms)
        out[method] = {"perms": result.perms, "merged": merged, "repaired": None if repair_method == "none" else repaired,
                       "seconds": seconds, "objective": matching.objective(list(state_dicts), spec, result.perms),
                       "result": result}
    return out

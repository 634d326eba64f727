"""Git Re-Basin weight matching of one model to another, and the pairwise-to-reference method.

``match_pair`` is block-coordinate ascent of sum over tensors <W_target, W_source mapped>: visit the
groups in a random order, solve each one's LAP with every other group held fixed, and sweep until
a whole sweep gains nothing. Pairwise-to-reference matches every model to model ``reference`` this
way; it is not cycle-consistent, so its pair-by-pair maps are kept for the cycle-error metric.
"""

from __future__ import annotations

import itertools
import time

import torch

from cyclemerge.config import AlignConfig
from cyclemerge.matching.base import (
    Correlations,
    MatchResult,
    ProgressFn,
    ScoreFn,
    Start,
    check_correlations,
    check_models,
    lap_maximize,
    select_start,
    work_dtype,
)
from cyclemerge.matching.metrics import activation_objective, maps_from_pairs, objective
from cyclemerge.permutation import PermSpec, Perms, StateDict, group_sizes

REFERENCE_URL = "https://arxiv.org/abs/2209.04836"


def _axes_by_group(spec: PermSpec, state_dict: StateDict) -> dict[str, list[tuple[str, int]]]:
    """group -> every (key, axis) tied to it, over floating tensors."""
    out: dict[str, list[tuple[str, int]]] = {}
    for key, axes in spec.items():
        if not torch.is_floating_point(state_dict[key]):
            continue
        for axis, g in enumerate(axes):
            if g is not None:
                out.setdefault(g, []).append((key, axis))
    return out


def _unfold(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def match_pair(
    target_sd: StateDict,
    source_sd: StateDict,
    spec: PermSpec,
    *,
    seed: int,
    max_iter: int,
    init: Perms | None = None,
) -> Perms:
    """Perms that map ``source_sd`` into ``target_sd``'s basis (``apply_perms(source_sd, spec, perms)``).

    Starts from the identity (or ``init``); each sweep visits the groups in an order drawn from
    ``seed``; stops after a sweep in which no group's LAP gained more than 1e-12, or ``max_iter`` sweeps.
    """
    sizes = group_sizes(spec, target_sd)
    ties = _axes_by_group(spec, target_sd)
    # float32 products unless the models are float64; gains are compared on one cost matrix, so
    # rounding cannot make a sweep look better than it is.
    dtype = work_dtype([target_sd, source_sd])
    target = {k: t.detach().to(dtype) for k, t in target_sd.items() if torch.is_floating_point(t)}
    source = {k: t.detach().to(dtype) for k, t in source_sd.items() if torch.is_floating_point(t)}
    perms = {g: (init[g].clone() if init is not None else torch.arange(n)) for g, n in sizes.items()}
    groups = list(sizes)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        progress = False
        for gi in torch.randperm(len(groups), generator=gen).tolist():
            g = groups[gi]
            n = sizes[g]
            cost = torch.zeros(n, n, dtype=dtype)
            for key, axis in ties.get(g, []):
                w = source[key]
                for other, h in enumerate(spec[key]):
                    if h is not None and other != axis:
                        w = w.index_select(other, perms[h])
                cost += _unfold(target[key], axis) @ _unfold(w, axis).T
            new = lap_maximize(cost)
            rows = torch.arange(n)
            gain = (cost[rows, new].double().sum() - cost[rows, perms[g]].double().sum()).item()
            progress = progress or gain > 1e-12
            perms[g] = new
        if not progress:
            break
    return perms


def match_pair_activations(correlations: dict[str, torch.Tensor]) -> Perms:
    """One LAP per group on C[i, j] = correlation of target unit i with source unit j."""
    return {g: lap_maximize(c) for g, c in correlations.items()}


def match(
    *,
    state_dicts: list[StateDict],
    spec: PermSpec,
    config: AlignConfig,
    correlations: Correlations | None = None,
    progress: ProgressFn | None = None,
    score: ScoreFn | None = None,
) -> MatchResult:
    """Pairwise-to-reference: model ``config.reference`` keeps its basis, every other model is matched to it.

    Restarts use seeds seed, seed+1, ... for the random group order. ``report.extra['pairwise_maps']``
    holds the map of every pair computed pair by pair, as a Git Re-Basin user gets them: each model
    matched to the reference, and for pairs without the reference the later model matched to the
    earlier one; the opposite direction is the inverse.
    """
    t0 = time.perf_counter()
    sizes = check_models(state_dicts, spec)
    n_models, ref = len(state_dicts), config.reference
    if ref >= n_models:
        raise ValueError(f"align.reference is {ref} but there are only {n_models} models (0-based index)")
    corr = check_correlations(correlations, sizes, n_models) if config.cost == "activations" else None

    def pair(a: int, b: int, seed: int) -> Perms:
        if corr is not None:
            return match_pair_activations({g: c[a, b] for g, c in corr.items()})
        return match_pair(state_dicts[a], state_dicts[b], spec, seed=seed, max_iter=config.max_iter)

    def final_objective(perms: list[Perms]) -> float:
        return activation_objective(corr, perms) if corr is not None else objective(state_dicts, spec, perms)

    def pair_objective(a: int, b: int, pa: Perms, pb: Perms) -> float:
        if corr is not None:
            return activation_objective({g: c[[a, b]][:, [a, b]] for g, c in corr.items()}, [pa, pb])
        return objective([state_dicts[a], state_dicts[b]], spec, [pa, pb])

    def run_one(k: int) -> Start:
        t_start, seed = time.perf_counter(), config.seed + k
        computed: dict[tuple[int, int], Perms] = {}
        for step, (a, b) in enumerate(itertools.combinations(range(n_models), 2), start=1):
            a, b = (b, a) if b == ref else (a, b)  # the reference is always the target
            computed[(a, b)] = pair(a, b, seed)
            if progress is not None:
                identity = {g: torch.arange(n) for g, n in sizes.items()}
                progress(step, pair_objective(a, b, identity, computed[(a, b)]))
        maps = maps_from_pairs(computed, n_models)
        perms = [{g: torch.arange(n) for g, n in sizes.items()} if i == ref else maps[(ref, i)] for i in range(n_models)]
        value = final_objective(perms)
        return Start(
            name="seed", seed=seed, perms=perms, objective=value, history=[value], iterations=1,
            seconds=time.perf_counter() - t_start, extra={"pairwise_maps": maps},
        )

    with torch.no_grad():
        result = select_start(run_one, config=config, method="pairwise", score=score, t0=t0)
    result.report.extra.update(cost=config.cost, reference=ref)
    return result

"""Git Re-Basin's MergeMany: match each model to the mean of the others, round after round.

Every model has one set of permutations into a shared basis (so its maps are cycle-consistent by
construction, like C2M3's), found by block-coordinate ascent over models instead of a joint
relaxation. A round visits the models in a random order; each is weight-matched (from the identity,
as Git Re-Basin does) to the mean of the other models as currently permuted. The new permutations
are kept only if they bring the model closer to that mean, which makes every round monotone and
the loop finite; it stops after a round in which no model's permutations changed, or ``max_iter`` rounds.
"""

from __future__ import annotations

import time

import torch

from cyclemerge.averaging import average
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
)
from cyclemerge.matching.metrics import activation_objective, objective
from cyclemerge.matching.weight_matching import match_pair
from cyclemerge.permutation import PermSpec, Perms, StateDict, apply_perms

REFERENCE_URL = "https://arxiv.org/abs/2209.04836"


def _inner(a: StateDict, b: StateDict, keys: list[str]) -> float:
    return sum(torch.dot(a[k].double().flatten(), b[k].double().flatten()).item() for k in keys)


def _match_to_others_by_activations(corr: Correlations, perms: list[Perms], i: int) -> tuple[Perms, float, float]:
    """LAP of model i's units against the universe units of the others; returns (perms, old, new) values."""
    new: Perms = {}
    old_value = new_value = 0.0
    for g, c in corr.items():
        cost = sum(c[j, i][perms[j][g]] for j in range(len(perms)) if j != i)
        new[g] = lap_maximize(cost)
        rows = torch.arange(cost.shape[0])
        old_value += cost[rows, perms[i][g]].sum().item()
        new_value += cost[rows, new[g]].sum().item()
    return new, old_value, new_value


def match(
    *,
    state_dicts: list[StateDict],
    spec: PermSpec,
    config: AlignConfig,
    correlations: Correlations | None = None,
    progress: ProgressFn | None = None,
    score: ScoreFn | None = None,
) -> MatchResult:
    """MergeMany; restarts use seeds seed, seed+1, ... for the model and group visiting orders."""
    t0 = time.perf_counter()
    sizes = check_models(state_dicts, spec)
    n_models = len(state_dicts)
    corr = check_correlations(correlations, sizes, n_models) if config.cost == "activations" else None
    keys = [k for k in spec if torch.is_floating_point(state_dicts[0][k])]
    spec_sds = [{k: sd[k].detach() for k in spec} for sd in state_dicts]

    def total(perms: list[Perms]) -> float:
        return activation_objective(corr, perms) if corr is not None else objective(spec_sds, spec, perms)

    def run_one(k: int) -> Start:
        t_start, seed = time.perf_counter(), config.seed + k
        gen = torch.Generator().manual_seed(seed)
        perms = [{g: torch.arange(n) for g, n in sizes.items()} for _ in range(n_models)]
        universe = list(spec_sds)
        history = [total(perms)]
        rounds = 0
        while rounds < config.max_iter and n_models > 1:
            rounds += 1
            changed = False
            for i in torch.randperm(n_models, generator=gen).tolist():
                inner_seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
                if corr is not None:
                    new, old_value, new_value = _match_to_others_by_activations(corr, perms, i)
                else:
                    target = average([u for j, u in enumerate(universe) if j != i])
                    # Warm start from the model's current map, as Git Re-Basin matches the already permuted
                    # model: coordinate descent then only moves it when that gains, so rounds converge.
                    new = match_pair(target, spec_sds[i], spec, seed=inner_seed, max_iter=config.max_iter,
                                     init=perms[i])
                    moved = apply_perms(spec_sds[i], spec, new)
                    old_value, new_value = _inner(target, universe[i], keys), _inner(target, moved, keys)
                # align.tol (relative), as for C2M3: gains below it are rounding-level reshuffles of
                # near-tied units that would keep the rounds going without moving the merge.
                if new_value > old_value + config.tol * max(1.0, abs(old_value)):
                    perms[i] = new
                    changed = True
                    if corr is None:
                        universe[i] = moved
            history.append(total(perms))
            if progress is not None:
                progress(rounds, history[-1])
            if not changed:
                break
        return Start(
            name="seed", seed=seed, perms=perms, objective=history[-1], history=history, iterations=rounds,
            seconds=time.perf_counter() - t_start,
        )

    with torch.no_grad():
        result = select_start(run_one, config=config, method="merge_many", score=score, t0=t0)
    result.report.extra.update(cost=config.cost)
    return result

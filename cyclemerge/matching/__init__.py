"""Alignment of N models into one universe: one module per method behind one keyword-only interface.

    result = matching.match(state_dicts=sds, spec=model.perm_spec(), config=cfg.align)
    universe_sds = [apply_perms(sd, spec, p) for sd, p in zip(sds, result.perms)]

Methods (``align.method``): ``c2m3`` (Frank-Wolfe, cycle-consistent, default), ``merge_many`` and
``pairwise`` (Git Re-Basin baselines), ``naive`` (no alignment).
"""

from __future__ import annotations

from cyclemerge.config import MATCHERS, AlignConfig
from cyclemerge.matching import c2m3, merge_many, naive, weight_matching
from cyclemerge.matching.base import (
    Correlations,
    MatchFn,
    MatchReport,
    MatchResult,
    ProgressFn,
    ScoreFn,
    lap_maximize,
)
from cyclemerge.matching.metrics import (
    activation_objective,
    cosine_similarity,
    cycle_error,
    cycle_error_by_group,
    objective,
    pairwise_maps,
)
from cyclemerge.matching.weight_matching import match_pair, match_pair_activations
from cyclemerge.permutation import PermSpec, StateDict

__all__ = [
    "METHODS",
    "Correlations",
    "MatchFn",
    "MatchReport",
    "MatchResult",
    "ProgressFn",
    "ScoreFn",
    "activation_objective",
    "cosine_similarity",
    "cycle_error",
    "cycle_error_by_group",
    "get",
    "lap_maximize",
    "match",
    "match_pair",
    "match_pair_activations",
    "objective",
    "pairwise_maps",
]

METHODS: dict[str, MatchFn] = {
    "c2m3": c2m3.match,
    "merge_many": merge_many.match,
    "pairwise": weight_matching.match,
    "naive": naive.match,
}
assert set(METHODS) == set(MATCHERS), "matching registry and config.MATCHERS disagree"


def get(name: str) -> MatchFn:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown alignment method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def match(
    *,
    state_dicts: list[StateDict],
    spec: PermSpec,
    config: AlignConfig,
    correlations: Correlations | None = None,
    progress: ProgressFn | None = None,
    score: ScoreFn | None = None,
) -> MatchResult:
    """Run the method named by ``config.method``."""
    return get(config.method)(
        state_dicts=state_dicts, spec=spec, config=config, correlations=correlations, progress=progress, score=score
    )

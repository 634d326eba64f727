"""No alignment: every model keeps its own basis, so merging averages raw weights (the naive baseline)."""

from __future__ import annotations

import time

import torch

from cyclemerge.config import AlignConfig
from cyclemerge.matching.base import Correlations, MatchReport, MatchResult, ProgressFn, ScoreFn, check_models
from cyclemerge.matching.metrics import objective
from cyclemerge.permutation import PermSpec, StateDict


def match(
    *,
    state_dicts: list[StateDict],
    spec: PermSpec,
    config: AlignConfig,
    correlations: Correlations | None = None,
    progress: ProgressFn | None = None,
    score: ScoreFn | None = None,
) -> MatchResult:
    """Identity permutations for every model; the report carries the weight objective of that choice."""
    t0 = time.perf_counter()
    sizes = check_models(state_dicts, spec)
    perms = [{g: torch.arange(n) for g, n in sizes.items()} for _ in state_dicts]
    value = objective(state_dicts, spec, perms)
    if progress is not None:
        progress(1, value)
    report = MatchReport(
        method="naive", objective_history=[value], iterations=0, seconds=time.perf_counter() - t0,
        extra={"objective": value, "cost": "weights"},
    )
    return MatchResult(perms=perms, report=report)

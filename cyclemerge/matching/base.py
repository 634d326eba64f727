"""What every matcher shares: its result types, input checks, the LAP, and restart selection.

A matcher takes N state dicts of one architecture and returns, per model, one index vector per
permutation group that maps the model INTO a shared basis, the *universe* (the convention of
:mod:`cyclemerge.permutation`): the universe copy of model ``i`` is
``apply_perms(state_dicts[i], spec, result.perms[i])``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from cyclemerge.config import AlignConfig
from cyclemerge.permutation import PermSpec, Perms, StateDict, check_spec, group_sizes

ProgressFn = Callable[[int, float], None]
"""Called once per iteration (FW step, weight-matching round or pair) with (step, objective)."""

ScoreFn = Callable[[list[Perms]], float]
"""Scores a candidate solution, lower is better (e.g. the merged model's calibration loss)."""

Correlations = dict[str, torch.Tensor]
"""group -> [N, N, n, n]; ``C[a, b, i, j]`` = correlation of unit i of model a with unit j of model b."""

_SKIP = object()  # marks values MatchReport.summary() leaves out


@dataclass
class MatchReport:
    method: str
    objective_history: list[float] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view: scalars, strings and lists of them; tensors (pairwise maps) are left out."""

        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                items = {str(k): plain(v) for k, v in value.items()}
                return {k: v for k, v in items.items() if v is not _SKIP}
            if isinstance(value, (list, tuple)):
                return [v for v in (plain(x) for x in value) if v is not _SKIP]
            if isinstance(value, (torch.Tensor, np.ndarray)):
                return _SKIP
            return value

        extra = plain({k: v for k, v in self.extra.items() if k != "pairwise_maps"})
        return {
            "method": self.method,
            "iterations": self.iterations,
            "seconds": self.seconds,
            "objective_history": list(self.objective_history),
            "extra": extra,
        }


@dataclass
class MatchResult:
    perms: list[Perms]
    report: MatchReport


class MatchFn(Protocol):
    def __call__(
        self,
        *,
        state_dicts: list[StateDict],
        spec: PermSpec,
        config: AlignConfig,
        correlations: Correlations | None = None,
        progress: ProgressFn | None = None,
        score: ScoreFn | None = None,
    ) -> MatchResult: ...


def check_models(state_dicts: Sequence[StateDict], spec: PermSpec) -> dict[str, int]:
    """All models fit the spec and share shapes; returns the group sizes."""
    if not state_dicts:
        raise ValueError("matching needs at least one state dict")
    for i, sd in enumerate(state_dicts):
        try:
            check_spec(spec, sd)
        except ValueError as e:
            raise ValueError(f"model {i}: {e}") from None
        for key, tensor in sd.items():
            ref = state_dicts[0][key]
            if tensor.shape != ref.shape:
                raise ValueError(f"model {i}: {key} has shape {tuple(tensor.shape)}, model 0 has {tuple(ref.shape)}")
    return group_sizes(spec, state_dicts[0])


def check_correlations(correlations: Correlations | None, sizes: dict[str, int], n_models: int) -> Correlations:
    """Correlations for activation matching: every group present, shaped [N, N, n, n], symmetrized.

    Symmetrizing (C_ab := (C_ab + C_ba^T) / 2) makes the pair objective independent of which model
    of a pair comes first, which the closed-form gradients rely on.
    """
    if not correlations:
        raise ValueError(
            "align.cost is 'activations' but no correlation matrices were given; "
            "compute them in the activations stage (activations.correlations: true) or use align.cost: weights"
        )
    missing = sorted(set(sizes) - set(correlations))
    if missing:
        raise ValueError(f"activation matching: no correlations for groups {missing} (have {sorted(correlations)})")
    out: Correlations = {}
    for g, n in sizes.items():
        c = correlations[g]
        if tuple(c.shape) != (n_models, n_models, n, n):
            raise ValueError(f"correlations[{g!r}] has shape {tuple(c.shape)}, expected {(n_models, n_models, n, n)}")
        c = c.detach().to(torch.float64)
        if not torch.isfinite(c).all():
            raise ValueError(f"correlations[{g!r}] contains NaN or inf (a dead unit has zero variance?)")
        out[g] = 0.5 * (c + c.transpose(0, 1).transpose(2, 3))
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("align.device is 'cuda' but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(name)


def work_dtype(state_dicts: Sequence[StateDict]) -> torch.dtype:
    """float32 unless the models are float64 (tests use float64 to check exact identities)."""
    dtypes = {t.dtype for sd in state_dicts for t in sd.values() if torch.is_floating_point(t)}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def lap_maximize(score: torch.Tensor) -> torch.Tensor:
    """The permutation ``p`` maximizing ``sum_j score[j, p[j]]`` (our index convention), solved on CPU."""
    s = score.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(s).all():
        raise FloatingPointError("linear assignment on a matrix with NaN or inf (diverged weights?)")
    rows, cols = linear_sum_assignment(s, maximize=True)
    if not np.array_equal(rows, np.arange(len(rows))):
        raise RuntimeError("linear_sum_assignment returned unsorted rows")
    return torch.from_numpy(cols).long()


@dataclass
class Start:
    """One run of a matcher from one starting point (an init or a seed)."""

    name: str
    seed: int | None
    perms: list[Perms]
    objective: float
    history: list[float]
    iterations: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    score: float | None = None


def select_start(
    run_one: Callable[[int], Start],
    *,
    config: AlignConfig,
    method: str,
    score: ScoreFn | None,
    t0: float,
) -> MatchResult:
    """Run ``config.restarts`` starts (``run_one(k)`` for k = 0..R-1) and keep the best one.

    ``select_by: objective`` keeps the highest final (rounded) objective; ``calibration_loss`` calls
    ``score`` on each start's permutations and keeps the lowest. Every start is recorded.
    """
    if config.select_by == "calibration_loss" and config.restarts > 1 and score is None:
        raise ValueError("align.select_by is 'calibration_loss' but no score function was passed to match()")
    starts: list[Start] = []
    for k in range(config.restarts):
        start = run_one(k)
        if config.select_by == "calibration_loss" and score is not None and config.restarts > 1:
            start.score = float(score(start.perms))
        starts.append(start)
    if config.select_by == "calibration_loss" and config.restarts > 1:
        best = min(range(len(starts)), key=lambda k: (starts[k].score, k))
    else:
        best = max(range(len(starts)), key=lambda k: (starts[k].objective, -k))
    chosen = starts[best]
    extra = dict(chosen.extra)
    extra["objective"] = chosen.objective
    extra["starts"] = [
        {
            "start": s.name,
            "seed": s.seed,
            "objective": s.objective,
            "score": s.score,
            "iterations": s.iterations,
            "seconds": s.seconds,
        }
        for s in starts
    ]
    extra["selected_start"] = best
    report = MatchReport(
        method=method,
        objective_history=chosen.history,
        iterations=chosen.iterations,
        seconds=time.perf_counter() - t0,
        extra=extra,
    )
    return MatchResult(perms=chosen.perms, report=report)

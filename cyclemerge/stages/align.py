"""Align stage: screen the models, map the clean ones into one universe with the configured method, and
let the flagged ones in switched off (``align.outlier_action: gate_off``) or leave them out (``drop``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cyclemerge import matching
from cyclemerge.activations import Stats
from cyclemerge.config import Config
from cyclemerge.evaluate import accuracy_and_loss, load_into
from cyclemerge.permutation import StateDict
from cyclemerge.prefilter import ScreenReport, screen_models
from cyclemerge.results import Alignment
from cyclemerge.spec import DerivedSpec
from cyclemerge.stages.repair import merge_and_repair
from cyclemerge.universe import alignment_objective, map_into_universe, match_models, spec_of, to_universe_all

log = logging.getLogger("cyclemerge.align")


class TooFewModelsError(ValueError):
    """Fewer than two models are left to merge after the pre-filter."""


@dataclass
class Screen:
    """The pre-filter's verdict: which models are aligned, which enter switched off, which are dropped."""

    report: ScreenReport
    aligned: tuple[int, ...]
    gate_off: tuple[int, ...]
    dropped: tuple[int, ...]

    @property
    def kept(self) -> list[int]:
        """The models in the universe, in universe order."""
        return list(self.aligned) + list(self.gate_off)

    def fate(self, i: int) -> str:
        return "dropped" if i in self.dropped else "enters gating switched off"


def screen(state_dicts: Sequence[StateDict], config: Config, *, quiet: bool = False) -> Screen:
    """Flag outliers (non-finite weights, norms ``align.outlier_norm_ratio`` from the median); at least
    two must pass. Each flagged model is logged as a warning unless ``quiet``."""
    report = screen_models(list(state_dicts), config.align.outlier_norm_ratio)
    aligned, gate_off, dropped = report.partition(config.align.outlier_action)
    result = Screen(report, aligned, gate_off, dropped)
    for i, reasons in ({} if quiet else report.reasons).items():
        log.warning("model %d flagged by the pre-filter (%s): %s", i, result.fate(i), "; ".join(reasons[:3]))
    if len(aligned) < 2:
        raise TooFewModelsError(f"only {len(aligned)} model(s) passed the pre-filter (flagged: {report.reasons}); "
                                "merging needs at least 2 — check the checkpoints or raise align.outlier_norm_ratio")
    return result


def calibration_scorer(model: nn.Module, state_dicts: Sequence[StateDict], stats: Sequence[dict[str, Stats]],
                       spec: DerivedSpec, x: torch.Tensor, y: torch.Tensor, config: Config,
                       validation: tuple[torch.Tensor, torch.Tensor] | None = None) -> Callable:
    """Score for ``align.select_by: calibration_loss``: CE of the merged (and repaired) model.

    REPAIR always measures on the calibration slice ``x``; the loss is judged on ``validation`` when
    the data has that split, because a start chosen by the same images REPAIR fitted is chosen by
    data that flatters it.
    """
    vx, vy = validation if validation is not None else (x, y)

    def score(perms) -> float:
        _, repaired = merge_and_repair(model, to_universe_all(state_dicts, spec, perms), method=config.repair.method,
                                       x=x, batch_size=config.repair.batch_size, endpoint_stats=stats, perms=perms)
        return accuracy_and_loss(load_into(model, repaired), vx, vy, batch_size=config.repair.batch_size)["loss"]

    return score


def needs_endpoint_stats(config: Config) -> bool:
    """Whether :func:`align` needs the endpoints' activation statistics (to score restarts after REPAIR)."""
    return config.align.select_by == "calibration_loss" and config.align.restarts > 1


def align(state_dicts: Sequence[StateDict], model: nn.Module, config: Config, *,
          correlations: dict[str, torch.Tensor] | None = None,
          endpoint_stats: Sequence[dict[str, Stats]] | None = None,
          calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
          validation: tuple[torch.Tensor, torch.Tensor] | None = None,
          progress: Callable[[int, float], None] | None = None) -> Alignment:
    """Map ``state_dicts`` (one architecture, that of ``model``) into one universe with ``config.align``.

    ``correlations`` (every input model's, ``align.cost: activations``) and, for restarts selected by
    calibration loss, ``endpoint_stats`` (every input model's) and ``calibration`` (``x, y``, at least
    ``repair.num_samples`` of them) are needed only by those settings; ``validation`` (``x, y``), when
    given, is where restarts are scored instead of the calibration slice.
    """
    sds = list(state_dicts)
    spec = spec_of(model)  # matched on its views, mapped with its blocks: cyclemerge.universe
    verdict = screen(sds, config)
    aligned = list(verdict.aligned)
    clean = [sds[i] for i in aligned]

    selected = None
    if config.align.cost == "activations":
        if correlations is None:
            raise ValueError("align.cost=activations needs the models' correlations (activations.correlations: true)")
        sel = torch.tensor(aligned)
        selected = {g: c[sel][:, sel] for g, c in correlations.items()}

    score = None
    if needs_endpoint_stats(config):
        if endpoint_stats is None or calibration is None:
            raise ValueError("align.select_by=calibration_loss needs endpoint_stats and calibration data")
        x, y = (t[:config.repair.num_samples] for t in calibration)
        # a copy to load candidates into: the caller's model keeps its weights
        score = calibration_scorer(copy.deepcopy(model), clean,
                                   [endpoint_stats[i] for i in aligned], spec, x, y, config, validation)

    result = match_models(state_dicts=clean, spec=spec, config=config.align, correlations=selected,
                          progress=progress, score=score)
    universe = to_universe_all(clean, spec, result.perms)
    perms = list(result.perms)
    for j in verdict.gate_off:
        mapped, p = map_into_universe(sds[j], universe, spec, seed=config.align.seed)
        universe.append(mapped)
        perms.append(p)
    n = len(aligned)
    return Alignment(
        method=config.align.method, indices=verdict.kept, gate_off=list(verdict.gate_off),
        dropped=list(verdict.dropped), perms=perms, universe=universe, report=result.report.summary(),
        objective=alignment_objective(clean, spec, result.perms),
        cycle_error=matching.cycle_error(matching.pairwise_maps(result), n),
        cosine_before=matching.cosine_similarity(clean), cosine_after=matching.cosine_similarity(universe[:n]),
        prefilter=dict(verdict.report.reasons))

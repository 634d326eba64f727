"""Repair stage: REPAIR (gate-weighted goal statistics) or BatchNorm reset of a merge, folded into the weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cyclemerge.activations import Stats, permute_stats
from cyclemerge.averaging import average
from cyclemerge.config import Config
from cyclemerge.evaluate import accuracy_and_loss, load_into
from cyclemerge.permutation import StateDict
from cyclemerge.repair import apply_repair
from cyclemerge.results import Alignment, Gates, Merged


def merge_and_repair(model, universe_sds: Sequence[StateDict], *, method: str, x: torch.Tensor, batch_size: int,
                     endpoint_stats: Sequence | None = None, perms: Sequence | None = None,
                     weights=None, merged: StateDict | None = None) -> tuple[StateDict, StateDict]:
    """(merged, repaired): the (given or uniform) merge of universe models and its REPAIR/BN reset.

    ``endpoint_stats`` are each model's statistics in its OWN basis; they are carried into the
    universe with ``perms`` here, because goal statistics of unaligned endpoints would be wrong.
    """
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


def repair(model: nn.Module, alignment: Alignment, gates: Gates, calibration: tuple[torch.Tensor, torch.Tensor],
           config: Config, *, endpoint_stats: Sequence[dict[str, Stats]] | None = None) -> Merged:
    """The gates' merge repaired with ``config.repair`` on the first ``repair.num_samples`` of ``calibration``.

    ``endpoint_stats`` (every input model's, in its own basis) are needed for ``repair.method: repair``;
    the goal statistics are weighted per stat point by the final gates.
    """
    x, y = (t[:config.repair.num_samples] for t in calibration)
    stats = [endpoint_stats[i] for i in alignment.indices] if config.repair.method == "repair" else None
    merged, repaired = merge_and_repair(model, alignment.universe, method=config.repair.method, x=x,
                                        batch_size=config.repair.batch_size, endpoint_stats=stats,
                                        perms=alignment.perms, weights=gates.point_weights, merged=gates.merged)
    before = accuracy_and_loss(load_into(model, merged), x, y, batch_size=config.repair.batch_size)
    after = accuracy_and_loss(load_into(model, repaired), x, y, batch_size=config.repair.batch_size)
    return Merged(state_dict=repaired, before_repair=merged, method=config.repair.method, calibration_before=before,
                  calibration_after=after, num_samples=len(x))

"""Gates stage: hard-concrete L0 gates over an alignment's universe models, frozen, learned on the
calibration slice (or their uniform stand-in when ``gates.enabled`` is false)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cyclemerge.config import Config
from cyclemerge.gates import learning, report
from cyclemerge.results import Alignment, Gates


def learn_gates(model: nn.Module, alignment: Alignment, calibration: tuple[torch.Tensor, torch.Tensor],
                config: Config, *, progress: Callable[[int, dict], None] | None = None,
                model_names: Sequence[str] | None = None) -> Gates:
    """Gates over ``alignment.universe`` on the first ``data.calibration_size`` of ``calibration`` (x, y).

    Models the pre-filter let in switched off start closed (``gates.init_off``). ``model_names`` name
    the universe models in the gate table (default ``model <index>``).
    """
    x, y = (t[:config.data.calibration_size] for t in calibration)
    off = [k for k, i in enumerate(alignment.indices) if i in alignment.gate_off]
    result = learning.learn_gates(model, alignment.universe, x, y, config.gates, initial_off=off, progress=progress)
    names = list(model_names) if model_names is not None else [f"model {i}" for i in alignment.indices]
    return Gates(indices=list(alignment.indices), merged=result.merged,
                 point_weights=report.stat_point_weights(result, model.stat_points()),
                 layer_weights=report.layer_weights(result), table=report.gate_table(result, model_names=names),
                 result=result.as_dict(), enabled=config.gates.enabled)

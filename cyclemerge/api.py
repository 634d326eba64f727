"""The public API of cyclemerge: the pipeline's stages as plain functions, and ``merge`` for the common case.

    import cyclemerge
    result = cyclemerge.merge(models, calibration=(x, y))          # nn.Modules or state dicts
    result.model, result.report                                      # merged nn.Module, what happened

Each stage function is a pure step over explicit inputs with a typed result; the pipeline's tasks,
the grid and the benchmarks call exactly these (from the stage modules that define them, so that a
stage's code dependencies stay its own). Defaults are the pipeline's: ``Config()``, the values
of ``params.yaml``.

| stage | function | result |
|---|---|---|
| train | ``train_model(config, data, seed)``, ``import_models(paths, config, data)`` | ``TrainedModel`` |
| activations | ``activation_stats(model, state_dict, x, config)``, ``correlations(models, x, config)`` | stats |
| align | ``align(state_dicts, model, config, ...)`` | ``Alignment`` |
| baselines | ``baselines(state_dicts, model, config, ...)`` | ``Baselines`` |
| gates | ``learn_gates(model, alignment, (x, y), config)`` | ``Gates`` |
| repair | ``repair(model, alignment, gates, (x, y), config, ...)`` | ``Merged`` |
| evaluate | ``evaluate(model, state_dicts, seeds, alignment, gates, final, baselines, data, config)`` | ``EvaluationReport`` |
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cyclemerge.config import Config, load_config
from cyclemerge.data import DataBundle, load_data
from cyclemerge.evaluate import accuracy_and_loss, load_into
from cyclemerge.models import build_model
from cyclemerge.permutation import StateDict
from cyclemerge.results import Alignment, Baseline, Baselines, Gates, Merged
from cyclemerge.stages.activations import activation_stats, calibration_slice, correlations
from cyclemerge.stages.align import TooFewModelsError, align, needs_endpoint_stats
from cyclemerge.stages.baselines import baselines
from cyclemerge.stages.evaluate import EvaluationReport, evaluate
from cyclemerge.stages.gates import learn_gates
from cyclemerge.stages.repair import merge_and_repair, repair
from cyclemerge.stages.train import TrainedModel, import_models, train_model, train_models

__all__ = [
    "Alignment", "Baseline", "Baselines", "Config", "DataBundle", "EvaluationReport", "Gates", "Merged",
    "MergeResult", "TooFewModelsError", "TrainedModel", "activation_stats", "align", "baselines", "build_model",
    "calibration_slice", "correlations", "evaluate", "import_models", "learn_gates", "load_config", "load_data",
    "load_into", "merge", "merge_and_repair", "repair", "train_model", "train_models",
]


@dataclass
class MergeResult:
    """The merged ``model`` (eval mode) with the alignment, gates and repair that made it, and seconds per step."""

    model: nn.Module
    alignment: Alignment
    gates: Gates
    merged: Merged
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def state_dict(self) -> StateDict:
        return self.merged.state_dict

    @property
    def report(self) -> dict[str, Any]:
        """What happened, JSON-ready: alignment objective and cycle error, the models kept, the gates'
        share of each layer per model, calibration scores before and after repair, seconds per step."""
        a, g = self.alignment, self.gates
        return {"method": a.method, "models": list(a.indices), "dropped": list(a.dropped), "gate_off": list(a.gate_off),
                "objective": a.objective, "cycle_error": a.cycle_error, "iterations": a.iterations,
                "gates": {"learned": g.learned, "granularity": g.granularity,
                          "layer_weights": {p: [round(float(v), 4) for v in w] for p, w in g.layer_means().items()}},
                "repair": self.merged.metrics(), "timings": dict(self.timings)}

    def score(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000) -> dict[str, float]:
        """Accuracy and mean cross-entropy of the merged model on ``x, y``."""
        return accuracy_and_loss(self.model, x, y, batch_size=batch_size)


def _tensors(calibration: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from a pair of tensors, a ``TensorDataset``, a ``DataLoader`` or any map-style dataset."""
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    if isinstance(calibration, (tuple, list)) and len(calibration) == 2 and all(
            isinstance(t, torch.Tensor) for t in calibration):
        x, y = calibration
    elif isinstance(calibration, TensorDataset):
        x, y = calibration.tensors[0], calibration.tensors[1]
    elif isinstance(calibration, (DataLoader, Dataset)):
        loader = calibration if isinstance(calibration, DataLoader) else DataLoader(calibration, batch_size=256)
        batches = [(b[0], b[1]) for b in loader]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    else:
        raise TypeError(f"calibration: expected (x, y) tensors, a TensorDataset or a DataLoader, got "
                        f"{type(calibration).__name__}")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"calibration: need as many labels as inputs, and some of each (got {len(x)} and {len(y)})")
    return x.detach().cpu(), y.detach().cpu().long()


def _template(models: Sequence[nn.Module | StateDict], model: nn.Module | None, config: Config,
              x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """The architecture every input shares: ``model``, the first input module, or ``config.model`` built
    for the calibration data's shape."""
    template = model if model is not None else next((m for m in models if isinstance(m, nn.Module)), None)
    if template is None:
        template = build_model(config.model, in_channels=x.shape[1], image_size=x.shape[-1],
                               num_classes=int(y.max()) + 1)
    else:
        template = copy.deepcopy(template)
    for needed in ("perm_spec", "stat_points", "layer_parts"):
        if not hasattr(template, needed):
            raise TypeError(f"merge: {type(template).__name__} has no {needed}(); merge cyclemerge models "
                            "(cyclemerge.models: MLP, ResNet20, VGG16) or their state dicts")
    return template.cpu().eval()


def _state_dicts(models: Sequence[nn.Module | StateDict], template: nn.Module) -> list[StateDict]:
    if len(models) < 2:
        raise ValueError(f"merge: need at least 2 models, got {len(models)}")
    reference = template.state_dict()
    out = []
    for k, m in enumerate(models):
        sd = m.state_dict() if isinstance(m, nn.Module) else m
        wrong = sorted(set(reference) ^ set(sd)) or [n for n, t in reference.items() if sd[n].shape != t.shape]
        if wrong:
            raise ValueError(f"merge: model {k} does not fit the architecture ({', '.join(map(str, wrong[:3]))}); "
                             "pass model= (an instance of the architecture) or set config.model to match")
        out.append({n: t.detach().cpu().clone() for n, t in sd.items()})
    return out


def merge(models: Sequence[nn.Module | StateDict], calibration: Any, *, config: Config | None = None,
          model: nn.Module | None = None) -> MergeResult:
    """Merge N models of one architecture into one, as the pipeline does: activation statistics, align
    (``config.align.method``, C2M3 by default), gates, repair, all on ``calibration`` (training data,
    never the test split).

    ``models`` are ``nn.Module``s or state dicts; ``model`` optionally gives the architecture for
    state dicts (else ``config.model`` is built for the calibration data's shape). ``calibration`` is
    ``(x, y)`` tensors, a ``TensorDataset`` or a ``DataLoader``; each step takes its prefix of it, as
    the pipeline takes slices of its calibration split (``data.calibration_size``,
    ``activations.num_samples``, ``repair.num_samples``).
    """
    cfg = config or Config()
    x, y = _tensors(calibration)
    template = _template(models, model, cfg, x, y)
    sds = _state_dicts(models, template)
    timings: dict[str, float] = {}

    def timed(step: str, fn, *args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[step] = time.perf_counter() - started
        return out

    stats = None
    if cfg.repair.method == "repair" or needs_endpoint_stats(cfg):
        stats = timed("activations", lambda: [activation_stats(template, sd, x, cfg) for sd in sds])
    corr = None
    if cfg.align.cost == "activations":
        corr = timed("correlations", correlations, [load_into(copy.deepcopy(template), sd).eval() for sd in sds], x, cfg)
    alignment = timed("align", align, sds, template, cfg, correlations=corr, endpoint_stats=stats, calibration=(x, y))
    gates = timed("gates", learn_gates, template, alignment, (x, y), cfg)
    merged = timed("repair", repair, template, alignment, gates, (x, y), cfg, endpoint_stats=stats)
    out = load_into(copy.deepcopy(template), merged.state_dict).eval()
    return MergeResult(model=out, alignment=alignment, gates=gates, merged=merged, timings=timings)

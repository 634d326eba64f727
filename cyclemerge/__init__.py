"""cyclemerge: merge N neural networks of one architecture into one, with no retraining of their weights.

    import cyclemerge
    result = cyclemerge.merge(models, calibration=(x, y))
    merged = result.model

The stage functions are in :mod:`cyclemerge.api`. Names are loaded on first use: importing one
module of the package (``cyclemerge.train``, say) runs no other, which keeps each pipeline stage's
code dependencies to what it imports (``tasks/deps.py`` reads ``_EXPORTS`` for the same reason).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "merge": "cyclemerge.api",
    "MergeResult": "cyclemerge.api",
    "Alignment": "cyclemerge.results",
    "Baselines": "cyclemerge.results",
    "Gates": "cyclemerge.results",
    "Merged": "cyclemerge.results",
    "EvaluationReport": "cyclemerge.stages.evaluate",
    "TrainedModel": "cyclemerge.stages.train",
    "Config": "cyclemerge.config",
    "load_config": "cyclemerge.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cyclemerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

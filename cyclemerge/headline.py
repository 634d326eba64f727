"""The headline numbers of a run: what ``dvc exp show`` and ``dvc metrics diff`` show.

Only the numbers a user compares between experiments: test accuracy and loss per method (the
merged model, the output ensemble and the endpoints' mean first), and the alignment's objective and
cycle error. No timings, hashes or counts: those stay in the stages' own metrics files, so two
runs that computed the same thing have equal headlines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ENSEMBLE_ROW = "ensemble (outputs)"


def _pair(block: Mapping[str, Any]) -> dict[str, float | None]:
    return {"test_acc": block.get("test_acc"), "test_loss": block.get("test_loss")}


def headline_metrics(evaluation: Mapping[str, Any], alignment: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics/headline.json`` from the evaluate stage's metrics and the align stage's metrics.

    ``evaluation`` needs ``merged``, ``ensemble``, ``endpoints["mean"]`` and ``methods`` (method
    name -> scores); ``alignment`` needs ``objective`` and ``cycle_error``. Endpoint rows are left
    out of ``methods`` (their mean is headlined) and so are the rows headlined above it.
    """
    merged = evaluation["merged"]
    endpoints = {k for k in evaluation.get("endpoints", {}) if k != "mean"}
    shown = {merged.get("method"), ENSEMBLE_ROW}
    methods = {name: _pair(scores) for name, scores in evaluation.get("methods", {}).items()
               if name not in endpoints and name not in shown and name != "endpoint mean"}
    return {
        "merged": _pair(merged),
        "ensemble": _pair(evaluation["ensemble"]),
        "endpoints_mean": _pair(evaluation["endpoints"]["mean"]),
        "methods": methods,
        "align": {"objective": alignment.get("objective"), "cycle_error": alignment.get("cycle_error")},
    }

"""What the stages hand each other: typed results with their artifact form.

Each result is a plain dataclass of tensors, state dicts and JSON-ready values. ``to_artifact`` gives
the dict the pipeline saves (``torch.save``) and ``from_artifact`` reads it back, so a notebook and
the pipeline hold the same objects. This module imports nothing of the stages, so depending on it
costs a stage nothing but these definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from cyclemerge.config import MATCHERS
from cyclemerge.permutation import Perms, StateDict

# How reports, metrics and the grid name each alignment method's merge.
METHOD_LABELS = {"naive": "naive average", "merge_many": "MergeMany", "pairwise": "pairwise to reference",
                 "c2m3": "C2M3"}
assert set(METHOD_LABELS) == set(MATCHERS), "every alignment method needs a label"


def _shallow(result: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, tensors shared, not copied (``asdict`` would deep-copy them)."""
    return {f.name: getattr(result, f.name) for f in fields(result)}


@dataclass
class Alignment:
    """The models mapped into one universe basis by one alignment method.

    ``indices`` are the input models in the universe, in order: those the method aligned, then those
    the pre-filter let in switched off (``gate_off``), matched against the aligned ones afterwards.
    ``perms[k]`` maps model ``indices[k]`` into the universe and ``universe[k]`` is that model there.
    ``report`` is the method's :meth:`MatchReport.summary`; ``cycle_error`` is measured on the maps a
    user of the method gets (0 for universe methods by construction, invariant 2).
    """

    method: str
    indices: list[int]
    gate_off: list[int]
    dropped: list[int]
    perms: list[Perms]
    universe: list[StateDict]
    report: dict[str, Any]
    objective: float
    cycle_error: float
    cosine_before: float
    cosine_after: float
    prefilter: dict[int, list[str]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return float(self.report.get("seconds", 0.0))

    @property
    def iterations(self) -> int:
        return int(self.report.get("iterations", 0))

    @property
    def objective_history(self) -> list[float]:
        return list(self.report.get("objective_history", []))

    def warnings(self) -> list[str]:
        """One line per model the pre-filter flagged: what became of it, and its first reason."""
        return [f"model {i} flagged by the pre-filter and "
                f"{'dropped' if i in self.dropped else 'enters gating switched off'}: {reasons[0]}"
                for i, reasons in self.prefilter.items()]

    def metrics(self) -> dict[str, Any]:
        """The align stage's metrics (``metrics/align.json`` without its params hash)."""
        return {
            "method": self.method,
            "objective": self.objective,
            "iterations": self.iterations,
            "seconds": self.seconds,
            "cycle_error": self.cycle_error,
            "cosine_before": self.cosine_before,
            "cosine_after": self.cosine_after,
            "models": list(self.indices), "gate_off": list(self.gate_off), "dropped": list(self.dropped),
            "prefilter": {str(i): r for i, r in self.prefilter.items()},
            "objective_history": self.objective_history,
            "starts": self.report.get("extra", {}).get("starts", []),
        }

    def to_artifact(self) -> dict[str, Any]:
        return _shallow(self)

    @classmethod
    def from_artifact(cls, saved: dict[str, Any]) -> "Alignment":
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__})


@dataclass
class Baseline:
    """One other alignment method's uniform merge, before and after repair (None: repair.method none)."""

    method: str
    perms: list[Perms]
    merged: StateDict
    repaired: StateDict | None
    objective: float
    seconds: float = 0.0  # wall clock: kept in metrics/baselines.json, left out of the saved artifact
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Baselines:
    """The baselines of ``evaluate.baselines`` over the models the pre-filter kept (``indices``).

    ``cycle_maps`` are the three pairwise weight-matching maps a<-b, b<-c, c<-a among the first three
    kept models: what a user of pairwise matching composes in the cycle experiment (None when it is off).
    """

    indices: list[int]
    methods: dict[str, Baseline]
    cycle_maps: tuple[Perms, Perms, Perms] | None = None

    def metrics(self) -> dict[str, Any]:
        return {"models": list(self.indices),
                "methods": {m: {"objective": b.objective, "seconds": b.seconds} for m, b in self.methods.items()},
                "cycle_maps": self.cycle_maps is not None}

    def to_artifact(self) -> dict[str, Any]:
        return {"indices": list(self.indices), "methods": {m: _shallow(b) for m, b in self.methods.items()},
                "cycle_maps": None if self.cycle_maps is None else list(self.cycle_maps)}

    @classmethod
    def from_artifact(cls, saved: dict[str, Any]) -> "Baselines":
        maps = saved.get("cycle_maps")
        return cls(indices=list(saved["indices"]), methods={m: Baseline(**b) for m, b in saved["methods"].items()},
                   cycle_maps=None if maps is None else tuple(maps))


@dataclass
class Gates:
    """The gates learned over an alignment's universe models (or their uniform stand-in).

    ``merged`` is the one static merged state dict the final gates give; ``point_weights`` the model
    weights REPAIR uses at each stat point; ``layer_weights`` each layer's share per model (the
    heatmap); ``result`` the gate parameters (:meth:`GateResult.as_dict`); ``table`` one row per
    (part, model) for reports.
    """

    indices: list[int]
    merged: StateDict
    point_weights: dict[str, torch.Tensor]
    layer_weights: dict[str, torch.Tensor]
    table: list[dict]
    result: dict[str, Any]
    enabled: bool

    @property
    def learned(self) -> bool:
        return bool(self.result["learned"])

    @property
    def granularity(self) -> str:
        return str(self.result["granularity"])

    @property
    def history(self) -> dict[str, list[float]]:
        return self.result["history"]

    @property
    def seconds(self) -> float:
        return float(self.result.get("seconds", 0.0))  # wall clock: absent from a saved artifact

    @property
    def skipped_steps(self) -> int:
        return int(self.result["skipped_steps"])

    @property
    def model_names(self) -> list[str]:
        return [f"model {i}" for i in self.indices]

    def layer_means(self) -> dict[str, torch.Tensor]:
        """Each layer's weight per model, averaged over its rows (channels at ``channel`` granularity)."""
        n = len(self.indices)
        return {p: w.reshape(-1, n).mean(0) for p, w in self.layer_weights.items()}

    def metrics(self) -> dict[str, Any]:
        """The gates stage's metrics (``metrics/gates.json`` without its params hash)."""
        history = self.history
        return {"enabled": self.enabled, "granularity": self.granularity, "learned": self.learned,
                "seconds": self.seconds, "skipped_steps": self.skipped_steps,
                "final_loss": history["loss"][-1] if history["loss"] else None,
                "final_expected_l0": history["expected_l0"][-1] if history["expected_l0"] else None,
                "layer_weights": {p: [round(float(v), 4) for v in w] for p, w in self.layer_means().items()},
                "models": self.model_names}

    def curves(self) -> list[dict[str, float]]:
        """One record per optimisation step (``plots/gates_curves.json``)."""
        h = self.history
        return [{"step": s, "loss": h["loss"][s], "ce": h["ce"][s], "expected_l0": h["expected_l0"][s]}
                for s in range(len(h["loss"]))]

    def to_artifact(self) -> dict[str, Any]:
        return _shallow(self)

    @classmethod
    def from_artifact(cls, saved: dict[str, Any]) -> "Gates":
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__})


@dataclass
class Merged:
    """The final merged state dict after repair, the merge it started from, and their calibration scores."""

    state_dict: StateDict
    before_repair: StateDict
    method: str
    calibration_before: dict[str, float]
    calibration_after: dict[str, float]
    num_samples: int

    def metrics(self) -> dict[str, Any]:
        return {"method": self.method, "calibration_before": self.calibration_before,
                "calibration_after": self.calibration_after, "num_samples": self.num_samples}

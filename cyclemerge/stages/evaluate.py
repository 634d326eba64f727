"""Evaluate stage: every endpoint, the output ensemble, the merged model before and after gates and
repair, the baselines, interpolation barriers and the A -> B -> C -> A cycle, as one report.

Scores are on the test split and on a slice of the train split (test transform), and on the
validation slice side by side with test whenever the data has one. Nothing here aligns a model:
the main alignment and the baselines come in computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cyclemerge import evaluate as ev
from cyclemerge.activations import Stats
from cyclemerge.averaging import average
from cyclemerge.config import Config
from cyclemerge.data import DataBundle
from cyclemerge.models import spec_of
from cyclemerge.permutation import StateDict, pairwise_map
from cyclemerge.report import params_from_config
from cyclemerge.results import METHOD_LABELS, Alignment, Baselines, Gates
from cyclemerge.stages.activations import calibration_slice
from cyclemerge.stages.repair import merge_and_repair

SCORE_KEYS = ("test_acc", "test_loss", "train_acc", "train_loss")
Splits = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EvaluationReport:
    """What the evaluate stage measured: ``results`` ``{method: {split: {"acc", "loss"}}}``, the method
    table ``rows``, interpolation ``curves`` and ``cycle`` experiments, and ``metrics`` (JSON-ready,
    ``metrics/evaluate.json`` without its timing and params hash)."""

    results: dict[str, dict[str, dict[str, float]]]
    rows: list[dict]
    endpoints: list[str]
    final: str
    curves: dict[str, dict]
    cycle: dict[str, dict]
    metrics: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def merged_test_acc(self) -> float:
        return self.metrics["merged"]["test_acc"]

    def interpolation_records(self) -> list[dict]:
        """One record per (curve, lambda) point (``plots/interpolation.json``)."""
        return [{"curve": n, "lambda": lam, "test_loss": loss, "test_acc": acc}
                for n, c in self.curves.items() for lam, loss, acc in zip(c["lambdas"], c["loss"], c["acc"])]


def evaluation_splits(data: DataBundle, config: Config) -> Splits:
    """test, the first ``evaluate.train_subset`` training samples, and validation when the data has it."""
    train_n = config.evaluate.train_subset or len(data.train_idx)
    tr = data.train_idx[:train_n]
    splits = {"test": (data.test_x, data.test_y), "train": (data.train_x[tr], data.train_y[tr])}
    if data.has_validation:
        splits["validation"] = data.validation_set()
    return splits


def _scores(model: nn.Module, sd: StateDict, splits: Splits, batch_size: int) -> dict:
    return {name: ev.accuracy_and_loss(ev.load_into(model, sd), x, y, batch_size=batch_size)
            for name, (x, y) in splits.items()}


def _split_keys(scores: Mapping, splits: Sequence[str]) -> dict[str, float]:
    return {f"{s}_{m}": scores[s][m] for s in splits if s in scores for m in ("acc", "loss")}


def _flat(scores: Mapping) -> dict[str, float]:
    return _split_keys(scores, ("test", "train", "validation"))


def _test(scores: Mapping) -> dict[str, float]:
    return _split_keys(scores, ("test", "validation"))


def evaluate(model: nn.Module, state_dicts: Sequence[StateDict], seeds: Sequence[int | None], alignment: Alignment,
             gates: Gates, final: StateDict, baselines: Baselines, data: DataBundle, config: Config, *,
             endpoint_stats: Sequence[dict[str, Stats]] | None = None) -> EvaluationReport:
    """Score everything a merge run produced: ``state_dicts``/``seeds`` are every input model, ``final``
    the repaired merge, ``endpoint_stats`` every model's statistics (for the uniform merge + REPAIR)."""
    if list(baselines.indices) != list(alignment.indices):
        raise ValueError(f"the baselines were computed on models {baselines.indices} but the alignment holds "
                         f"{alignment.indices}: rerun the baselines stage")
    spec = spec_of(model)
    bs = config.evaluate.batch_size
    rcfg = config.repair
    splits = evaluation_splits(data, config)
    kept, universe = alignment.indices, alignment.universe
    sds = [state_dicts[i] for i in kept]

    results: dict[str, dict] = {}
    endpoints = []
    for i, sd in enumerate(state_dicts):
        if i in alignment.dropped:
            continue
        name = f"model {i}" + (f" (seed {seeds[i]})" if seeds[i] is not None else "")
        results[name] = _scores(model, sd, splits, bs)
        endpoints.append(name)
    ens = {s: ev.ensemble_of_state_dicts(model, sds, x, y, batch_size=bs) for s, (x, y) in splits.items()}
    results["ensemble (outputs)"] = ens
    main = METHOD_LABELS[alignment.method]
    uniform = average(universe)
    results[f"{main} uniform"] = _scores(model, uniform, splits, bs)
    if gates.enabled and rcfg.method != "none":
        # The paper's "C2M3 + REPAIR" (no gates); without gates it is the final model below.
        x_cal, _ = calibration_slice(data, rcfg.num_samples)
        stats = [endpoint_stats[i] for i in kept] if rcfg.method == "repair" else None
        _, uniform_repaired = merge_and_repair(model, universe, method=rcfg.method, x=x_cal, batch_size=rcfg.batch_size,
                                               endpoint_stats=stats, perms=alignment.perms, merged=uniform)
        results[f"{main} uniform + {rcfg.method}"] = _scores(model, uniform_repaired, splits, bs)
    before_repair = f"{main} + gates" if gates.enabled else f"{main} uniform"
    if gates.enabled:
        results[before_repair] = _scores(model, gates.merged, splits, bs)
    final_name = f"{before_repair} + {rcfg.method}"
    if rcfg.method != "none":
        results[final_name] = _scores(model, final, splits, bs)
    else:
        final_name = before_repair
    for m, b in baselines.methods.items():
        results[METHOD_LABELS[m]] = _scores(model, b.merged, splits, bs)
        if b.repaired is not None:
            results[f"{METHOD_LABELS[m]} + {rcfg.method}"] = _scores(model, b.repaired, splits, bs)

    rows = ev.method_table(results, endpoints=endpoints)
    x_test, y_test = splits["test"]
    steps = config.evaluate.interpolation_steps
    curves = {
        "naive (model 0 ↔ 1, own bases)": ev.interpolation_curve(model, sds[0], sds[1], x_test, y_test, steps=steps,
                                                                 batch_size=bs),
        f"{main} (model 0 ↔ 1, universe)": ev.interpolation_curve(model, universe[0], universe[1], x_test, y_test,
                                                                   steps=steps, batch_size=bs),
    }
    cycle = {}
    if config.evaluate.cycle and len(sds) >= 3:
        # Pairwise matching's maps are matched pair by pair (what its user composes), a universe
        # method's come from its universe: P_ab = P_a P_b^T.
        perms = alignment.perms
        universe_maps = (pairwise_map(perms[0], perms[1]), pairwise_map(perms[1], perms[2]),
                         pairwise_map(perms[2], perms[0]))
        for method in dict.fromkeys(("pairwise", alignment.method)):
            maps = baselines.cycle_maps if method == "pairwise" else universe_maps
            if maps is None:
                raise ValueError("the baselines hold no pairwise cycle maps but evaluate.cycle is on: rerun the "
                                 "baselines stage")
            cycle[METHOD_LABELS[method]] = ev.cycle_experiment(model, sds[0], spec, *maps, x_test, y_test,
                                                                 steps=steps, batch_size=bs)

    named = {n: _test(results[n]) for n in endpoints}
    mean = {k: sum(e[k] for e in named.values()) / len(named) for k in next(iter(named.values()))}
    naive_scores = results.get("naive average") or _scores(model, average(sds), splits, bs)
    methods = {}
    for r in rows:
        methods[r["method"]] = {k: r[k] for k in SCORE_KEYS}
        methods[r["method"]].update({k: r[k] for k in ("validation_acc", "validation_loss") if k in r})
    metrics = {
        "endpoints": {**named, "mean": mean},
        "ensemble": _test(ens),
        "merged": {"method": final_name, **_flat(results[final_name])},
        "merged_before_repair": {"method": before_repair, **_flat(results[before_repair])},
        "uniform": _flat(results[f"{main} uniform"]),
        "naive": _test(naive_scores),
        "methods": methods,
        "baselines": {m: {"objective": b.objective, "align_seconds": b.seconds} for m, b in baselines.methods.items()},
        "barriers": {n: {"barrier": c["barrier"], "acc_barrier": c["acc_barrier"]} for n, c in curves.items()},
        "cycle": {n: {k: v for k, v in c.items() if k != "curve"} for n, c in cycle.items()},
    }
    notes = ([f"model {i} dropped by the pre-filter" for i in alignment.dropped]
             + [f"model {i} entered gating switched off" for i in alignment.gate_off])
    return EvaluationReport(results=results, rows=rows, endpoints=endpoints, final=final_name, curves=curves,
                            cycle=cycle, metrics=metrics, notes=notes)


def summary_context(report: EvaluationReport, config: Config, alignment: Alignment, *, figures: dict[str, str]) -> dict:
    """The context ``cyclemerge.report.render_summary`` and ``short_table`` render (figure paths as given).

    No wall-clock seconds: two runs that computed the same thing write the same report."""
    return {
        "title": "cyclemerge run summary",
        "params": params_from_config(config),
        "rows": report.rows,
        "figures": figures,
        "report_dir": "reports",
        "alignment": {"method": alignment.method, "objective": alignment.objective,
                      "iterations": alignment.iterations, "cycle error": alignment.cycle_error,
                      "cosine before": alignment.cosine_before, "cosine after": alignment.cosine_after},
        "cycle": report.cycle,
        "notes": report.notes,
    }

"""Align stage: screen the models, map them into one universe with the configured method."""

from __future__ import annotations

import logging

import torch
from prefect import task
from tqdm.auto import tqdm

from cyclemerge import matching
from cyclemerge.activations import stats_from_tensors
from cyclemerge.evaluate import accuracy_and_loss, load_into
from cyclemerge.io import load_torch, save_torch, write_json
from cyclemerge.merge import merge_and_repair, to_universe_all
from cyclemerge.plots import plot_objective
from cyclemerge.prefilter import map_into_universe, screen_models
from cyclemerge.train import model_for
from tasks.activations import model_files, stats_path
from tasks.common import Project, by_key, load_stage_data, manifest
from tasks.tracking import attach

log = logging.getLogger("cyclemerge.align")


class TooFewModelsError(ValueError):
    """Fewer than two models are left to merge after the pre-filter."""


def alignment_path(project: Project):
    return project.artifacts / "alignment" / "alignment.pt"


def load_endpoint_stats(project: Project, indices) -> list[dict]:
    return [stats_from_tensors(load_torch(stats_path(project, i))["stats"]) for i in indices]


def calibration_set(data, n: int):
    idx = data.calib_idx[:n]
    return data.train_x[idx], data.train_y[idx]


def calibration_scorer(project: Project, model, sds, stats, spec, x, y):
    """Score for ``select_by: calibration_loss``: calibration CE of the merged (and repaired) model."""
    cfg = project.cfg

    def score(perms) -> float:
        _, repaired = merge_and_repair(model, to_universe_all(sds, spec, perms), method=cfg.repair.method, x=x,
                                       batch_size=cfg.repair.batch_size, endpoint_stats=stats, perms=perms)
        return accuracy_and_loss(load_into(model, repaired), x, y, batch_size=cfg.repair.batch_size)["loss"]

    return score


@task(name="align", cache_key_fn=by_key, persist_result=True)
def stage_task(project: Project, *, key: str, run_id: str | None, parent_run_id: str | None = None) -> dict:
    cfg = project.cfg
    run = attach(project, run_id)
    data = load_stage_data(project)
    model = model_for(cfg.model, data)
    spec = model.perm_spec()
    files = model_files(project)
    sds = [load_torch(p)["state_dict"] for p in files]

    screen = screen_models(sds, cfg.align.outlier_norm_ratio)
    aligned, gated_off, dropped = screen.partition(cfg.align.outlier_action)
    for i, reasons in screen.reasons.items():
        fate = "dropped" if i in dropped else "enters gating switched off"
        log.warning("model %d flagged by the pre-filter (%s): %s", i, fate, "; ".join(reasons[:3]))
        print(f"warning: model {i} flagged by the pre-filter and {fate}: {reasons[0]}", flush=True)
    if len(aligned) < 2:
        raise TooFewModelsError(f"only {len(aligned)} model(s) passed the pre-filter (flagged: {screen.reasons}); "
                                "merging needs at least 2 — check the checkpoints or raise align.outlier_norm_ratio")

    correlations = None
    if cfg.align.cost == "activations":
        corr_file = project.artifacts / "activations" / "correlations.pt"
        if not corr_file.exists():
            raise FileNotFoundError("align.cost=activations needs activations.correlations: true (no correlations.pt)")
        sel = torch.tensor(aligned)
        correlations = {g: c[sel][:, sel] for g, c in load_torch(corr_file).items()}

    score = None
    if cfg.align.select_by == "calibration_loss" and cfg.align.restarts > 1:
        x, y = calibration_set(data, cfg.repair.num_samples)
        score = calibration_scorer(project, model_for(cfg.model, data), [sds[i] for i in aligned],
                                   load_endpoint_stats(project, aligned), spec, x, y)

    bar = tqdm(total=cfg.align.max_iter * cfg.align.restarts, desc=f"align ({cfg.align.method})", unit="it",
               mininterval=1.0, disable=None)

    def progress(step: int, value: float) -> None:
        bar.n = step + 1
        bar.set_postfix(objective=f"{value:.4g}", refresh=True)

    result = matching.match(state_dicts=[sds[i] for i in aligned], spec=spec, config=cfg.align,
                            correlations=correlations, progress=progress, score=score)
    bar.close()
    universe = to_universe_all([sds[i] for i in aligned], spec, result.perms)
    perms = list(result.perms)
    for j in gated_off:
        mapped, p = map_into_universe(sds[j], universe, spec, seed=cfg.align.seed)
        universe.append(mapped)
        perms.append(p)
    indices = list(aligned) + list(gated_off)

    n = len(aligned)
    report = result.report.summary()
    maps = matching.pairwise_maps(result)
    metrics = {
        "method": cfg.align.method,
        "objective": matching.objective([sds[i] for i in aligned], spec, result.perms),
        "iterations": result.report.iterations,
        "seconds": result.report.seconds,
        "cycle_error": matching.cycle_error(maps, n),
        "cosine_before": matching.cosine_similarity([sds[i] for i in aligned]),
        "cosine_after": matching.cosine_similarity(universe[:n]),
        "models": indices, "gate_off": list(gated_off), "dropped": list(dropped),
        "prefilter": {str(i): r for i, r in screen.reasons.items()},
        "objective_history": report["objective_history"],
        "starts": report["extra"].get("starts", []),
        "params_hash": project.params_hash,
    }
    path = save_torch({"indices": indices, "gate_off": list(gated_off), "dropped": list(dropped), "perms": perms,
                       "universe": universe, "report": report}, alignment_path(project))
    write_json(metrics, project.metrics_path("align"))
    plot = plot_objective({cfg.align.method: report["objective_history"]}, project.plot_path("objective.png"))
    run.log_params({"align": cfg.align.model_dump()})
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    run.log_series("objective", report["objective_history"])
    run.log_metrics({"flagged_models": len(screen.reasons), "dropped_models": len(dropped)})
    run.log_artifact(project.metrics_path("align"))
    run.log_artifact(plot, "plots")
    return manifest(project, [path], metrics={k: metrics[k] for k in ("objective", "cycle_error", "seconds")})

"""Activations stage tasks: one cached statistics task per model, the cross-model correlations that
activation-based matching needs, and the stage's summary."""

from __future__ import annotations

import time

import torch
from prefect import task

from cyclemerge.io import load_torch, save_torch, write_json
from cyclemerge.stages.activations import activation_stats, calibration_slice, correlations
from cyclemerge.train import model_for
from tasks import artifacts
from tasks.common import Project, by_key, load_stage_data, manifest


@task(name="activation-stats", cache_key_fn=by_key, persist_result=True)
def model_stats(project: Project, *, key: str, index: int) -> dict:
    if project.cfg.orchestration.task_runner == "dask":
        torch.set_num_threads(1)
    cfg = project.cfg
    started = time.perf_counter()
    data = load_stage_data(project)
    x, _ = calibration_slice(data, cfg.activations.num_samples)
    stats = activation_stats(model_for(cfg.model, data), load_torch(project.model_path(index))["state_dict"], x, cfg)
    path = artifacts.save_stats(project, index, stats, num_samples=len(x))
    return manifest(project, [path], index=index, points=len(stats), seconds=time.perf_counter() - started)


@task(name="cross-correlations", cache_key_fn=by_key, persist_result=True)
def cross_correlations(project: Project, *, key: str) -> dict:
    cfg = project.cfg
    data = load_stage_data(project)
    models = []
    for sd in artifacts.load_state_dicts(project):
        model = model_for(cfg.model, data)
        model.load_state_dict(sd)
        models.append(model.eval())
    x, _ = calibration_slice(data, cfg.activations.num_samples)
    corr = correlations(models, x, cfg)
    return manifest(project, [save_torch(corr, project.correlations_path)], groups=sorted(corr))


@task(name="summarize-activations")
def summarize_activations(project: Project, results: list[dict], *, models: int) -> dict:
    """metrics/activations.json; statistics of models that no longer exist are removed."""
    cfg = project.cfg
    keep = {project.stats_path(i).name for i in range(models)} | (
        {project.correlations_path.name} if cfg.activations.correlations else set())
    for stale in project.activations_dir.glob("*.pt"):
        if stale.name not in keep:
            stale.unlink()
    summary = {"models": models, "num_samples": cfg.activations.num_samples,
               "stat_points": results[0]["points"], "correlations": cfg.activations.correlations,
               "params_hash": project.stage_params_hash("activations"),
               # Summed over the models' tasks (which may run side by side); taken from the cached
               # results, so a cached rerun rewrites this file unchanged and DVC sees nothing new.
               "seconds": sum(r.get("seconds", 0.0) for r in results)}
    write_json(summary, project.metrics_path("activations"))
    return {"summary": summary, "cached": all(r.get("cached") for r in results)}

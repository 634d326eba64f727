"""Activations stage: per-model channel statistics on the calibration slice (one cached task per model),
and the cross-model correlations that activation-based matching needs."""

from __future__ import annotations

import time

import torch
from prefect import task

from cyclemerge.activations import channel_stats, cross_correlations, stats_to_tensors
from cyclemerge.io import load_torch, save_torch, write_json
from cyclemerge.train import model_for
from tasks.common import Project, by_key, load_stage_data, manifest, resolve, run_cached


def calibration_inputs(project: Project, data, num_samples: int) -> torch.Tensor:
    """The first ``num_samples`` of the calibration slice: TRAIN split only, never test."""
    return data.train_x[data.calib_idx[:num_samples]]


def model_files(project: Project) -> list:
    files = sorted((project.artifacts / "models").glob("model_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if len(files) < 2:
        raise FileNotFoundError(f"{project.artifacts / 'models'}: fewer than 2 models; run the train stage first")
    return files


def load_models(project: Project, data) -> list[torch.nn.Module]:
    models = []
    for path in model_files(project):
        model = model_for(project.cfg.model, data)
        model.load_state_dict(load_torch(path)["state_dict"])
        models.append(model.eval())
    return models


def stats_path(project: Project, i: int):
    return project.artifacts / "activations" / f"model_{i}.pt"


@task(name="activation-stats", cache_key_fn=by_key, persist_result=True)
def model_stats(project: Project, *, key: str, index: int) -> dict:
    if project.cfg.orchestration.task_runner == "dask":
        torch.set_num_threads(1)
    cfg = project.cfg
    started = time.perf_counter()
    data = load_stage_data(project)
    model = model_for(cfg.model, data)
    model.load_state_dict(load_torch(project.model_path(index))["state_dict"])
    x = calibration_inputs(project, data, cfg.activations.num_samples)
    stats = channel_stats(model.eval(), x, batch_size=cfg.activations.batch_size)
    path = save_torch({"stats": stats_to_tensors(stats), "num_samples": len(x)}, stats_path(project, index))
    return manifest(project, [path], index=index, points=len(stats), seconds=time.perf_counter() - started)


@task(name="cross-correlations", cache_key_fn=by_key, persist_result=True)
def correlations(project: Project, *, key: str) -> dict:
    cfg = project.cfg
    data = load_stage_data(project)
    x = calibration_inputs(project, data, cfg.activations.num_samples)
    corr = cross_correlations(load_models(project, data), x, batch_size=cfg.activations.batch_size)
    path = save_torch({k: v.float() for k, v in corr.items()}, project.artifacts / "activations" / "correlations.pt")
    return manifest(project, [path], groups=sorted(corr))


def run_activations(project: Project, *, key: str, force: bool, run_id: str | None) -> dict:
    """Fan out one statistics task per model (in parallel on the configured task runner)."""
    from tasks.tracking import Run  # noqa: F401

    n = len(model_files(project))
    jobs = []
    for i in range(n):
        k = f"{key}-model{i}"
        jobs.append((k, i, run_cached(model_stats, project, key=k, force=force, wait=False, index=i)))
    results = [resolve(model_stats, project, fut, key=k, index=i) for k, i, fut in jobs]
    if project.cfg.activations.correlations:
        results.append(run_cached(correlations, project, key=f"{key}-corr", force=force))
    folder = project.artifacts / "activations"
    keep = {f"model_{i}.pt" for i in range(n)} | ({"correlations.pt"} if project.cfg.activations.correlations else set())
    for stale in folder.glob("*.pt"):
        if stale.name not in keep:
            stale.unlink()
    summary = {"models": n, "num_samples": project.cfg.activations.num_samples,
               "stat_points": results[0]["points"], "correlations": project.cfg.activations.correlations,
               "params_hash": project.stage_params_hash("activations"),
               # Summed over the models' tasks (which may run side by side); taken from the cached
               # results, so a cached rerun rewrites this file unchanged and DVC sees nothing new.
               "seconds": sum(r.get("seconds", 0.0) for r in results)}
    write_json(summary, project.metrics_path("activations"))
    return {"summary": summary, "cached": all(r.get("cached") for r in results)}

"""Baselines stage task: the other alignment methods' merges, computed once per change of their inputs."""

from __future__ import annotations

import time

from prefect import task

from cyclemerge.io import write_json
from cyclemerge.stages.activations import calibration_slice
from cyclemerge.stages.baselines import baselines
from cyclemerge.train import model_for
from tasks import artifacts
from tasks.common import Project, by_key, load_stage_data, manifest
from tasks.tracking import attach


@task(name="baselines", cache_key_fn=by_key, persist_result=True)
def stage_task(project: Project, *, key: str, run_id: str | None, parent_run_id: str | None = None) -> dict:
    cfg = project.cfg
    run = attach(project, run_id)
    started = time.perf_counter()
    data = load_stage_data(project)
    x, _ = calibration_slice(data, cfg.repair.num_samples)
    result = baselines(artifacts.load_state_dicts(project), model_for(cfg.model, data), cfg, x=x,
                       endpoint_stats=artifacts.load_stats(project) if cfg.repair.method == "repair" else None)
    path = artifacts.save_baselines(project, result)
    metrics = {**result.metrics(), "seconds": time.perf_counter() - started,
               "params_hash": project.stage_params_hash("baselines")}
    write_json(metrics, project.metrics_path("baselines"))
    run.log_params({"baselines": list(result.methods)})
    run.log_metrics({f"{m}.{k}": v for m, b in metrics["methods"].items() for k, v in b.items()})
    run.log_artifact(project.metrics_path("baselines"))
    return manifest(project, [path], methods=list(result.methods))

"""Repair stage task: REPAIR (gate-weighted goal statistics) or BatchNorm reset, folded into the weights."""

from __future__ import annotations

import time

from prefect import task

from cyclemerge.io import save_model_checkpoint, write_json
from cyclemerge.stages.activations import calibration_slice
from cyclemerge.stages.repair import repair
from cyclemerge.train import make_checkpoint, model_for
from tasks import artifacts
from tasks.common import Project, by_key, load_stage_data, manifest
from tasks.tracking import attach


@task(name="repair", cache_key_fn=by_key, persist_result=True)
def stage_task(project: Project, *, key: str, run_id: str | None, parent_run_id: str | None = None) -> dict:
    cfg = project.cfg
    run = attach(project, run_id)
    started = time.perf_counter()
    data = load_stage_data(project)
    merged = repair(model_for(cfg.model, data), artifacts.load_alignment(project), artifacts.load_gates(project),
                    calibration_slice(data, cfg.repair.num_samples), cfg,
                    endpoint_stats=artifacts.load_stats(project) if cfg.repair.method == "repair" else None)
    seconds = time.perf_counter() - started
    metrics = {**merged.metrics(), "seconds": seconds, "params_hash": project.params_hash}
    path, safe = save_model_checkpoint(make_checkpoint(merged.state_dict, cfg.model, data, seed=None,
                                                       params_hash=project.params_hash, metrics=metrics,
                                                       source="cyclemerge merge"), project.merged_path)
    write_json(metrics, project.metrics_path("repair"))
    run.log_params({"repair": cfg.repair.model_dump()})
    before, after = merged.calibration_before, merged.calibration_after
    run.log_metrics({"calibration_loss_before": before["loss"], "calibration_loss_after": after["loss"],
                     "calibration_acc_before": before["acc"], "calibration_acc_after": after["acc"], "seconds": seconds})
    run.log_artifact(project.metrics_path("repair"))
    return manifest(project, [path, safe], metrics=metrics)

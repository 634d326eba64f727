"""Repair stage: REPAIR (gate-weighted goal statistics) or BatchNorm reset, folded into the weights."""

from __future__ import annotations

import time

from prefect import task

from cyclemerge.evaluate import accuracy_and_loss, load_into
from cyclemerge.io import load_torch, save_torch, write_json
from cyclemerge.merge import merge_and_repair
from cyclemerge.train import make_checkpoint, model_for
from tasks.align import alignment_path, calibration_set, load_endpoint_stats
from tasks.common import Project, by_key, load_stage_data, manifest
from tasks.gates import gates_path
from tasks.tracking import attach


def merged_path(project: Project):
    return project.artifacts / "merged" / "merged.pt"


@task(name="repair", cache_key_fn=by_key, persist_result=True)
def stage_task(project: Project, *, key: str, run_id: str | None, parent_run_id: str | None = None) -> dict:
    cfg = project.cfg
    run = attach(project, run_id)
    started = time.perf_counter()
    data = load_stage_data(project)
    model = model_for(cfg.model, data)
    alignment = load_torch(alignment_path(project))
    gates = load_torch(gates_path(project))
    x, y = calibration_set(data, cfg.repair.num_samples)
    stats = load_endpoint_stats(project, alignment["indices"]) if cfg.repair.method == "repair" else None
    merged, repaired = merge_and_repair(model, alignment["universe"], method=cfg.repair.method, x=x,
                                        batch_size=cfg.repair.batch_size, endpoint_stats=stats,
                                        perms=alignment["perms"], weights=gates["point_weights"],
                                        merged=gates["merged"])
    before = accuracy_and_loss(load_into(model, merged), x, y, batch_size=cfg.repair.batch_size)
    after = accuracy_and_loss(load_into(model, repaired), x, y, batch_size=cfg.repair.batch_size)
    seconds = time.perf_counter() - started
    metrics = {"method": cfg.repair.method, "calibration_before": before, "calibration_after": after,
               "num_samples": len(x), "seconds": seconds, "params_hash": project.params_hash}
    path = save_torch(make_checkpoint(repaired, cfg.model, data, seed=None, params_hash=project.params_hash,
                                      metrics=metrics, source="cyclemerge merge"), merged_path(project))
    write_json(metrics, project.metrics_path("repair"))
    run.log_params({"repair": cfg.repair.model_dump()})
    run.log_metrics({"calibration_loss_before": before["loss"], "calibration_loss_after": after["loss"],
                     "calibration_acc_before": before["acc"], "calibration_acc_after": after["acc"], "seconds": seconds})
    run.log_artifact(project.metrics_path("repair"))
    return manifest(project, [path], metrics=metrics)

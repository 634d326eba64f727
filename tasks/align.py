"""Align stage task: the models mapped into one universe with the configured method."""

from __future__ import annotations

from prefect import task
from tqdm.auto import tqdm

from cyclemerge.io import write_json
from cyclemerge.models import spec_of
from cyclemerge.plots import plot_objective
from cyclemerge.stages.activations import calibration_slice
from cyclemerge.stages.align import align, needs_endpoint_stats
from cyclemerge.train import model_for
from tasks import artifacts
from tasks.common import Project, by_key, load_stage_data, manifest
from tasks.tracking import attach


@task(name="align", cache_key_fn=by_key, persist_result=True)
def stage_task(project: Project, *, key: str, run_id: str | None, parent_run_id: str | None = None) -> dict:
    cfg = project.cfg
    run = attach(project, run_id)
    data = load_stage_data(project)
    scored = needs_endpoint_stats(cfg)
    bar = tqdm(total=cfg.align.max_iter * cfg.align.restarts, desc=f"align ({cfg.align.method})", unit="it",
               mininterval=1.0, disable=None)

    def progress(step: int, value: float) -> None:
        bar.n = step + 1
        bar.set_postfix(objective=f"{value:.4g}", refresh=True)

    model = model_for(cfg.model, data)
    alignment = align(artifacts.load_state_dicts(project), model, cfg,
                      correlations=artifacts.load_correlations(project) if cfg.align.cost == "activations" else None,
                      endpoint_stats=artifacts.load_stats(project) if scored else None,
                      calibration=calibration_slice(data, cfg.repair.num_samples) if scored else None,
                      validation=data.validation_set() if scored and data.has_validation else None,
                      progress=progress)
    bar.close()
    for line in alignment.warnings():
        print(f"warning: {line}", flush=True)
    # the derived spec that was matched on: its groups and sizes, blocks, verification (issue 13)
    spec = spec_of(model).summary()
    metrics = {**alignment.metrics(), "spec": spec, "params_hash": project.params_hash}
    path = artifacts.save_alignment(project, alignment)
    write_json(metrics, project.metrics_path("align"))
    plot = plot_objective({cfg.align.method: alignment.objective_history}, project.plot_path("objective.png"))
    run.log_params({"align": cfg.align.model_dump(), "spec": spec})
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    run.log_series("objective", alignment.objective_history)
    run.log_metrics({"flagged_models": len(alignment.prefilter), "dropped_models": len(alignment.dropped)})
    run.log_artifact(project.metrics_path("align"))
    run.log_artifact(plot, "plots")
    return manifest(project, [path], metrics={k: metrics[k] for k in ("objective", "cycle_error", "seconds")})

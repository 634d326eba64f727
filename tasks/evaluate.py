"""Evaluate stage task: the evaluation report as metrics, plots and the run summary, and the merged
model logged (and registered) in MLflow."""

from __future__ import annotations

import json
import time

from prefect import task

from cyclemerge.evaluate import load_into
from cyclemerge.headline import headline_metrics
from cyclemerge.io import load_torch, write_json, write_text
from cyclemerge.plots import plot_cycle_paths, plot_interpolation, plot_method_bars
from cyclemerge.report import render_summary, short_table
from cyclemerge.stages.evaluate import evaluate, summary_context
from cyclemerge.train import model_for
from tasks import artifacts
from tasks.common import STAGE_ORDER, Project, by_key, load_stage_data, manifest
from tasks.tracking import attach


@task(name="evaluate", cache_key_fn=by_key, persist_result=True)
def stage_task(project: Project, *, key: str, run_id: str | None, parent_run_id: str | None = None) -> dict:
    cfg = project.cfg
    run = attach(project, run_id)
    started = time.perf_counter()
    data = load_stage_data(project)
    model = model_for(cfg.model, data)
    ckpts = artifacts.load_checkpoints(project)
    alignment, gates = artifacts.load_alignment(project), artifacts.load_gates(project)
    final = artifacts.load_merged(project)["state_dict"]
    stats = artifacts.load_stats(project) if gates.enabled and cfg.repair.method == "repair" else None
    report = evaluate(model, [c["state_dict"] for c in ckpts], [c.get("seed") for c in ckpts], alignment, gates, final,
                      artifacts.load_baselines(project), data, cfg, endpoint_stats=stats)

    plots = {
        "Test accuracy of every method": plot_method_bars(report.rows, project.plot_path("methods.png")),
        "Interpolation between two models": plot_interpolation(report.curves, project.plot_path("interpolation.png")),
        "Cycle A → B → C → A": plot_cycle_paths(report.cycle, project.plot_path("cycle.png")),
    }
    for name in ("train_curves.png", "objective.png", "gates_heatmap.png"):
        if project.plot_path(name).exists():
            plots[name.removesuffix(".png").replace("_", " ")] = project.plot_path(name)
    write_json(report.interpolation_records(), project.plot_path("interpolation.json"))
    seconds = time.perf_counter() - started
    metrics = {**report.metrics, "seconds": seconds, "params_hash": project.params_hash}
    write_json(metrics, project.metrics_path("evaluate"))
    write_json(headline_metrics(metrics, alignment.metrics()), project.metrics_path("headline"))

    timings = {}
    for stage in STAGE_ORDER:
        p = project.metrics_path(stage)
        if p.exists() and stage != "evaluate":
            timings[stage] = (json.loads(p.read_text()).get("seconds") or 0.0)
    timings["evaluate"] = seconds
    # Wall-clock seconds go to a metrics file of their own, not into the report: equal runs give equal reports.
    write_json({**timings, "total": sum(timings.values())}, project.metrics_path("timings"))
    context = summary_context(report, cfg, alignment,
                              figures={caption: str(p.relative_to(project.root)) for caption, p in plots.items()})
    summary = write_text(render_summary(context), project.report_path("summary.md"))
    write_text(short_table(context), project.report_path("short_table.txt"))

    run.log_params({"evaluate": cfg.evaluate.model_dump()})
    run.log_metrics({f"{r['method']}.{k}": v for r in report.rows for k, v in r.items() if k.endswith(("_acc", "_loss"))
                     and v is not None})
    run.log_metrics({"merged.test_acc": metrics["merged"]["test_acc"], "merged.test_loss": metrics["merged"]["test_loss"]})
    for p in [summary, project.metrics_path("evaluate"), *plots.values()]:
        run.log_artifact(p, "plots" if str(p).endswith(".png") else None)
    if parent_run_id:
        parent = attach(project, parent_run_id)
        parent.log_metrics({"merged.test_acc": metrics["merged"]["test_acc"],
                            "endpoints.mean_test_acc": metrics["endpoints"]["mean"]["test_acc"],
                            "ensemble.test_acc": metrics["ensemble"]["test_acc"]})
        for p in [summary, *plots.values()]:
            parent.log_artifact(p, "plots" if str(p).endswith(".png") else None)
    model_uri = log_merged_model(project, run, model, final, data.test_x[:2])
    return manifest(project, [project.metrics_path("evaluate"), project.metrics_path("headline"),
                              project.metrics_path("timings"), summary], merged=metrics["merged"], model_uri=model_uri)


def log_merged_model(project: Project, run, model, state_dict, example) -> str | None:
    """The merged model in MLflow (mlflow.pytorch, pt2 format), registered under tracking.model_name,
    with its safetensors state dict and architecture beside it."""
    tcfg = project.cfg.tracking
    if not run.active:
        return None
    load_into(model, state_dict)
    model.eval()
    ck = load_torch(project.merged_path)
    uri = run.log_model(model, "merged_model", example.numpy(), tcfg.model_name if tcfg.register_model else None,
                        extra_files=[project.merged_path.with_suffix(".safetensors")],
                        metadata={"cyclemerge": {k: ck[k] for k in ("format", "model", "data")}})
    if uri:
        run.set_tags({"merged_model_uri": uri})
    return uri

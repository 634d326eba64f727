"""Gates stage: hard-concrete L0 gates over the universe-mapped, frozen models (or the uniform average)."""

from __future__ import annotations

import torch
from prefect import task
from tqdm.auto import tqdm

from cyclemerge.gate_report import gate_table, layer_weights, stat_point_weights
from cyclemerge.gate_training import learn_gates
from cyclemerge.io import load_torch, save_torch, write_json
from cyclemerge.plots import plot_gate_heatmap
from cyclemerge.train import model_for
from tasks.common import Project, by_key, load_stage_data, manifest
from tasks.tracking import attach


def gates_path(project: Project):
    return project.artifacts / "gates" / "gates.pt"


@task(name="gates", cache_key_fn=by_key, persist_result=True)
def stage_task(project: Project, *, key: str, run_id: str | None, parent_run_id: str | None = None) -> dict:
    from tasks.align import alignment_path, calibration_set

    cfg = project.cfg
    run = attach(project, run_id)
    data = load_stage_data(project)
    model = model_for(cfg.model, data)
    alignment = load_torch(alignment_path(project))
    indices = alignment["indices"]
    off = [k for k, i in enumerate(indices) if i in alignment["gate_off"]]
    # The gates learn on the calibration slice of the TRAIN split; the test split never reaches them.
    x, y = calibration_set(data, cfg.data.calibration_size)
    bar = tqdm(total=cfg.gates.steps, desc="gates", unit="step", mininterval=1.0,
               disable=None if cfg.gates.enabled else True)

    def progress(step: int, values: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{values.get('loss', float('nan')):.3f}", l0=f"{values.get('expected_l0', float('nan')):.2f}",
                        refresh=False)

    result = learn_gates(model, alignment["universe"], x, y, cfg.gates, initial_off=off, progress=progress)
    bar.close()
    names = [f"model {i}" for i in indices]
    table = gate_table(result, model_names=names)
    layers = layer_weights(result)
    parts = list(layers)
    heat = torch.stack([layers[p].reshape(-1, len(indices)).mean(0) for p in parts]) if parts else torch.zeros(0, len(indices))
    plot = plot_gate_heatmap(heat, parts, names, project.plot_path("gates_heatmap.png"),
                             title="Final gate weights (share of each layer per model)" if result.learned
                             else "Gates disabled: uniform weights")
    history = result.history
    curves = [{"step": s, "loss": history["loss"][s], "ce": history["ce"][s], "expected_l0": history["expected_l0"][s]}
              for s in range(len(history["loss"]))]
    write_json(curves, project.plot_path("gates_curves.json"))
    point_weights = stat_point_weights(result, model.stat_points())
    path = save_torch({"result": result.as_dict(), "merged": result.merged, "point_weights": point_weights,
                       "indices": indices, "table": table}, gates_path(project))
    metrics = {"enabled": cfg.gates.enabled, "granularity": result.granularity, "learned": result.learned,
               "seconds": result.seconds, "skipped_steps": result.skipped_steps,
               "final_loss": history["loss"][-1] if history["loss"] else None,
               "final_expected_l0": history["expected_l0"][-1] if history["expected_l0"] else None,
               "layer_weights": {p: [round(float(v), 4) for v in layers[p].reshape(-1, len(indices)).mean(0)] for p in parts},
               "models": names, "params_hash": project.params_hash}
    write_json(metrics, project.metrics_path("gates"))
    run.log_params({"gates": cfg.gates.model_dump()})
    run.log_metrics({"seconds": result.seconds, "skipped_steps": result.skipped_steps})
    for name in ("loss", "ce", "expected_l0"):
        run.log_series(name, history[name])
    run.log_artifact(plot, "plots")
    run.log_artifact(project.metrics_path("gates"))
    run.log_artifact(project.plot_path("gates_curves.json"))
    return manifest(project, [path], metrics={"seconds": result.seconds, "learned": result.learned})

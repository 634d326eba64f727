"""Gates stage task: hard-concrete L0 gates over the universe-mapped, frozen models (or the uniform average)."""

from __future__ import annotations

import torch
from prefect import task
from tqdm.auto import tqdm

from cyclemerge.io import write_json
from cyclemerge.plots import plot_gate_heatmap
from cyclemerge.stages.activations import calibration_slice
from cyclemerge.stages.gates import learn_gates
from cyclemerge.train import model_for
from tasks import artifacts
from tasks.common import Project, by_key, load_stage_data, manifest
from tasks.tracking import attach


@task(name="gates", cache_key_fn=by_key, persist_result=True)
def stage_task(project: Project, *, key: str, run_id: str | None, parent_run_id: str | None = None) -> dict:
    cfg = project.cfg
    run = attach(project, run_id)
    data = load_stage_data(project)
    bar = tqdm(total=cfg.gates.steps, desc="gates", unit="step", mininterval=1.0,
               disable=None if cfg.gates.enabled else True)

    def progress(step: int, values: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{values.get('loss', float('nan')):.3f}", l0=f"{values.get('expected_l0', float('nan')):.2f}",
                        refresh=False)

    # The gates learn on the calibration slice of the TRAIN split; the test split never reaches them.
    gates = learn_gates(model_for(cfg.model, data), artifacts.load_alignment(project),
                        calibration_slice(data, cfg.data.calibration_size), cfg, progress=progress)
    bar.close()
    layers, names = gates.layer_means(), gates.model_names
    heat = torch.stack(list(layers.values())) if layers else torch.zeros(0, len(names))
    plot = plot_gate_heatmap(heat, list(layers), names, project.plot_path("gates_heatmap.png"),
                             title="Final gate weights (share of each layer per model)" if gates.learned
                             else "Gates disabled: uniform weights")
    write_json(gates.curves(), project.plot_path("gates_curves.json"))
    path = artifacts.save_gates(project, gates)
    metrics = {**gates.metrics(), "params_hash": project.params_hash}
    write_json(metrics, project.metrics_path("gates"))
    run.log_params({"gates": cfg.gates.model_dump()})
    run.log_metrics({"seconds": gates.seconds, "skipped_steps": gates.skipped_steps})
    for name in ("loss", "ce", "expected_l0"):
        run.log_series(name, gates.history[name])
    run.log_artifact(plot, "plots")
    run.log_artifact(project.metrics_path("gates"))
    run.log_artifact(project.plot_path("gates_curves.json"))
    return manifest(project, [path], metrics={"seconds": gates.seconds, "learned": gates.learned})

"""Train stage tasks: one cached task per seed model, or the import of the user's checkpoints."""

from __future__ import annotations

import json
import time

import torch
from prefect import task
from tqdm.auto import tqdm

from cyclemerge.io import file_hash, load_torch, save_torch, write_json
from cyclemerge.plots import plot_training_curves
from cyclemerge.stages.train import import_models, train_model, training_summary
from tasks.common import Project, by_key, load_stage_data, manifest
from tasks.tracking import stage_run

# Keys that decide WHICH models exist, not how one model trains: one seed's cache key ignores them.
SET_KEYS = ("train.num_models", "train.seeds", "train.checkpoints")


def seed_key(project: Project, index: int, seed: int) -> str:
    """One seed model's key: what trains it (the library code and this module), not which others exist."""
    return project.stage_key("train", extra={"seed": seed, "index": index}, drop=SET_KEYS,
                             deps_only=project.library_deps("train"))


def checkpoint_files_key(project: Project) -> str:
    files = {p: (file_hash(project.root / p) if (project.root / p).exists() else "missing")
             for p in project.cfg.train.checkpoints or []}
    return project.stage_key("train", extra={"checkpoints": files})


@task(name="train-seed-model", cache_key_fn=by_key, persist_result=True)
def train_seed(project: Project, *, key: str, index: int, seed: int, parent_run_id: str | None) -> dict:
    if project.cfg.orchestration.task_runner == "dask":
        torch.set_num_threads(1)  # one core per Dask worker process; avoids oversubscription
    cfg = project.cfg
    data = load_stage_data(project)
    with stage_run(project, f"train/model_{index}", parent_run_id) as run:
        run.log_params({"seed": seed, "index": index, "model": cfg.model.model_dump(), "train": cfg.train.model_dump()})
        bar = tqdm(total=1, desc=f"train model {index} (seed {seed})", position=index, leave=True, unit="step",
                   mininterval=1.0, disable=None)

        def on_step(step: int, total: int) -> None:
            bar.total = total
            bar.update(1)

        def on_epoch(record: dict) -> None:
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_acc']:.3f}")
            run.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])

        trained = train_model(cfg, data, seed, params_hash=project.params_hash, on_epoch=on_epoch, on_step=on_step)
        bar.close()
        run.log_metrics(trained.metrics, step=len(trained.history))  # after the last epoch, not before the first
        path = save_torch(trained.checkpoint, project.model_path(index))
    return manifest(project, [path], index=index, seed=seed, metrics=trained.metrics)


@task(name="import-checkpoints", cache_key_fn=by_key, persist_result=True)
def import_user_checkpoints(project: Project, *, key: str, parent_run_id: str | None) -> list[dict]:
    """Bring the user's own checkpoints in as model_0..model_{N-1}, evaluated like trained ones."""
    cfg = project.cfg
    models = import_models([project.root / p for p in cfg.train.checkpoints], cfg, load_stage_data(project),
                           params_hash=project.params_hash)
    return [manifest(project, [save_torch(m.checkpoint, project.model_path(i))], index=i, seed=None, source=m.source,
                     metrics=m.metrics) for i, m in enumerate(models)]


@task(name="summarize-training")
def summarize_training(project: Project, results: list[dict], *, seconds: float) -> dict:
    """metrics/train.json, the training-curve plot, and stale model files of a smaller N removed."""
    keep = {project.model_path(r["index"]).name for r in results}
    for stale in project.models_dir.glob("model_*.pt"):
        if stale.name not in keep:
            stale.unlink()
    models = [{"index": r["index"], "seed": r["seed"], **r["metrics"]} for r in sorted(results, key=lambda r: r["index"])]
    previous, plot_file = project.metrics_path("train"), project.plot_path("train_curves.png")
    if all(r.get("cached") for r in results) and previous.exists() and plot_file.exists():
        old = json.loads(previous.read_text())
        if old.get("models") == models:
            # Nothing retrained: a rewrite would only change the wall time, and DVC would call train stale.
            return {"summary": old, "plot": str(plot_file), "finished": time.time()}
    summary = {**training_summary(models), "seconds": seconds, "params_hash": project.stage_params_hash("train")}
    write_json(summary, project.metrics_path("train"))
    histories = {}
    for r in results:
        ckpt = load_torch(project.model_path(r["index"]))
        if ckpt.get("history"):
            histories[f"model {r['index']} (seed {r['seed']})"] = ckpt["history"]
    plot = plot_training_curves(histories, project.plot_path("train_curves.png"))
    return {"summary": summary, "plot": str(plot), "finished": time.time()}

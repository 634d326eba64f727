"""Train stage tasks: one cached task per seed model, or the import of the user's checkpoints."""

from __future__ import annotations

import json
import time

import torch
from prefect import task
from tqdm.auto import tqdm

from cyclemerge.evaluate import accuracy_and_loss
from cyclemerge.io import load_torch, save_torch, write_json
from cyclemerge.plots import plot_training_curves
from cyclemerge.train import import_checkpoints, make_checkpoint, model_for, train_model
from tasks.common import Project, by_key, load_stage_data, manifest
from tasks.tracking import stage_run

# Keys that decide WHICH models exist, not how one model trains: one seed's cache key ignores them.
SET_KEYS = ("train.num_models", "train.seeds", "train.checkpoints")


def seed_key(project: Project, index: int, seed: int) -> str:
    return project.stage_key("train", extra={"seed": seed, "index": index}, drop=SET_KEYS,
                             deps_only=("cyclemerge/data", "cyclemerge/models", "cyclemerge/train.py", "tasks/train.py"))


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

        result = train_model(cfg.model, cfg.train, data, seed, on_epoch=on_epoch, on_step=on_step)
        bar.close()
        model = model_for(cfg.model, data)
        model.load_state_dict(result.state_dict)
        test = accuracy_and_loss(model, data.test_x, data.test_y, batch_size=cfg.evaluate.batch_size)
        metrics = {"test_acc": test["acc"], "test_loss": test["loss"],
                   "train_acc": result.history[-1]["train_acc"], "train_loss": result.history[-1]["train_loss"],
                   "seconds": result.seconds}
        run.log_metrics(metrics, step=len(result.history))  # after the last epoch, not before the first
        path = save_torch(make_checkpoint(result.state_dict, cfg.model, data, seed=seed, params_hash=project.params_hash,
                                          metrics=metrics, history=result.history), project.model_path(index))
    return manifest(project, [path], index=index, seed=seed, metrics=metrics)


@task(name="import-checkpoints", cache_key_fn=by_key, persist_result=True)
def import_user_checkpoints(project: Project, *, key: str, parent_run_id: str | None) -> list[dict]:
    """Bring the user's own checkpoints in as model_0..model_{N-1}, evaluated like trained ones."""
    cfg = project.cfg
    data = load_stage_data(project)
    paths = [project.root / p for p in cfg.train.checkpoints]
    state_dicts = import_checkpoints(paths, cfg.model, data)
    model = model_for(cfg.model, data)
    out = []
    for i, (src, sd) in enumerate(zip(paths, state_dicts)):
        finite = all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point())
        metrics = {"test_acc": float("nan"), "test_loss": float("nan")}
        if finite:
            model.load_state_dict(sd)
            test = accuracy_and_loss(model, data.test_x, data.test_y, batch_size=cfg.evaluate.batch_size)
            metrics = {"test_acc": test["acc"], "test_loss": test["loss"]}
        path = save_torch(make_checkpoint(sd, cfg.model, data, seed=None, params_hash=project.params_hash,
                                          metrics=metrics, source=str(src)), project.model_path(i))
        out.append(manifest(project, [path], index=i, seed=None, source=str(src), metrics=metrics))
    return out


def checkpoint_files_key(project: Project) -> str:
    from cyclemerge.io import file_hash

    files = {p: (file_hash(project.root / p) if (project.root / p).exists() else "missing")
             for p in project.cfg.train.checkpoints or []}
    return project.stage_key("train", extra={"checkpoints": files})


@task(name="summarize-training")
def summarize_training(project: Project, results: list[dict], *, seconds: float, run_id: str | None) -> dict:
    """metrics/train.json, the training-curve plot, and stale model files of a smaller N removed."""
    keep = {project.model_path(r["index"]).name for r in results}
    for stale in (project.artifacts / "models").glob("model_*.pt"):
        if stale.name not in keep:
            stale.unlink()
    models = [{"index": r["index"], "seed": r["seed"], **r["metrics"]} for r in sorted(results, key=lambda r: r["index"])]
    previous, plot_file = project.metrics_path("train"), project.plot_path("train_curves.png")
    if all(r.get("cached") for r in results) and previous.exists() and plot_file.exists():
        old = json.loads(previous.read_text())
        if old.get("models") == models:
            # Nothing retrained: a rewrite would only change the wall time, and DVC would call train stale.
            return {"summary": old, "plot": str(plot_file), "finished": time.time()}
    accs = [m["test_acc"] for m in models if m["test_acc"] == m["test_acc"]]
    summary = {"models": models, "mean_test_acc": sum(accs) / len(accs) if accs else None,
               "min_test_acc": min(accs) if accs else None, "seconds": seconds,
               "params_hash": project.stage_params_hash("train")}
    write_json(summary, project.metrics_path("train"))
    histories = {}
    for r in results:
        ckpt = load_torch(project.model_path(r["index"]))
        if ckpt.get("history"):
            histories[f"model {r['index']} (seed {r['seed']})"] = ckpt["history"]
    plot = plot_training_curves(histories, project.plot_path("train_curves.png"))
    from tasks.tracking import Run  # noqa: F401 - the stage run is owned by the flow
    return {"summary": summary, "plot": str(plot), "finished": time.time()}

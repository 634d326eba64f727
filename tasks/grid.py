"""Grid tasks: train a seed model into the shared model cache, lay out a point's project folder,
and record a finished point (table rows, MLflow tags and metrics)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from prefect import task

from cyclemerge.config import Config, dump_params
from cyclemerge.data import load_data
from cyclemerge.grid import GridFile, GridPoint, merge_rows, point_rows, read_csv, to_csv, to_markdown
from cyclemerge.io import save_torch, write_text
from cyclemerge.stages.train import train_model
from tasks.common import Project
from tasks.tracking import attach

# What a point folder links from the repository: the code its stage cache keys hash, and dvc.yaml.
LINKED = ("cyclemerge", "tasks", "flows", "dvc.yaml")


@task(name="grid-train-seed-model")
def train_to_cache(cfg: Config, seed: int, path: Path, data_dir: Path, threads: int = 1) -> dict:
    """Train one seed model of the point's recipe and store it where every later point finds it."""
    torch.set_num_threads(threads)
    data = load_data(cfg.data, project_dir=data_dir)
    trained = train_model(cfg, data, seed, params_hash=cfg.section_hash("data", "model", "train"), source="grid")
    save_torch(trained.checkpoint, path)
    m = trained.metrics
    print(f"  trained seed {seed}: test acc {100 * m['test_acc']:.2f}% in {m['seconds']:.0f} s -> {path}", flush=True)
    return {"seed": seed, "path": str(path), **m}


@task(name="grid-point-folder")
def point_folder(repo: Path, folder: Path, cfg: Config) -> Path:
    """A project folder for one point: its params.yaml and links to the repository's code."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = folder / name
        if not link.exists():
            os.symlink(repo / name, link)
    write_text(dump_params(cfg), folder / "params.yaml")
    return folder


@task(name="grid-record-point")
def record_point(grid: GridFile, point: GridPoint, folder: Path, parent_run_id: str | None, table_csv: Path,
                 table_md: Path, skipped: dict[str, str]) -> list[dict]:
    """Rows of one point into the grid's CSV and markdown tables, and onto the point's MLflow run."""
    project = Project.load(folder)
    evaluation = json.loads(project.metrics_path("evaluate").read_text())
    alignment = json.loads(project.metrics_path("align").read_text())
    rows = point_rows(grid, point, evaluation, alignment)
    write_tables.fn(grid, rows, table_csv, table_md, skipped)
    run = attach(project, parent_run_id)
    run.set_tags({"grid": grid.name, "grid.point": point.id, "grid.dataset": point.cfg.data.name,
                  "grid.arch": rows[0]["arch"], "grid.N": str(point.num_models),
                  **{f"grid.{k}": str(v) for k, v in point.axes.items()}})
    # MLflow metric names allow no "+": c2m3+repair is logged as grid.c2m3.repair.test_acc.
    for r in rows:
        name = f"grid.{r['method'].replace('+', '.')}"
        run.log_metrics({f"{name}.test_acc": r["test_acc"], f"{name}.test_loss": r["test_loss"]})
    return rows


@task(name="grid-write-tables")
def write_tables(grid: GridFile, rows: list[dict], table_csv: Path, table_md: Path, skipped: dict[str, str]) -> None:
    """Merge ``rows`` into the CSV (rows of other points and grids are kept) and redraw the markdown."""
    all_rows = merge_rows(read_csv(table_csv), rows)
    write_text(to_csv(all_rows), table_csv)
    write_text(to_markdown(grid, [r for r in all_rows if r["grid"] == grid.name], skipped), table_md)

"""The comparison grid as a Prefect flow: methods x N x architecture x dataset from a grid file.

    python -m flows.grid benchmarks/grids/paper.yaml        # the C2M3 paper's table, our datasets
    python -m flows.grid benchmarks/grids/width.yaml        # MLP width sweep
    python -m flows.grid benchmarks/grids/width.yaml --only '*hidden=32*'

Each point is one run of the pipeline flow in its own project folder (``.cache/grid/<grid>/<point>``),
fed with seed models from a cache shared by every point and grid (``.cache/grid/models``, keyed by
the training recipe and seed), so N = 2, 3, 5 and every method reuse the same trained models, and
a rerun recomputes only what changed. Rows go to ``benchmarks/results/grid_<name>.csv`` and ``.md``
and onto each point's MLflow run (experiment ``<tracking.experiment>-grid``, tagged ``grid``,
``grid.point``, ``grid.arch``, ``grid.N``).
"""

from __future__ import annotations

import flows._env  # noqa: F401  (must precede prefect and mlflow imports)

import argparse
import fnmatch
import os
import sys
import time
from pathlib import Path

import torch
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from cyclemerge.config import ConfigError, config_from_dict
from cyclemerge.grid import GridError, expand, load_grid, model_cache_path
from flows.pipeline import pipeline
from tasks.common import Project
from tasks.grid import point_folder, record_point, train_to_cache, write_tables
from tasks.tracking import resolve_uri


def base_params(project: Project) -> dict:
    """params.yaml with every relative location made absolute: points run in other folders."""
    raw = project.cfg.model_dump(mode="json")
    root = Path(raw["data"]["root"])
    raw["data"]["root"] = str(root if root.is_absolute() else project.root / root)
    raw["tracking"]["uri"] = resolve_uri(project)
    raw["tracking"]["experiment"] = f"{raw['tracking']['experiment']}-grid"
    return raw


def plan(grid_file: str, params: str, only: list[str] | None, project_dir: str | None):
    """The grid, the base project and the points to run; every input error surfaces here."""
    grid = load_grid(grid_file)
    base = Project.load(project_dir or flows._env.ROOT, params)
    points = expand(grid, base_params(base), source=grid_file)
    if only:
        points = [p for p in points if any(fnmatch.fnmatch(p.id, pat) for pat in only)]
        if not points:
            raise GridError(f"{grid_file}: no point matches --only {' '.join(only)}")
    return grid, base, points


@flow(name="cyclemerge-grid", task_runner=ThreadPoolTaskRunner(max_workers=2))
def grid_flow(grid_file: str, params: str = "params.yaml", only: list[str] | None = None,
              out_dir: str = "benchmarks/results", work_dir: str = ".cache/grid",
              project_dir: str | None = None) -> list[dict]:
    """Run every point of the grid (``only``: glob patterns on point ids); paths are relative to the project."""
    repo = Path(flows._env.ROOT)
    grid, base, points = plan(grid_file, params, only, project_dir)
    work, cache = base.root / work_dir, base.root / work_dir / "models"
    table_csv, table_md = base.root / out_dir / f"grid_{grid.name}.csv", base.root / out_dir / f"grid_{grid.name}.md"
    workers = base.cfg.orchestration.max_workers
    skipped: dict[str, str] = {}
    rows: list[dict] = []
    for point in tqdm(points, desc=f"grid {grid.name}", unit="point", disable=None):
        if point.requires == "cuda" and not torch.cuda.is_available():
            skipped[point.id] = "needs a CUDA GPU; this machine has none"
            print(f"[grid] {point.id}: skipped ({skipped[point.id]})", flush=True)
            continue
        started = time.perf_counter()
        seeds = point.cfg.train.model_seeds()
        paths = [model_cache_path(cache, point.cfg, s) for s in seeds]
        threads = max(1, (os.cpu_count() or 1) // workers)
        jobs = [train_to_cache.submit(point.cfg, s, p, base.root, threads=threads) for s, p in zip(seeds, paths)
                if not p.exists()]
        for job in jobs:
            job.result()
        dumped = point.cfg.model_dump(mode="json")
        dumped["train"]["checkpoints"] = [str(p) for p in paths]
        cfg = config_from_dict(dumped, source=f"{grid_file}: point {point.id}")
        folder = point_folder(repo, work / grid.name / point.id, cfg)
        result = pipeline(params=str(folder / "params.yaml"), project_dir=str(folder))
        point_rows = record_point(grid, point, folder, result["parent_run_id"], table_csv, table_md, skipped)
        rows += point_rows
        accs = ", ".join(f"{r['method']} {100 * r['test_acc']:.2f}" for r in point_rows)
        print(f"[grid] {point.id}: {time.perf_counter() - started:.0f} s ({len(jobs)} models trained); {accs}",
              flush=True)
    write_tables(grid, [], table_csv, table_md, skipped)
    print(f"[grid] table: {table_md}  ({len(rows)} rows from {len(points) - len(skipped)} points; "
          f"{len(skipped)} skipped)")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.grid", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", help="grid file, e.g. benchmarks/grids/paper.yaml")
    ap.add_argument("--params", default="params.yaml", help="base params every point starts from")
    ap.add_argument("--only", action="append", default=[], metavar="PATTERN",
                    help="run only points whose id matches this glob (repeatable)")
    ap.add_argument("--out", default="benchmarks/results", help="folder of the grid's CSV and markdown tables")
    ap.add_argument("--work", default=".cache/grid", help="point folders and the shared model cache")
    args = ap.parse_args(argv)
    try:
        plan(args.grid, args.params, args.only or None, None)  # bad input fails here, before a flow run starts
        grid_flow(args.grid, params=args.params, only=args.only or None, out_dir=args.out, work_dir=args.work)
        return 0
    except (GridError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

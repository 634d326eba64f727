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
import subprocess
import sys
import time
from pathlib import Path

import torch
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from cyclemerge.config import ConfigError, config_from_dict
from cyclemerge.grid import GridError, expand, load_grid, model_cache_path
from flows.pipeline import make_task_runner, pipeline
from tasks.common import Project
from tasks.grid import point_folder, record_point, train_to_cache, write_tables
from tasks.tracking import PARENT_ENV, resolve_uri, start_parent


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


@task(name="grid-point")
def run_point(folder: Path, cfg, point_id: str, threads: int, api_url: str) -> dict:
    """One point's whole pipeline in a process of its own, side by side with the others.

    A process, not a thread: torch.fx and torch.export (the spec of a custom model, the merged model
    logged to MLflow) patch ``nn.Module.__call__`` for the whole process while they trace, which
    breaks any other point's forward pass running at that moment.
    """
    started = time.perf_counter()
    folder = point_folder(Path(flows._env.ROOT), folder, cfg)
    parent = start_parent(Project.load(folder))  # made here, so that this point's rows land on its own run
    env = {**os.environ, "CYCLEMERGE_PROJECT": str(folder), "PREFECT_API_URL": api_url,
           "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **({PARENT_ENV: parent} if parent else {})}
    log = folder / "pipeline.log"
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml"], cwd=folder,
                              env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"grid point {point_id} failed (exit {done.returncode}); its log is {log}:\n{tail}")
    return {"point": point_id, "folder": folder, "parent_run_id": parent,
            "seconds": time.perf_counter() - started}


def flow_api_url() -> str:
    """The Prefect API this process reports to, for the point processes to share: without it each
    would start an ephemeral server of its own (seconds each)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the ephemeral server of this process's flow run (one per process)
    server.start()  # a no-op when it runs already
    return server.api_url


def with_cached_models(point, paths: list[Path], grid_file: str):
    """The point's config reading its seed models from the shared cache instead of training them."""
    dumped = point.cfg.model_dump(mode="json")
    dumped["train"]["checkpoints"] = [str(p) for p in paths]
    return config_from_dict(dumped, source=f"{grid_file}: point {point.id}")


@flow(name="cyclemerge-grid", task_runner=ThreadPoolTaskRunner(max_workers=2))
def grid_flow(grid_file: str, params: str = "params.yaml", only: list[str] | None = None,
              out_dir: str = "benchmarks/results", work_dir: str = ".cache/grid",
              project_dir: str | None = None) -> list[dict]:
    """Run every point of the grid (``only``: glob patterns on point ids); paths are relative to the project.

    First every seed model no cache holds yet is trained, then the points run; both side by side on
    the flow's task runner (threads by default, Dask with ``orchestration.task_runner: dask``), each
    with its share of the cores, so a grid keeps every core busy.
    """
    grid, base, points = plan(grid_file, params, only, project_dir)
    work, cache = base.root / work_dir, base.root / work_dir / "models"
    table_csv, table_md = base.root / out_dir / f"grid_{grid.name}.csv", base.root / out_dir / f"grid_{grid.name}.md"
    workers = 1 if base.cfg.orchestration.task_runner == "sequential" else base.cfg.orchestration.max_workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    skipped: dict[str, str] = {}
    runnable = []
    for point in points:
        if point.requires == "cuda" and not torch.cuda.is_available():
            skipped[point.id] = "needs a CUDA GPU; this machine has none"
            print(f"[grid] {point.id}: skipped ({skipped[point.id]})", flush=True)
        else:
            paths = [model_cache_path(cache, point.cfg, s) for s in point.cfg.train.model_seeds()]
            runnable.append((point, paths))
    missing = {p: (point.cfg, s) for point, paths in runnable
               for s, p in zip(point.cfg.train.model_seeds(), paths) if not p.exists()}
    jobs = [train_to_cache.submit(cfg, s, p, base.root, threads=threads) for p, (cfg, s) in missing.items()]
    for job in tqdm(jobs, desc=f"grid {grid.name}: seed models", unit="model", disable=True if not jobs else None):
        job.result()
    api_url = flow_api_url()
    futures = [run_point.submit(work / grid.name / point.id, with_cached_models(point, paths, grid_file), point.id,
                                threads, api_url) for point, paths in runnable]
    rows: list[dict] = []
    # Recorded here, one point at a time in submission order: the tables are rewritten by each record.
    for (point, _), future in tqdm(list(zip(runnable, futures)), desc=f"grid {grid.name}", unit="point",
                                   disable=None):
        done = future.result()
        point_rows = record_point(grid, point, done["folder"], done["parent_run_id"], table_csv, table_md, skipped)
        rows += point_rows
        accs = ", ".join(f"{r['method']} {100 * r['test_acc']:.2f}" for r in point_rows)
        print(f"[grid] {point.id}: {done['seconds']:.0f} s; {accs}", flush=True)
    write_tables(grid, [], table_csv, table_md, skipped)
    print(f"[grid] table: {table_md}  ({len(rows)} rows from {len(runnable)} points, {len(missing)} models trained; "
          f"{len(skipped)} skipped)")
    return rows


def run_grid(grid_file: str, params: str = "params.yaml", only: list[str] | None = None, **kwargs) -> list[dict]:
    """The grid flow on the task runner ``orchestration`` configures in the base params."""
    _, base, _ = plan(grid_file, params, only, kwargs.get("project_dir"))
    return grid_flow.with_options(task_runner=make_task_runner(base))(grid_file, params=params, only=only, **kwargs)


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
        # bad input fails in plan(), before a flow run starts
        run_grid(args.grid, params=args.params, only=args.only or None, out_dir=args.out, work_dir=args.work)
        return 0
    except (GridError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

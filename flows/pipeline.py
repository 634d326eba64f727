"""The cyclemerge pipeline as Prefect flows, and the command line.

    python -m flows.pipeline                    # the whole DAG as one Prefect flow run
    python -m flows.pipeline --stage gates      # one stage (what dvc.yaml's `python -m flows.stage gates` runs)
    python -m flows.pipeline --run-dvc          # `dvc repro` under one MLflow parent run, then a summary
    python -m flows.pipeline --set gates.lam=0.1 --force gates

Every stage task is cached on its params, its inputs' content and its code (tasks/common.py), so a
rerun with nothing changed recomputes nothing, and a changed gates param reruns gates -> repair ->
evaluate only.
"""

from __future__ import annotations

import flows._env  # noqa: F401  (must precede prefect and mlflow imports)

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from prefect import flow

from cyclemerge.config import ConfigError
from cyclemerge.data import DataError
from cyclemerge.stages.align import TooFewModelsError
from cyclemerge.train import CheckpointError
from flows.expected_errors import quiet_expected_errors
from tasks import activations as t_act
from tasks import align as t_align
from tasks import baselines as t_base
from tasks import evaluate as t_eval
from tasks import gates as t_gates
from tasks import repair as t_repair
from tasks import train as t_train
from tasks.artifacts import model_files
from tasks.common import STAGE_ORDER, LockedError, Project, ProjectLock, resolve, run_cached
from tasks.tracking import PARENT_ENV, TrackingError, finish_parent, stage_run, start_parent

# One message and an exit code for these (main() below); Prefect's run logs stay silent about them.
EXPECTED_ERRORS = (ConfigError, LockedError, CheckpointError, DataError, TooFewModelsError, TrackingError)
quiet_expected_errors(EXPECTED_ERRORS)


# The stages that fan out one task per model; only they are worth a Dask cluster.
FAN_OUT_STAGES = ("train", "activations")


def make_task_runner(project: Project, stage: str | None = None):
    orch = project.cfg.orchestration
    if orch.task_runner == "dask" and (stage is None or stage in FAN_OUT_STAGES):
        from prefect_dask import DaskTaskRunner

        if orch.dask_address:
            return DaskTaskRunner(address=orch.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": orch.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if orch.task_runner == "sequential" or (orch.task_runner == "dask" and stage not in FAN_OUT_STAGES):
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=orch.max_workers)


def _api_for_workers(runner):
    """Point Dask worker processes at this process's Prefect API.

    Without an API URL every process starts its own ephemeral Prefect server; a Dask worker then
    spends most of a minute starting one before its first task. Tasks carry the settings context to
    the workers, so setting the URL here reaches them.
    """
    from contextlib import nullcontext

    from prefect.settings import PREFECT_API_URL, temporary_settings

    if type(runner).__name__ != "DaskTaskRunner" or PREFECT_API_URL.value():
        return nullcontext()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return temporary_settings(updates={PREFECT_API_URL: server.api_url})


def _stage_done(project: Project, stage: str, started: float, result: dict) -> dict:
    seconds = time.perf_counter() - started
    cached = result.get("cached", False)
    print(f"[{stage:>11}] {'cached' if cached else 'done'} in {seconds:6.1f} s", flush=True)
    return {"stage": stage, "seconds": seconds, **result}


@flow(name="cyclemerge-train")
def train_flow(project: Project, force: bool = False, parent_run_id: str | None = None) -> dict:
    cfg = project.cfg
    started = time.perf_counter()
    orch = cfg.orchestration
    threads = torch.get_num_threads()
    if orch.task_runner == "threads" and orch.max_workers > 1:
        # Seeds train side by side: one torch thread each beats two threads fighting over each core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // orch.max_workers))
    try:
        return _train(project, force, parent_run_id, started)
    finally:
        torch.set_num_threads(threads)  # the stages after it, in this process, get every core back


def _train(project: Project, force: bool, parent_run_id: str | None, started: float) -> dict:
    cfg = project.cfg
    with stage_run(project, "train", parent_run_id) as run:
        if cfg.train.checkpoints:
            key = t_train.checkpoint_files_key(project)
            results = run_cached(t_train.import_user_checkpoints, project, key=key, force=force, parent_run_id=run.run_id)
        else:
            seeds = cfg.train.model_seeds()
            jobs = []
            for i, seed in enumerate(seeds):
                key = t_train.seed_key(project, i, seed)
                kwargs = {"index": i, "seed": seed, "parent_run_id": run.run_id}
                jobs.append((key, kwargs, run_cached(t_train.train_seed, project, key=key, force=force, wait=False, **kwargs)))
            results = [resolve(t_train.train_seed, project, fut, key=key, **kw) for key, kw, fut in jobs]
        results = results if isinstance(results, list) else [results]
        summary = t_train.summarize_training(project, results, seconds=time.perf_counter() - started)
        summary["cached"] = all(r.get("cached") for r in results)
        run.log_metrics({f"model_{m['index']}.test_acc": m["test_acc"] for m in summary["summary"]["models"]})
        run.log_metrics({"mean_test_acc": summary["summary"]["mean_test_acc"] or float("nan")})
        run.log_artifact(project.metrics_path("train"))
        run.log_artifact(summary["plot"], "plots")
    return summary


@flow(name="cyclemerge-activations")
def activations_flow(project: Project, force: bool = False, parent_run_id: str | None = None) -> dict:
    """One statistics task per model (side by side on the configured task runner), then the correlations."""
    key = project.stage_key("activations")
    with stage_run(project, "activations", parent_run_id):
        n = len(model_files(project))
        jobs = [(f"{key}-model{i}", i) for i in range(n)]
        futures = [run_cached(t_act.model_stats, project, key=k, force=force, wait=False, index=i) for k, i in jobs]
        results = [resolve(t_act.model_stats, project, fut, key=k, index=i) for (k, i), fut in zip(jobs, futures)]
        if project.cfg.activations.correlations:
            results.append(run_cached(t_act.cross_correlations, project, key=f"{key}-corr", force=force))
        return t_act.summarize_activations(project, results, models=n)


def _single_stage(stage_module, name: str):
    @flow(name=f"cyclemerge-{name}")
    def stage_flow(project: Project, force: bool = False, parent_run_id: str | None = None) -> dict:
        key = project.stage_key(name)
        with stage_run(project, name, parent_run_id) as run:
            # Under `dvc repro` the parent comes from the environment: the stage run knows it.
            kwargs = {"run_id": run.run_id, "parent_run_id": parent_run_id or run.parent_id}
            return run_cached(stage_module.stage_task, project, key=key, force=force, **kwargs)

    return stage_flow


align_flow = _single_stage(t_align, "align")
baselines_flow = _single_stage(t_base, "baselines")
gates_flow = _single_stage(t_gates, "gates")
repair_flow = _single_stage(t_repair, "repair")
evaluate_flow = _single_stage(t_eval, "evaluate")

STAGE_FLOWS = {"train": train_flow, "activations": activations_flow, "align": align_flow,
               "baselines": baselines_flow, "gates": gates_flow, "repair": repair_flow, "evaluate": evaluate_flow}


def run_stage(project: Project, stage: str, force: bool = False, parent_run_id: str | None = None) -> dict:
    runner = make_task_runner(project, stage)
    stage_flow = STAGE_FLOWS[stage].with_options(task_runner=runner)
    started = time.perf_counter()
    with _api_for_workers(runner):
        result = stage_flow(project, force=force, parent_run_id=parent_run_id)
    return _stage_done(project, stage, started, result if isinstance(result, dict) else {"results": result})


@flow(name="cyclemerge-pipeline")
def pipeline(params: str = "params.yaml", overrides: list[str] | None = None, force: list[str] | None = None,
             project_dir: str | None = None) -> dict:
    """The whole DAG: train -> activations -> align (and baselines) -> gates -> repair -> evaluate."""
    project = Project.load(project_dir or flows._env.ROOT, params, overrides or [])
    force = set(force or [])
    timings = {}
    with ProjectLock(project):  # first: a refused run must leave no trace, not even an MLflow run
        # A caller that made the run (a grid point run in its own process) passes it in the environment.
        parent = os.environ.get(PARENT_ENV) or start_parent(project)
        status = "FAILED"
        try:
            for stage in STAGE_ORDER:
                out = run_stage(project, stage, force=stage in force or "all" in force, parent_run_id=parent)
                timings[stage] = {"seconds": out["seconds"], "cached": out.get("cached", False)}
            status = "FINISHED"
        finally:
            finish_parent(project, parent, status)
    return {"stages": timings, "parent_run_id": parent}


def run_dvc(project: Project, force: list[str]) -> int:
    """`dvc repro` under one MLflow parent run, so its stage processes nest their runs under it, on
    one Prefect API, which they share instead of each starting a server of its own (flows/_env.py),
    and with one stage server, which has the stack imported for all of them (flows/stage_server.py)."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    from flows.stage_server import serving
    from flows.uptodate import up_to_date
    from tasks.tracking import resolve_uri

    if not force and up_to_date(project.root):
        return 0  # nothing is stale: no server, no parent run (nothing ran), as `make run` does
    with ProjectLock(project), ExitStack() as stack:
        with ThreadPoolExecutor(max_workers=1) as pool:
            # The server starts while MLflow opens the parent run: seconds each, so side by side.
            api = pool.submit(stack.enter_context, flows._env.shared_prefect_api())
            parent = start_parent(project)
        env = dict(os.environ)
        if parent:
            env[PARENT_ENV] = parent
        env["CYCLEMERGE_LOCK_HELD"] = "1"
        dvc = str(Path(sys.executable).with_name("dvc"))
        status = "FAILED"
        try:
            env["PREFECT_API_URL"] = api.result()
            # Started now: Prefect reads its settings (the API's URL) once, when the server imports it.
            env.update(stack.enter_context(serving(env, project.root, resolve_uri(project) if parent else None)))
            if not (project.root / ".dvc").exists():
                subprocess.run([dvc, "init", "-q"], cwd=project.root, check=True, env=env)
            rc = 0
            for stage in force:  # forced stages first, alone; the plain repro then reruns what they changed
                cmd = [dvc, "repro", "--force"] + ([] if stage == "all" else ["--single-item", stage])
                rc = rc or subprocess.run(cmd, cwd=project.root, env=env).returncode
            rc = rc or subprocess.run([dvc, "repro"], cwd=project.root, env=env).returncode
            status = "FINISHED" if rc == 0 else "FAILED"
            return rc
        finally:
            finish_parent(project, parent, status)


def print_summary(project: Project) -> None:
    table = project.root / "reports" / "short_table.txt"
    if table.exists():
        print("\n" + table.read_text())
    print("\nWhere to look next:")
    print(f"  report        {project.root / 'reports' / 'summary.md'}")
    print(f"  metrics       {project.root / 'metrics'}/*.json   (dvc metrics show)")
    print(f"  plots         {project.root / 'plots'}/*.png")
    print(f"  MLflow UI     make ui   (then open http://127.0.0.1:5000; store {project.cfg.tracking.uri})")


def _no_flow_heartbeat():
    """A stage process run by DVC in the foreground: no heartbeat thread, whose join at the end of
    every flow costs up to a second. Heartbeats let a server notice crashed deployment runs; here the
    process's exit code already says so."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a param, e.g. --set gates.lam=0.1 (repeatable)")
    ap.add_argument("--stage", choices=STAGE_ORDER, help="run one stage only (what dvc.yaml runs, through flows.stage)")
    ap.add_argument("--force", action="append", default=[], metavar="STAGE",
                    help=f"recompute a stage even if cached: one of {', '.join(STAGE_ORDER)} or 'all' (repeatable)")
    ap.add_argument("--run-dvc", action="store_true", help="run `dvc repro` under one MLflow parent run")
    args = ap.parse_args(argv)
    for f in args.force:
        if f not in STAGE_ORDER and f != "all":
            ap.error(f"--force {f}: unknown stage; choose from {', '.join(STAGE_ORDER)} or all")
    try:
        project = Project.load(flows._env.ROOT, args.params, args.overrides)
        if args.run_dvc:
            rc = run_dvc(project, args.force)
            if rc == 0:
                print_summary(project)
            return rc
        if args.stage:
            with _no_flow_heartbeat():
                if os.environ.get("CYCLEMERGE_LOCK_HELD"):
                    run_stage(project, args.stage, force=args.stage in args.force or "all" in args.force)
                else:
                    with ProjectLock(project):
                        run_stage(project, args.stage, force=args.stage in args.force or "all" in args.force)
            return 0
        pipeline(params=str(project.params_path), overrides=args.overrides, force=args.force,
                 project_dir=str(project.root))
        print_summary(project)
        return 0
    except (ConfigError, LockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError, TooFewModelsError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every finished stage is kept; run the same command again to resume after the last "
              "finished stage", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

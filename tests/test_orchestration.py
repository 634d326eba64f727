"""Orchestration for real use: cached reruns that agree with DVC, --force, schedules, Dask.

One tiny project is run three times (fresh, unchanged, a gates change) and the other tests read
what those runs left behind, so the module pays for one real pipeline run and two mostly cached ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tasks.common import STAGE_ORDER
from tests.conftest import REPO, make_project

pytestmark = pytest.mark.slow
STAGES = STAGE_ORDER


def prefect_keys(root: Path) -> dict[str, object]:
    """Every stage's Prefect cache key as the flow would compute it now (train: one per seed)."""
    from tasks.common import Project
    from tasks.train import seed_key

    project = Project.load(root)
    keys: dict[str, object] = {"train": sorted(seed_key(project, i, s)
                                               for i, s in enumerate(project.cfg.train.model_seeds()))}
    keys.update({stage: project.stage_key(stage) for stage in STAGES[1:]})
    return keys


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def dvc_stale(root: Path) -> set[str]:
    out = dvc(root, "status", "--json")
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout or "{}"))


def set_param(root: Path, dotted: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def recomputed(out: dict) -> list[str]:
    return [s for s in STAGES if not out["stages"][s]["cached"]]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    # One worker per core gives each seed model one torch thread, as a Dask worker has: float sums
    # then add up in the same order, so the threads and Dask runs can be compared bit for bit.
    return make_project(tmp_path_factory.mktemp("orch") / "proj",
                        {"orchestration": {"max_workers": os.cpu_count() or 1}})


@pytest.fixture(scope="module")
def runs(project, prefect_harness) -> dict:
    """Fresh run, unchanged rerun, DVC's lock recorded, then a gates-only change in params.yaml."""
    from flows.pipeline import pipeline

    def run() -> dict:
        return pipeline(params=str(project / "params.yaml"), project_dir=str(project))

    out = {"first": run(), "second": run()}
    assert dvc(project, "init", "--no-scm", "-q").returncode == 0
    commit = dvc(project, "commit", "-f")
    assert commit.returncode == 0, commit.stderr
    out["dvc_clean"] = dvc_stale(project)
    out["keys_before_gates"] = prefect_keys(project)
    set_param(project, "gates.lam", 0.05)
    out["keys_after_gates"] = prefect_keys(project)
    out["dvc_before_gates_run"] = dvc_stale(project)
    out["gates"] = run()
    out["dvc_after_gates_run"] = dvc_stale(project)
    return out


def test_second_run_with_nothing_changed_recomputes_nothing(runs):
    assert recomputed(runs["first"]) == list(STAGES)
    assert recomputed(runs["second"]) == []
    # Same artifacts, same parent run layout: the cached run is a full run, not a skipped one.
    assert runs["second"]["parent_run_id"] and runs["second"]["parent_run_id"] != runs["first"]["parent_run_id"]


def test_a_gates_param_recomputes_gates_repair_evaluate_only_and_dvc_agrees(runs):
    assert runs["dvc_clean"] == set()
    changed = {s for s in STAGES if runs["keys_before_gates"][s] != runs["keys_after_gates"][s]}
    # Before anything reruns, both caches see the stages whose params moved: gates, and evaluate,
    # whose run summary names gates.lam.
    assert changed == runs["dvc_before_gates_run"] == {"gates", "evaluate"}
    assert recomputed(runs["gates"]) == ["gates", "repair", "evaluate"]
    # After the Prefect run, DVC (whose lock still describes the old run) calls stale exactly what
    # Prefect recomputed: the gates params, and the artifacts that changed downstream of them.
    assert runs["dvc_after_gates_run"] == {"gates", "repair", "evaluate"}


@pytest.fixture(scope="module")
def committed(runs, project) -> Path:
    """DVC's lock brought up to date with the project as the gates run left it."""
    out = dvc(project, "commit", "-f")
    assert out.returncode == 0, out.stderr
    assert dvc_stale(project) == set()
    return project


@pytest.mark.parametrize("dotted, value, stale", [
    ("evaluate.interpolation_steps", 5, {"evaluate"}),
    # align's restart scoring repairs each candidate; the baselines are repaired too
    ("repair.num_samples", 60, {"align", "baselines", "repair", "evaluate"}),
    ("repair.method", "reset_bn", {"align", "baselines", "repair", "evaluate"}),
    ("activations.num_samples", 60, {"activations"}),
    ("train.epochs", 2, {"train"}),
    ("train.num_models", 4, {"train", "evaluate"}),  # the run summary names N
    ("data.seed", 1, set(STAGES)),
])
def test_prefect_keys_and_dvc_status_name_the_same_stale_stages(committed, dotted, value, stale):
    project = committed
    before = prefect_keys(project)
    saved = (project / "params.yaml").read_text()
    try:
        set_param(project, dotted, value)
        after = prefect_keys(project)
        by_prefect = {s for s in STAGES if before[s] != after[s]}
        assert by_prefect == dvc_stale(project) == stale
    finally:
        (project / "params.yaml").write_text(saved)
    assert prefect_keys(project) == before


def test_force_reruns_the_named_stage_from_the_cli(runs, project, monkeypatch, capsys):
    import flows._env
    from flows.pipeline import main

    monkeypatch.setattr(flows._env, "ROOT", project)
    before = (project / "metrics" / "evaluate.json").stat().st_mtime_ns
    assert main(["--force", "evaluate"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    status = {ln[1:12].strip(): ln.split("]")[1].split()[0] for ln in lines}
    assert status == {**{s: "cached" for s in STAGES[:-1]}, "evaluate": "done"}
    assert (project / "metrics" / "evaluate.json").stat().st_mtime_ns > before


def test_force_of_an_unknown_stage_is_a_usage_error(capsys):
    from flows.pipeline import main

    with pytest.raises(SystemExit) as exc:
        main(["--force", "gate"])
    assert exc.value.code == 2
    assert "--force gate: unknown stage; choose from train, activations" in capsys.readouterr().err


def test_serve_builds_a_scheduled_deployment_and_a_run_of_it_completes(runs, project):
    """What `python -m flows.serve --cron ... --set ...` serves, run once by a Prefect Runner."""
    import asyncio

    from prefect import get_client
    from prefect.runner import Runner

    from flows.serve import make_deployment

    overrides = ["evaluate.interpolation_steps=4"]
    deployment = make_deployment(name="nightly", cron="0 3 * * *", params="params.yaml", overrides=overrides,
                                 project_dir=project)

    async def serve_one_run():
        runner = Runner(limit=1, pause_on_shutdown=False)
        deployment_id = await runner.aadd_deployment(deployment)
        async with get_client() as client:
            stored = await client.read_deployment(deployment_id)
            flow_run = await client.create_flow_run_from_deployment(deployment_id)
        await runner.start(run_once=True, webserver=False)  # picks up the run, returns when it has finished
        async with get_client() as client:
            return stored, await client.read_flow_run(flow_run.id)

    stored, flow_run = asyncio.run(serve_one_run())
    assert stored.name == "nightly" and stored.entrypoint == "flows/pipeline.py:pipeline"
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in stored.schedules] == [("0 3 * * *", "UTC", True)]
    assert stored.parameters == {"params": str(project / "params.yaml"), "overrides": overrides,
                                 "project_dir": str(project)}
    assert flow_run.state.is_completed(), flow_run.state
    assert flow_run.parameters == stored.parameters
    # The run used the deployment's override: evaluate recomputed with 4 interpolation points.
    curve = json.loads((project / "plots" / "interpolation.json").read_text())
    assert sorted({r["lambda"] for r in curve}) == [0.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]


def test_the_server_turns_the_cron_schedule_into_runs_at_0300(tmp_path, prefect_harness):
    """The path the server's scheduler service takes (the harness runs no scheduler: call it directly).

    Prefect 3.8's insert of scheduled runs fails under SQLAlchemy 2.1 ("Can't evaluate bulk DML
    statement"), and a served schedule then never fires; SQLAlchemy 2.0 works.
    """
    import httpx
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL

    from flows.serve import make_deployment

    root = make_project(tmp_path / "proj")
    deployment_id = make_deployment(name="at-three", cron="0 3 * * *", project_dir=root).apply()
    # Plain POSTs: the Prefect client would retry the server error of a broken scheduler for minutes.
    for _ in range(10):  # 503: the harness's SQLite database is busy; try again
        response = httpx.post(f"{PREFECT_API_URL.value()}/deployments/{deployment_id}/schedule",
                              json={"min_runs": 3, "max_runs": 3}, timeout=60)
        if response.status_code != 503:
            break
        time.sleep(2)
    assert response.status_code == 200, response.text[-2000:]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    starts = sorted(r.expected_start_time for r in runs)
    assert len(starts) == 3 and all((t.hour, t.minute) == (3, 0) for t in starts)
    assert all(r.state.is_scheduled() and r.parameters["project_dir"] == str(root) for r in runs)


def test_serve_rejects_bad_schedules_and_params_before_serving(project, capsys):
    from flows.serve import main, make_schedule

    with pytest.raises(ValueError, match="exactly one of --cron or --interval"):
        make_schedule()
    assert main(["--cron", "61 3 * * *", "--params", str(project / "params.yaml")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["--interval", "3600", "--params", str(project / "params.yaml"), "--set", "gates.lamda=1"]) == 2
    assert "gates.lamda: unknown key" in capsys.readouterr().err
    assert main(["--interval", "0", "--params", str(project / "params.yaml")]) == 2
    assert "--interval must be a positive number of seconds" in capsys.readouterr().err


def test_prefect_yaml_deploys_the_pipeline_to_a_process_work_pool(prefect_harness):
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="cyclemerge", type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    out = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("cyclemerge-pipeline/nightly")
    assert dep.work_pool_name == "cyclemerge" and dep.entrypoint == "flows/pipeline.py:pipeline"
    assert [(s.schedule.cron, s.active) for s in dep.schedules] == [("0 3 * * *", True)]
    assert dep.parameters == {"params": "params.yaml", "overrides": [], "force": []}
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]


def test_dask_runs_training_and_statistics_on_workers_and_matches_threads(runs, project, tmp_path):
    """train and activations on a 2-worker Dask cluster give the same tensors as the threads run."""
    from distributed import Client, LocalCluster, get_task_stream

    from cyclemerge.io import load_torch
    from flows.pipeline import make_task_runner, run_stage
    from tasks.common import Project

    other = make_project(tmp_path / "dask")
    shutil.copy(project / "params.yaml", other / "params.yaml")
    default = make_task_runner(Project.load(other, "params.yaml", ["orchestration.task_runner=dask"]), "train")
    assert type(default).__name__ == "DaskTaskRunner"
    assert default.cluster_kwargs["n_workers"] == 2 and default.cluster_kwargs["processes"] is True
    assert type(make_task_runner(Project.load(other, "params.yaml", ["orchestration.task_runner=dask"]),
                                 "gates")).__name__ == "ThreadPoolTaskRunner"  # one task: no cluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        dask_project = Project.load(other, "params.yaml", ["orchestration.task_runner=dask",
                                                           f"orchestration.dask_address={cluster.scheduler_address}"])
        with get_task_stream(client) as stream:
            train = run_stage(dask_project, "train")
            acts = run_stage(dask_project, "activations")
    assert not train["cached"] and not acts["cached"]
    workers = {t["worker"] for t in stream.data}
    assert len(stream.data) >= 6 and len(workers) == 2  # 3 seed models + 3 statistics tasks over both workers
    for i in range(3):
        ours = load_torch(other / "artifacts" / "models" / f"model_{i}.pt")["state_dict"]
        theirs = load_torch(project / "artifacts" / "models" / f"model_{i}.pt")["state_dict"]
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), f"model {i}"
        ours = load_torch(other / "artifacts" / "activations" / f"model_{i}.pt")["stats"]
        theirs = load_torch(project / "artifacts" / "activations" / f"model_{i}.pt")["stats"]
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), f"statistics of model {i}"

"""The stage server of `make run` (flows/stage_server.py) and its client (flows/stage.py): a stage run
through the server behaves as one run in a process of its own (output, exit code, Prefect and MLflow
records, Ctrl-C), the client runs the stage itself when there is no usable server, and the server
leaves no process behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, write_params

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
BAD_KEY = ["train", "--set", "gates.lamda=1"]  # refused while the params load: exit 2, no flow run

# The client as `python -m flows.stage` runs it, then (on stdout) whether it imported torch itself.
CLIENT = """
import runpy, sys
sys.argv = [sys.argv[0], *sys.argv[1:]]
try:
    runpy.run_module("flows.stage", run_name="__main__", alter_sys=True)
except SystemExit as e:
    print(f"client: torch imported {'torch' in sys.modules}, exit {e.code}")
"""

# Starts a stage server for the project in argv[1], prints its socket's path, and waits to be killed.
STARTER = """
import os, sys, time
from pathlib import Path
from flows.stage_server import serving
server = serving(dict(os.environ), Path(sys.argv[1]))
print(server.__enter__()["CYCLEMERGE_STAGE_SERVER"], flush=True)
time.sleep(600)
"""


def copied_project(root: Path) -> Path:
    """A project with its own copy of the code (a test may touch a module without touching the repo's)."""
    root.mkdir(parents=True)
    for name in ("cyclemerge", "tasks", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root)
    return root


def stage_env(root: Path, **extra: str) -> dict[str, str]:
    """What run_dvc gives DVC: the project, the held lock, one thread; Prefect's home in the project."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH",
                                                          "CYCLEMERGE_STAGE_SERVER", "PREFECT_API_URL")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "CYCLEMERGE_PROJECT": str(root),
            "CYCLEMERGE_LOCK_HELD": "1", "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1", **extra}


def client(root: Path, env: dict, args: list[str], probe: bool = False, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", CLIENT, *args] if probe else [sys.executable, "-m", "flows.stage", *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600, **kw)


def _proc_field(pid: int, name: str) -> str:
    return next(ln.split(":", 1)[1].strip() for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ln.startswith(name + ":"))


def processes() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def servers_of(root: Path) -> list[int]:
    """The stage server processes running for the project ``root``."""
    found = []
    for pid in processes():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"flows.stage_server" in cmdline and Path(os.readlink(f"/proc/{pid}/cwd")) == root.resolve():
                found.append(pid)
        except OSError:
            pass
    return found


def the_server(root: Path) -> int:
    assert wait_until(lambda: servers_of(root), 30), f"no stage server runs for {root}"
    (pid,) = servers_of(root)
    return pid


def children_of(pid: int) -> list[int]:
    out = []
    for child in processes():
        try:
            if int(_proc_field(child, "PPid")) == pid:
                out.append(child)
        except (OSError, StopIteration, ValueError):
            pass
    return out


def wait_until(condition, seconds: float = 120.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


@pytest.fixture(scope="module")
def served(tmp_path_factory, prefect_harness):
    """A copied tiny project, an MLflow parent run in its store, and a stage server for it, as run_dvc
    starts one: ``(root, env with the server's address, parent run id)``."""
    from prefect.settings import PREFECT_API_URL

    from flows.stage_server import serving
    from tasks.common import Project
    from tasks.tracking import resolve_uri, start_parent

    root = copied_project(tmp_path_factory.mktemp("served") / "proj")
    project = Project.load(root)
    parent = start_parent(project)
    # INFO: a flow run's own log lines ("Finished in state ...") then go to the API too, to be checked.
    env = stage_env(root, PREFECT_API_URL=PREFECT_API_URL.value(), CYCLEMERGE_PARENT_RUN_ID=parent,
                    PREFECT_LOGGING_LEVEL="INFO")
    with serving(env, root, resolve_uri(project)) as extra:
        assert set(extra) == {"CYCLEMERGE_STAGE_SERVER"}
        yield root, {**env, **extra}, parent
    assert servers_of(root) == []


def test_the_client_alone_checks_only_that_a_stage_is_named(tmp_path):
    done = client(tmp_path, stage_env(tmp_path, PYTHONPATH=str(REPO)), [], probe=True)
    assert done.stdout.strip() == "client: torch imported False, exit 2"
    assert "usage: python -m flows.stage STAGE" in done.stderr


def test_without_a_server_the_client_runs_the_stage_itself(served):
    root, env, _ = served
    alone = {k: v for k, v in env.items() if k != "CYCLEMERGE_STAGE_SERVER"}
    done = client(root, alone, BAD_KEY, probe=True)
    assert done.stdout.strip() == "client: torch imported True, exit 2"
    assert done.stderr.startswith("error: ") and "gates.lamda: unknown key" in done.stderr
    assert "stage server" not in done.stderr


def test_through_the_server_an_error_arrives_as_in_a_process_of_its_own(served):
    root, env, _ = served
    alone = {k: v for k, v in env.items() if k != "CYCLEMERGE_STAGE_SERVER"}
    direct = subprocess.run([sys.executable, "-m", "flows.pipeline", "--stage", *BAD_KEY], cwd=root,
                            env=alone, capture_output=True, text=True, timeout=600)
    via = client(root, env, BAD_KEY, probe=True)
    assert via.stdout.strip() == "client: torch imported False, exit 2"  # the server ran it
    assert direct.returncode == 2 and via.stderr == direct.stderr
    usage = client(root, env, ["no-such-stage"])
    assert usage.returncode == 2 and "argument --stage: invalid choice: 'no-such-stage'" in usage.stderr


def test_a_stage_run_through_the_server_reports_to_prefect_and_mlflow(served):
    import asyncio

    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId, LogFilter,
                                                LogFilterFlowRunId)

    root, env, parent = served
    since = time.time()
    done = client(root, env, ["train", "--force", "train"], probe=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[      train] done in" in done.stdout and done.stdout.strip().endswith("torch imported False, exit 0")
    assert (root / "metrics" / "train.json").is_file() and len(list((root / "artifacts" / "models").glob("*.pt"))) == 3

    async def states():
        async with get_client() as api:
            runs = await api.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["cyclemerge-train"])))
            runs = [r for r in runs if r.created.timestamp() >= since - 1]  # the harness serves the whole session
            ids = [r.id for r in runs]
            tasks = await api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            logs = await api.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
            return ([r.state_type.value for r in runs], [t.state_type.value if t.state_type else None for t in tasks],
                    [log.message for log in logs])

    def completed():
        runs, tasks, logs = asyncio.run(states())
        return runs == ["COMPLETED"] and len(tasks) >= 3 and set(tasks) == {"COMPLETED"} and \
            any(m.startswith("Finished in state Completed") for m in logs)

    # Task run states travel as events and logs through a worker, both drained at the child's exit.
    assert wait_until(completed, 60, 0.5), asyncio.run(states())
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("cyclemerge")
    stage_runs = mlflow.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert [(r.info.run_name, r.info.status) for r in stage_runs] == [("train", "FINISHED")]
    seeds = mlflow.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{stage_runs[0].info.run_id}'")
    assert len(seeds) == 3 and all("test_acc" in r.data.metrics for r in seeds)


def test_ctrl_c_stops_a_stage_running_on_the_server(served):
    root, env, _ = served
    server = the_server(root)
    proc = subprocess.Popen([sys.executable, "-m", "flows.stage", "train", "--force", "train", "--set",
                             "train.epochs=500"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert wait_until(lambda: children_of(server), 60), "the server never forked the stage"
        (stage,) = children_of(server)
        # In the stage's setup by now. (Later, in training, Prefect lets the running seed task finish
        # first: tens of seconds, with or without the server.)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # what the terminal sends the client (the server is in another session)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: every finished stage is kept" in err and "Traceback" not in err, err[-3000:]
    assert wait_until(lambda: not Path(f"/proc/{stage}").exists(), 30) and servers_of(root) == [server]


def test_a_changed_module_makes_the_client_run_the_stage_itself(served):
    root, env, _ = served
    module = root / "cyclemerge" / "io.py"
    before = module.stat()
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    try:
        done = client(root, env, BAD_KEY, probe=True)
    finally:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert done.stdout.strip() == "client: torch imported True, exit 2"  # new code: a fresh process
    note, rest = done.stderr.split("\n", 1)
    assert note.startswith("note: stage server ") and f"{module} changed since the server imported it" in note
    assert rest.startswith("error: ") and "gates.lamda: unknown key" in rest


def test_a_dead_server_socket_falls_back(served, tmp_path):
    root, env, _ = served
    path = tmp_path / "socket"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a crashed server leaves
    done = client(root, {**env, "CYCLEMERGE_STAGE_SERVER": str(path)}, BAD_KEY, probe=True)
    assert done.stdout.strip() == "client: torch imported True, exit 2"
    note, rest = done.stderr.split("\n", 1)
    assert note == f"note: stage server {path} not used (Connection refused); running the stage in this process"
    assert rest.startswith("error: ") and "gates.lamda: unknown key" in rest


def test_the_server_leaves_no_process_behind(tmp_path):
    from flows.stage_server import serving

    root = copied_project(tmp_path / "proj")
    env = stage_env(root, PREFECT_API_URL="http://127.0.0.1:9/api")  # no flow runs: the params are refused
    with serving(env, root) as extra:
        folder = Path(extra["CYCLEMERGE_STAGE_SERVER"]).parent
        done = client(root, {**env, **extra}, BAD_KEY, probe=True)
        assert done.stdout.strip() == "client: torch imported False, exit 2"
        server = the_server(root)
        assert children_of(server) == []  # the stage's process was waited for
    assert not Path(f"/proc/{server}").exists() and not folder.exists()
    # When the process that started it dies without a word (SIGKILL), the server ends on its own.
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(root)], cwd=root, env=env, stdout=subprocess.PIPE,
                               text=True)
    try:
        path = Path(starter.stdout.readline().strip())
        orphan = the_server(root)
        starter.kill()
        starter.wait()
        assert wait_until(lambda: not Path(f"/proc/{orphan}").exists() or _proc_field(orphan, "State")[0] == "Z", 120)
        assert not path.parent.exists()  # nobody else is left to remove the socket's folder
    finally:
        starter.kill()


def test_run_dvc_runs_every_stage_through_one_server(tmp_path):
    root = copied_project(tmp_path / "proj")
    write_params(root, {"evaluate": {"baselines": ["naive"], "cycle": False}, "gates": {"steps": 5}})
    env = stage_env(root, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                    GIT_COMMITTER_EMAIL="t@t")
    env.pop("CYCLEMERGE_LOCK_HELD")
    assert subprocess.run(["git", "init", "-q"], cwd=root).returncode == 0
    done = subprocess.run([sys.executable, "-m", "flows.pipeline", "--run-dvc"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("train", "activations", "align", "baselines", "gates", "repair", "evaluate"):
        assert f"Running stage '{stage}'" in done.stdout and f"python3 -m flows.stage {stage}" in done.stdout
    assert "stage server" not in done.stderr, done.stderr[-3000:]  # no stage fell back to a process of its own
    assert (root / "metrics" / "headline.json").is_file() and (root / "reports" / "summary.md").is_file()
    assert servers_of(root) == []
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("cyclemerge")
    (parent,) = mlflow.search_runs([exp.experiment_id], "tags.`cyclemerge.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED" and "merged.test_acc" in parent.data.metrics
    stages = mlflow.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name for r in stages} == {"train", "activations", "align", "baselines", "gates", "repair",
                                                 "evaluate"}

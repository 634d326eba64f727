"""Process-wide defaults, set before Prefect or MLflow is imported.

Everything stays inside the project folder and works offline: Prefect's ephemeral API with its
home in ``.prefect/`` (one for a whole `dvc repro`: ``shared_prefect_api``), task results in
``.prefect-results/``, no telemetry.
"""

import os
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(os.environ.get("CYCLEMERGE_PROJECT", Path.cwd())).resolve()

_DEFAULTS = {
    "PREFECT_HOME": str(ROOT / ".prefect"),
    "PREFECT_LOCAL_STORAGE_PATH": str(ROOT / ".prefect-results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DVC_NO_ANALYTICS": "1",
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "GIT_PYTHON_REFRESH": "quiet",
}
for key, value in _DEFAULTS.items():
    os.environ.setdefault(key, value)


def _use_project_interpreter() -> None:
    """Hand over to the project's ``.venv`` when started by a Python without the project's packages.

    DVC runs each stage's ``python3 -m flows.stage NAME`` with the first ``python3`` on PATH; in a
    plain shell (``.venv/bin/dvc exp run ...`` with no activated venv) that is the system's, which
    has no torch. ``CYCLEMERGE_VENV`` names a venv kept elsewhere.
    """
    import importlib.util
    import sys

    if importlib.util.find_spec("torch") is not None:
        return
    venv = Path(os.environ.get("CYCLEMERGE_VENV") or ROOT / ".venv")
    python = venv / "bin" / "python"
    if python.is_file() and Path(sys.prefix).resolve() != venv.resolve():
        os.execv(python, [str(python), *sys.orig_argv[1:]])
    print(f"error: {sys.executable} does not have the project's packages (no module named 'torch'), and no "
          f"environment was found at {venv}. Run `make venv` in {ROOT} first, then call DVC as .venv/bin/dvc "
          "(or activate .venv, or set CYCLEMERGE_VENV to the environment's folder)", file=sys.stderr)
    raise SystemExit(2)


_use_project_interpreter()


@contextmanager
def shared_prefect_api():
    """The URL of one Prefect API for a whole `dvc repro`, for its stage processes to share.

    Without ``PREFECT_API_URL`` every process that runs a flow starts its own ephemeral server: 5-16 s
    each on this 2-core machine, more than most stages' own work (benchmarks/speed.py measures it). A
    URL already set (a real server) is passed on as it is; otherwise one server is started here, and
    stopped on exit.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    try:
        yield server.api_url
    finally:
        server.stop()

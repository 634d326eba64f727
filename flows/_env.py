"""Process-wide defaults, set before Prefect or MLflow is imported.

Everything stays inside the project folder and works offline: Prefect's ephemeral API with its
home in ``.prefect/``, task results in ``.prefect-results/``, no telemetry.
"""

import os
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

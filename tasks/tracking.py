"""MLflow tracking for the stages: one parent run per pipeline run, one nested run per stage.

Tracking never loses a result: when the store is unreachable the stage still finishes and says
that tracking was skipped (``tracking.on_error: warn``), or fails loudly (``fail``).
Explicit run ids through ``MlflowClient`` rather than the fluent active-run stack, because stages
run in threads and in separate DVC processes that must share one parent run.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tasks.common import Project

log = logging.getLogger("cyclemerge.tracking")
PARENT_ENV = "CYCLEMERGE_PARENT_RUN_ID"


class TrackingError(RuntimeError):
    pass


def resolve_uri(project: Project) -> str:
    """Make a relative ``sqlite:///x.db`` relative to the project folder, not to the caller's CWD."""
    uri = project.cfg.tracking.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(project.root / uri[len(prefix):])
    return uri


def git_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Run:
    """A tracked run that turns every store failure into one warning (or an error, if configured)."""

    def __init__(self, project: Project, client: Any | None, run_id: str | None):
        self.project, self.client, self.run_id = project, client, run_id
        self.parent_id: str | None = None  # the pipeline run this stage run is nested in, once known

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _guard(self, what: str, fn, *args, **kwargs):
        """Call ``fn`` (a client method name, or a callable) unless tracking is off; store failures warn."""
        if not self.active:
            return None
        try:
            call = getattr(self.client, fn) if isinstance(fn, str) else fn
            return call(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any store failure is handled the same way
            if self.project.cfg.tracking.on_error == "fail":
                raise TrackingError(f"MLflow {what} failed: {e}") from e
            log.warning("MLflow %s failed (%s); tracking skipped for the rest of this stage", what, e)
            self.client = None
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._guard("log_params", "log_batch", self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in _flatten(metrics).items() if _is_number(v)]
        for i in range(0, len(items), 500):
            self._guard("log_metrics", "log_batch", self.run_id, metrics=items[i:i + 500])

    def log_series(self, key: str, values: list[float]) -> None:
        """A curve (loss per step, objective per iteration) as one metric with steps."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        key = re.sub(r"[^\w\-. :/]", "_", key)
        items = [Metric(key, float(v), now, i) for i, v in enumerate(values) if _is_number(v)]
        for i in range(0, len(items), 500):
            self._guard("log_series", "log_batch", self.run_id, metrics=items[i:i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._guard("log_artifact", "log_artifact", self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._guard("set_tag", "set_tag", self.run_id, k, str(v))

    def log_model(self, model, name: str, input_example, register_as: str | None = None, *,
                  extra_files: list[str | Path] | None = None, metadata: dict[str, Any] | None = None) -> str | None:
        """Log the merged model and optionally register it; returns the model URI.

        The model is stored in MLflow's ``pt2`` format (``torch.export``): a traced graph plus its
        weights, loaded back by ``mlflow.pytorch.load_model`` as a callable ``GraphModule`` without
        unpickling Python objects or importing cyclemerge (MLflow verifies that when
        ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``). Its ``pickle`` format would run code on load.
        ``extra_files`` (the ``.safetensors`` state dict) and ``metadata`` (the architecture) let a
        user rebuild the original ``nn.Module`` with ``cyclemerge.models.build_model``.
        """
        def _log():
            import mlflow
            import mlflow.pytorch

            mlflow.set_tracking_uri(resolve_uri(self.project))
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pytorch.log_model(
                    model, name=name, input_example=input_example, serialization_format="pt2",
                    pip_requirements=["torch==2.14.1"], metadata=metadata,
                    extra_files=[str(f) for f in extra_files or []] or None)
            if register_as:
                version = mlflow.register_model(info.model_uri, register_as)
                self.client.set_model_version_tag(register_as, version.version, "params_hash", self.project.params_hash)
                return f"models:/{register_as}/{version.version}"
            return info.model_uri

        return self._guard("log_model", _log)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys, with characters MLflow rejects in names replaced by '_'."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = re.sub(r"[^\w\-. :/]", "_", f"{prefix}{k}")
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Stores found unusable in this process: one warning per pipeline run, not one per stage and model.
_UNUSABLE: set[str] = set()


def _client(project: Project):
    cfg = project.cfg.tracking
    if not cfg.enabled or resolve_uri(project) in _UNUSABLE:
        return None, None
    # A remote store that does not answer should cost seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=resolve_uri(project))
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            location = (project.root / "mlruns").as_uri() if resolve_uri(project).startswith("sqlite:") else None
            exp_id = client.create_experiment(cfg.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        return client, exp_id
    except Exception as e:  # noqa: BLE001
        if cfg.on_error == "fail":
            raise TrackingError(f"MLflow store {cfg.uri} is not usable: {e}") from e
        log.warning("MLflow store %s is not usable (%s): tracking skipped, the pipeline goes on", cfg.uri, e)
        _UNUSABLE.add(resolve_uri(project))
        return None, None


def attach(project: Project, run_id: str | None) -> Run:
    """A Run for an existing run id (a stage task logging into the run its flow opened)."""
    if run_id is None:
        return Run(project, None, None)
    client, _ = _client(project)
    return Run(project, client, run_id)


def start_parent(project: Project, run_name: str = "pipeline") -> str | None:
    """Create the parent run of one pipeline run; its id goes to the stages (also across processes)."""
    _UNUSABLE.discard(resolve_uri(project))  # a new run tries the store again
    client, exp_id = _client(project)
    if client is None:
        return None
    try:
        created = client.create_run(exp_id, run_name=run_name, tags={
            "cyclemerge.kind": "pipeline", "cyclemerge.params_hash": project.params_hash,
            "mlflow.source.git.commit": git_commit(project.root), "git_commit": git_commit(project.root)})
        run_id = created.info.run_id
        Run(project, client, run_id).log_params(project.cfg.model_dump(mode="json"))
        return run_id
    except Exception as e:  # noqa: BLE001
        if project.cfg.tracking.on_error == "fail":
            raise TrackingError(f"MLflow could not create the pipeline run: {e}") from e
        log.warning("MLflow could not create the pipeline run (%s): tracking skipped", e)
        return None


def _find_parent(project: Project, client, exp_id) -> str | None:
    """For stages run one by one (``dvc repro``): reuse the newest pipeline run with these params."""
    runs = client.search_runs([exp_id], filter_string=(
        f"tags.`cyclemerge.kind` = 'pipeline' and tags.`cyclemerge.params_hash` = '{project.params_hash}'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def finish_parent(project: Project, run_id: str | None, status: str = "FINISHED") -> None:
    if run_id is None:
        return
    client, _ = _client(project)
    if client is not None:
        Run(project, client, run_id)._guard("set_terminated", "set_terminated", run_id, status)


@contextmanager
def stage_run(project: Project, stage: str, parent_run_id: str | None = None) -> Iterator[Run]:
    """A nested MLflow run for one stage; yields a Run whose methods never raise on a store failure."""
    client, exp_id = _client(project)
    if client is None:
        yield Run(project, None, None)
        return
    run = Run(project, client, "pending")  # "pending": lets _guard work before the run exists
    parent = parent_run_id or os.environ.get(PARENT_ENV)
    if parent is None:
        parent = run._guard("search_runs", _find_parent, project, client, exp_id) or start_parent(project)
    tags = {"cyclemerge.kind": "stage", "cyclemerge.stage": stage, "cyclemerge.params_hash": project.params_hash,
            "git_commit": git_commit(project.root)}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run.parent_id = parent
    created = run._guard("create_run", "create_run", exp_id, run_name=stage, tags=tags)
    run.run_id = created.info.run_id if created is not None else None
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        if run.active:
            run._guard("set_terminated", "set_terminated", run.run_id, status)

"""What every stage task shares: the project and the paths of its artifacts, stage cache keys, output manifests.

Cache keys are built from ``dvc.yaml`` itself (the params and deps a stage lists; ``python -m
tasks.deps --write`` derives the code deps from the imports), so the Prefect cache and DVC's stage
cache agree on what is stale by construction. ``Project`` owns every artifact's path and
``tasks/artifacts.py`` their formats, so no task module imports another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from cyclemerge.config import Config, dump_params, load_config
from cyclemerge.io import file_hash

STAGE_ORDER = ("train", "activations", "align", "baselines", "gates", "repair", "evaluate")
CACHE_VERSION = "1"  # bump to invalidate every cached stage result at once


@dataclass
class Project:
    """A project folder and the configuration loaded from its params file."""

    root: Path
    cfg: Config
    params_path: Path
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, root: str | Path = ".", params: str | Path = "params.yaml", overrides: list[str] | None = None) -> "Project":
        root = Path(root).resolve()
        params_path = Path(params) if Path(params).is_absolute() else root / params
        cfg = load_config(params_path, overrides or [])
        return cls(root=root, cfg=cfg, params_path=params_path, overrides=list(overrides or []))

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def models_dir(self) -> Path:
        return self.artifacts / "models"

    def model_path(self, i: int) -> Path:
        return self.models_dir / f"model_{i}.pt"

    @property
    def activations_dir(self) -> Path:
        return self.artifacts / "activations"

    def stats_path(self, i: int) -> Path:
        return self.activations_dir / f"model_{i}.pt"

    @property
    def correlations_path(self) -> Path:
        return self.activations_dir / "correlations.pt"

    @property
    def alignment_path(self) -> Path:
        return self.artifacts / "alignment" / "alignment.pt"

    @property
    def baselines_path(self) -> Path:
        return self.artifacts / "baselines" / "baselines.pt"

    @property
    def gates_path(self) -> Path:
        return self.artifacts / "gates" / "gates.pt"

    @property
    def merged_path(self) -> Path:
        return self.artifacts / "merged" / "merged.pt"

    def metrics_path(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    def plot_path(self, name: str) -> Path:
        return self.root / "plots" / name

    def report_path(self, name: str) -> Path:
        return self.root / "reports" / name

    @property
    def params_hash(self) -> str:
        return self.cfg.section_hash()

    def params_yaml(self) -> str:
        return dump_params(self.cfg)

    @cached_property
    def dvc_stages(self) -> dict[str, dict]:
        dvc_file = self.root / "dvc.yaml"
        if not dvc_file.exists():
            raise FileNotFoundError(f"{dvc_file} not found: run from the cyclemerge project folder")
        return yaml.safe_load(dvc_file.read_text())["stages"]

    def stage_params(self, stage: str) -> dict[str, Any]:
        """The values of exactly the params keys ``dvc.yaml`` lists for ``stage``."""
        dumped = self.cfg.model_dump(mode="json")
        out: dict[str, Any] = {}
        for entry in self.dvc_stages[stage].get("params", []):
            node: Any = dumped
            for part in str(entry).split("."):
                node = node[part]
            out[str(entry)] = node
        return out

    def stage_params_hash(self, stage: str) -> str:
        """Hash of the params ``dvc.yaml`` lists for ``stage``: what a stage's own outputs may record
        (the whole-config hash would change them, and make DVC call them stale, on any param change)."""
        return hashlib.sha256(json.dumps(self.stage_params(stage), sort_keys=True).encode()).hexdigest()[:16]

    def stage_deps(self, stage: str) -> list[str]:
        return [d if isinstance(d, str) else next(iter(d)) for d in self.dvc_stages[stage].get("deps", [])]

    def library_deps(self, stage: str) -> tuple[str, ...]:
        """The stage's code deps that compute its results: the library's modules and the stage's own task
        module, not the shared task plumbing (paths, tracking). Keys of one part of a stage (one seed
        model) use these, so a change in how runs are logged does not retrain a model."""
        return tuple(d for d in self.stage_deps(stage) if d.startswith("cyclemerge/") or d == f"tasks/{stage}.py")

    def stage_key(self, stage: str, extra: dict | None = None, drop: tuple[str, ...] = (),
                  deps_only: tuple[str, ...] | None = None) -> str:
        """Hash of the stage's params, the content of its deps (code and upstream artifacts) and ``extra``.

        ``drop`` removes dotted params keys and ``deps_only`` narrows the deps, for keys of one part
        of a stage (one seed model must not retrain because another seed was added).
        """
        params = json.loads(json.dumps(self.stage_params(stage)))
        for dotted in drop:
            section, _, leaf = dotted.partition(".")
            params.get(section, {}).pop(leaf, None)
        deps = {}
        for d in self.stage_deps(stage):
            if deps_only is not None and d not in deps_only:
                continue
            p = self.root / d
            deps[d] = file_hash(p) if p.exists() else "missing"
        payload = {"v": CACHE_VERSION, "stage": stage, "params": params, "deps": deps, "extra": extra or {}}
        return stage + "-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def manifest(project: Project, paths: list[Path], **info: Any) -> dict:
    """What a stage task returns (and what Prefect caches): its outputs with content hashes."""
    return {"outputs": {str(p.relative_to(project.root)): file_hash(p) for p in paths}, **info}


def outputs_intact(project: Project, result: dict) -> bool:
    """True when every output a (possibly cached) result names still exists with the same content.

    DVC deletes a stage's outputs before rerunning it; a Prefect cache hit must not hand back paths
    to files that are gone or were rewritten.
    """
    items = result if isinstance(result, list) else [result]
    for rel, digest in (pair for r in items for pair in r.get("outputs", {}).items()):
        p = project.root / rel
        if not p.exists() or file_hash(p) != digest:
            return False
    return True


def by_key(context: Any, parameters: dict) -> str:
    """Prefect cache key: the ``key`` argument the flow computed from dvc.yaml's view of the stage."""
    return parameters["key"]


def run_cached(task_fn: Any, project: Project, *, key: str, force: bool = False, wait: bool = True, **kwargs: Any):
    """Submit a cached stage task; recompute when forced, caching is off, or its outputs are gone.

    Returns the PrefectFuture when ``wait`` is false (the caller resolves it with ``resolve``).
    """
    refresh = force or not project.cfg.orchestration.cache
    future = _in_project(task_fn, project, refresh).submit(project, key=key, **kwargs)
    if not wait:
        return future
    return resolve(task_fn, project, future, key=key, **kwargs)


def _in_project(task_fn: Any, project: Project, refresh: bool) -> Any:
    """The task with its results persisted in this project's ``.prefect-results/``."""
    return task_fn.with_options(refresh_cache=refresh, result_storage=project.root / ".prefect-results")


def resolve(task_fn: Any, project: Project, future: Any, *, key: str, **kwargs: Any) -> Any:
    """The task's result, marked ``cached`` when Prefect served it from its cache."""
    result = future.result()
    cached = future.state.name == "Cached"
    if cached and not outputs_intact(project, result):
        # A cache hit whose artifacts were deleted (e.g. by DVC) or changed: compute again.
        result, cached = _in_project(task_fn, project, True).submit(project, key=key, **kwargs).result(), False
    return {**result, "cached": cached} if isinstance(result, dict) else result


class LockedError(RuntimeError):
    pass


class ProjectLock:
    """One pipeline run per project folder: a second run refuses at once with who holds the lock."""

    def __init__(self, project: Project):
        self.path = project.root / ".pipeline.lock"
        self._fd: int | None = None

    def __enter__(self) -> "ProjectLock":
        import fcntl
        import os
        import time

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"another cyclemerge run holds {self.path} ({holder}); wait for it to finish — two runs in one "
                "project folder would overwrite each other's artifacts") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        import fcntl
        import os

        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def load_stage_data(project: Project):
    from cyclemerge.data import load_data

    return load_data(project.cfg.data, project_dir=project.root)

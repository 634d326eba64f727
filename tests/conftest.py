"""Shared fixtures: a tiny project folder (synthetic data, small MLPs) and Prefect's test harness."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "data": {"name": "synthetic", "calibration_size": 120,
             "synthetic": {"num_train": 600, "num_test": 200, "num_classes": 4, "channels": 1, "image_size": 8}},
    "model": {"arch": "mlp", "hidden": [24, 24]},
    "train": {"num_models": 3, "epochs": 3, "batch_size": 64, "lr": 0.01},
    "activations": {"num_samples": 120, "batch_size": 60},
    "align": {"max_iter": 30},
    "gates": {"steps": 15, "batch_size": 60},
    "repair": {"num_samples": 120, "batch_size": 60},
    "evaluate": {"train_subset": 200, "interpolation_steps": 3, "batch_size": 200},
    "tracking": {"register_model": True},
}


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def write_params(root: Path, overrides: dict | None = None) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    deep_update(params, yaml.safe_load(yaml.safe_dump(TINY_PARAMS)))
    deep_update(params, overrides or {})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def make_project(root: Path, overrides: dict | None = None) -> Path:
    """A project folder with the repo's code linked in (dvc.yaml deps point at it) and tiny params."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("cyclemerge", "tasks", "flows"):
        (root / name).symlink_to(REPO / name)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root, overrides)
    return root


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary API and database), started once per test session."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield

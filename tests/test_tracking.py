"""MLflow: one parent run per pipeline run with nested stage runs, tags that lead back to the params
and the commit, and the merged model in the registry, loadable in one line."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tasks.common import STAGE_ORDER
from tests.conftest import make_project

pytestmark = pytest.mark.slow
STAGES = STAGE_ORDER


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, prefect_harness):
    """A git-tracked tiny project run twice: once for real, once with everything cached."""
    from flows.pipeline import pipeline

    torch.set_num_threads(1)
    root = make_project(tmp_path_factory.mktemp("tracking") / "proj")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "params.yaml", "dvc.yaml"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "tiny"], cwd=root, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    first = pipeline(params=str(root / "params.yaml"), project_dir=str(root))
    second = pipeline(params=str(root / "params.yaml"), project_dir=str(root))
    return root, commit, first, second


@pytest.fixture(scope="module")
def store(tracked):
    import mlflow
    from mlflow import MlflowClient

    root = tracked[0]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    return client, client.get_experiment_by_name("cyclemerge").experiment_id


def children(client, exp_id, parent_id):
    return {r.data.tags["mlflow.runName"]: r
            for r in client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}'")}


def test_the_parent_run_holds_one_finished_nested_run_per_stage(tracked, store):
    from tasks.common import Project

    root, commit, first, _ = tracked
    client, exp_id = store
    project = Project.load(root)
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "pipeline"
    assert parent.data.tags["cyclemerge.params_hash"] == project.params_hash
    assert parent.data.tags["mlflow.source.git.commit"] == commit and parent.data.tags["git_commit"] == commit
    assert parent.data.params["gates.lam"] == str(project.cfg.gates.lam)  # the whole config, flattened
    stages = children(client, exp_id, parent.info.run_id)
    assert set(stages) == set(STAGES)
    for name, run in stages.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["cyclemerge.stage"] == name and run.data.tags["git_commit"] == commit
    seeds = children(client, exp_id, stages["train"].info.run_id)
    assert set(seeds) == {"train/model_0", "train/model_1", "train/model_2"}
    assert all("test_acc" in r.data.metrics and r.data.params["seed"] for r in seeds.values())
    assert "objective" in stages["align"].data.metrics and "merged.test_acc" in parent.data.metrics


def test_the_merged_model_is_registered_with_its_metrics_params_hash_and_commit(tracked, store):
    import json

    from tasks.common import Project

    root, commit, first, _ = tracked
    client, exp_id = store
    (version,) = client.search_model_versions("name = 'cyclemerge-merged'")
    assert int(version.version) == 1 and version.tags["params_hash"] == Project.load(root).params_hash
    run = client.get_run(version.run_id)
    assert run.data.tags["cyclemerge.stage"] == "evaluate"
    assert run.data.tags["mlflow.parentRunId"] == first["parent_run_id"] and run.data.tags["git_commit"] == commit
    assert run.data.tags["merged_model_uri"] == "models:/cyclemerge-merged/1"
    merged = json.loads((root / "metrics" / "evaluate.json").read_text())["merged"]
    assert run.data.metrics["merged.test_acc"] == pytest.approx(merged["test_acc"])
    assert run.data.metrics["merged.test_loss"] == pytest.approx(merged["test_loss"])


def test_one_line_loads_the_registered_model_and_it_predicts_like_merged_pt(tracked, store):
    import mlflow.pytorch

    from cyclemerge.config import ModelConfig
    from cyclemerge.data import load_data
    from cyclemerge.io import load_torch
    from cyclemerge.models import build_model
    from tasks.common import Project

    root = tracked[0]
    loaded = mlflow.pytorch.load_model("models:/cyclemerge-merged/1")  # what a user types

    ck = load_torch(root / "artifacts" / "merged" / "merged.pt")
    ref = build_model(ModelConfig(**ck["model"]), in_channels=ck["data"]["in_channels"],
                      image_size=ck["data"]["image_size"], num_classes=ck["data"]["num_classes"])
    ref.load_state_dict(ck["state_dict"])
    project = Project.load(root)
    x = load_data(project.cfg.data, project_dir=root).test_x[:64]
    with torch.no_grad():
        # A torch.export graph (MLflow's pt2 format), traced in eval mode: it refuses .eval() itself.
        assert torch.allclose(loaded(x), ref.eval()(x), atol=1e-6)


def test_a_cached_rerun_is_tracked_as_a_new_parent_run_without_a_second_model_version(tracked, store):
    _, _, first, second = tracked
    client, exp_id = store
    assert all(s["cached"] for s in second["stages"].values())
    assert second["parent_run_id"] != first["parent_run_id"]
    assert set(children(client, exp_id, second["parent_run_id"])) == set(STAGES)
    assert [int(v.version) for v in client.search_model_versions("name = 'cyclemerge-merged'")] == [1]

"""End to end: the whole DAG as one Prefect flow run, and as `dvc repro`, on tiny configs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_project

pytestmark = pytest.mark.slow
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, prefect_harness):
    """One pipeline flow run on synthetic data; several tests read what it left behind."""
    torch.set_num_threads(1)
    from flows.pipeline import pipeline

    root = make_project(tmp_path_factory.mktemp("flow") / "proj")
    out = pipeline(params=str(root / "params.yaml"), project_dir=str(root))
    return root, out


def test_flow_runs_every_stage_and_writes_the_promised_metrics(flow_run):
    root, out = flow_run
    assert list(out["stages"]) == ["train", "activations", "align", "baselines", "gates", "repair", "evaluate"]
    ev = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert {"endpoints", "ensemble", "merged", "naive", "params_hash"} <= set(ev)
    assert {"C2M3 uniform", "C2M3 uniform + repair", "C2M3 + gates", "C2M3 + gates + repair"} <= set(ev["methods"])
    assert len([k for k in ev["endpoints"] if k != "mean"]) == 3
    for block in (ev["ensemble"], ev["merged"], ev["naive"], *ev["endpoints"].values()):
        assert 0.0 <= block["test_acc"] <= 1.0 and block["test_loss"] > 0
    # Merging learnable synthetic models must beat chance (4 classes) by far after alignment.
    assert ev["merged"]["test_acc"] > 0.6
    assert json.loads((root / "metrics" / "activations.json").read_text())["seconds"] > 0
    align = json.loads((root / "metrics" / "align.json").read_text())
    assert align["cycle_error"] == 0.0 and align["cosine_after"] > align["cosine_before"]
    for name in ("models/model_0.pt", "activations/model_2.pt", "alignment/alignment.pt", "gates/gates.pt",
                 "merged/merged.pt"):
        assert (root / "artifacts" / name).exists(), name
    assert not list(root.rglob("*.tmp")), "no half-written artifact may remain"
    summary = (root / "reports" / "summary.md").read_text()
    assert "C2M3 + gates + repair" in summary and "../plots/methods.png" in summary
    for png in ("methods.png", "interpolation.png", "cycle.png", "objective.png", "gates_heatmap.png", "train_curves.png"):
        assert (root / "plots" / png).stat().st_size > 5000, png


def test_mlflow_has_the_parent_run_nested_stage_runs_and_the_registered_model(flow_run):
    import mlflow
    from mlflow import MlflowClient

    root, out = flow_run
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cyclemerge")
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.tags["cyclemerge.kind"] == "pipeline" and parent.data.tags["cyclemerge.params_hash"]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["mlflow.runName"] for r in children} >= {"train", "activations", "align", "gates", "repair",
                                                                  "evaluate"}
    train = next(r for r in children if r.data.tags["mlflow.runName"] == "train")
    seeds = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{train.info.run_id}'")
    assert len(seeds) == 3 and all("test_acc" in r.data.metrics for r in seeds)
    assert "merged.test_acc" in parent.data.metrics
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    loaded = mlflow.pytorch.load_model("models:/cyclemerge-merged/1")
    from cyclemerge.io import load_torch

    ck = load_torch(root / "artifacts" / "merged" / "merged.pt")
    x = torch.randn(5, 1, 8, 8)
    from cyclemerge.config import ModelConfig
    from cyclemerge.models import build_model

    ref = build_model(ModelConfig(**ck["model"]), in_channels=1, image_size=8, num_classes=4)
    ref.load_state_dict(ck["state_dict"])
    assert torch.allclose(loaded(x), ref.eval()(x), atol=1e-6)


def test_second_flow_run_recomputes_nothing(flow_run):
    from flows.pipeline import pipeline

    root, _ = flow_run
    out = pipeline(params=str(root / "params.yaml"), project_dir=str(root))
    assert all(s["cached"] for name, s in out["stages"].items()), out["stages"]


def _run(cmd, cwd, **env):
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=2400)


def test_dvc_repro_runs_everything_then_nothing_then_only_what_a_gates_change_touches(tmp_path):
    small = {"evaluate": {"baselines": ["naive"], "cycle": False}, "gates": {"steps": 5}}
    if FASHION.exists():  # a slice of the real default dataset, else synthetic data
        small |= {"data": {"name": "fashion_mnist", "root": str(tmp_path / "data"), "calibration_size": 200, "validation_size": 0,
                           "train_subset": 600, "test_subset": 300}, "model": {"hidden": [32, 32]}}
    root = make_project(tmp_path / "proj", small)
    env = {"OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PREFECT_HOME": str(tmp_path / "prefect")}
    assert _run(["git", "init", "-q"], root).returncode == 0
    assert _run(["dvc", "init", "-q"], root).returncode == 0
    first = _run(["dvc", "repro"], root, **env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("train", "activations", "align", "baselines", "gates", "repair", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (root / "dvc.lock").exists()
    from mlflow import MlflowClient

    # Stages run by DVC, one process each, still report the merge on the pipeline run they nest in.
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cyclemerge")
    parents = client.search_runs([exp.experiment_id], "tags.`cyclemerge.kind` = 'pipeline'")
    assert any("merged.test_acc" in r.data.metrics for r in parents), [r.data.metrics for r in parents]
    second = _run(["dvc", "repro"], root, **env)
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout
    params = re.sub(r"(?m)^(\s+lam:) .*$", r"\1 0.02", (root / "params.yaml").read_text())  # a new value
    (root / "params.yaml").write_text(params)
    third = _run(["dvc", "repro"], root, **env)
    assert third.returncode == 0, third.stderr[-3000:]
    ran = [s for s in ("train", "activations", "align", "gates", "repair", "evaluate") if f"Running stage '{s}'" in third.stdout]
    assert ran == ["gates", "repair", "evaluate"], third.stdout

"""Untrusted checkpoints never run code; expected errors are one message; a fresh machine gets its data first."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cyclemerge.config import DataConfig, ModelConfig, SyntheticConfig
from cyclemerge.data import load_data
from cyclemerge.io import (SAFE_FORMATS, CheckpointError, load_torch, read_checkpoint_file, save_model_checkpoint,
                           save_safetensors, save_torch)
from cyclemerge.models import build_model
from cyclemerge.train import import_checkpoints, make_checkpoint, model_for
from tests.conftest import REPO, RunsShell, make_project

MODEL = ModelConfig(arch="mlp", hidden=[16, 16])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = DataConfig(name="synthetic", calibration_size=100, validation_size=0,
                     synthetic=SyntheticConfig(num_train=300, num_test=100, num_classes=4, image_size=8))
    return load_data(cfg, project_dir=tmp_path_factory.mktemp("d"))


def good_state_dict(data, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return model_for(MODEL, data).state_dict()


# --- hostile files ------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["torch.save", "torch.save legacy", "pickle.dump"])
def test_a_hostile_pickle_is_refused_and_its_code_never_runs(tmp_path, data, writer):
    marker = tmp_path / "MARKER"
    evil = {**good_state_dict(data), "payload": RunsShell(marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(evil, path)
    elif writer == "torch.save legacy":
        torch.save(evil, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(RunsShell(marker)))
    torch.save(good_state_dict(data, 1), tmp_path / "good.pt")
    with pytest.raises(CheckpointError) as err:
        import_checkpoints([tmp_path / "good.pt", path], MODEL, data)
    message = str(err.value)
    assert message.startswith(f"train.checkpoints: {path} "), message
    assert "Safe formats: a state dict saved with torch.save(model.state_dict(), path) (tensors only), or a " \
           ".safetensors file" in message
    assert "posix.system" in message and "was refused without running it" in message
    assert not marker.exists(), "the checkpoint's code ran"


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_pickled_whole_module_is_refused_with_the_state_dict_fix(tmp_path, data, zip_format):
    torch.save(build_model(MODEL, in_channels=1, image_size=8, num_classes=4), tmp_path / "model.pt",
               _use_new_zipfile_serialization=zip_format)
    torch.save(good_state_dict(data), tmp_path / "good.pt")
    with pytest.raises(CheckpointError) as err:
        import_checkpoints([tmp_path / "good.pt", tmp_path / "model.pt"], MODEL, data)
    message = str(err.value)
    assert message.startswith(f"train.checkpoints: {tmp_path / 'model.pt'} holds a whole pickled model ("), message
    assert "cyclemerge.models.mlp.MLP" in message
    assert "Save the weights instead: torch.save(model.state_dict(), path)" in message


def test_artifact_loading_refuses_pickles_too(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"universe": [], "report": RunsShell(marker)}, tmp_path / "alignment.pt")
    with pytest.raises(CheckpointError, match=r"alignment\.pt was refused without running it"):
        load_torch(tmp_path / "alignment.pt")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):  # a missing artifact stays what it is
        load_torch(tmp_path / "missing.pt")


def test_every_torch_load_in_the_code_is_weights_only():
    offenders = []
    for folder in ("cyclemerge", "tasks", "flows", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "torch.load(" in line and "weights_only=True" not in line:
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders


# --- safetensors --------------------------------------------------------------------------------


def test_safetensors_checkpoints_import_like_torch_ones(tmp_path, data):
    from safetensors.torch import save_file

    a, b = good_state_dict(data, 0), good_state_dict(data, 1)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_model_checkpoint(make_checkpoint(b, MODEL, data, seed=2, params_hash="h", metrics={"test_acc": 0.5}),
                          tmp_path / "b.pt")
    out = import_checkpoints([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], MODEL, data)
    assert all(torch.equal(out[0][k], a[k]) and torch.equal(out[1][k], b[k]) for k in a)

    wrong = make_checkpoint(b, ModelConfig(arch="resnet20"), data, seed=2, params_hash="h", metrics={})
    save_model_checkpoint(wrong, tmp_path / "res.pt")
    with pytest.raises(CheckpointError, match=r"res\.safetensors holds a 'resnet20' model but model\.arch is 'mlp'"):
        import_checkpoints([tmp_path / "a.safetensors", tmp_path / "res.safetensors"], MODEL, data)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors is not a readable \.safetensors file"):
        import_checkpoints([tmp_path / "a.safetensors", tmp_path / "cut.safetensors"], MODEL, data)


def test_the_merged_checkpoint_pair_holds_the_same_model_without_wall_clock(tmp_path, data):
    sd = good_state_dict(data)
    ck = make_checkpoint(sd, MODEL, data, seed=None, params_hash="h", metrics={"acc": 0.9, "seconds": 12.3},
                         history=[{"epoch": 1, "seconds": 4.5}], source="cyclemerge merge")
    pt, safe = save_model_checkpoint(ck, tmp_path / "merged" / "merged.pt")
    assert (pt.name, safe.name) == ("merged.pt", "merged.safetensors")
    for loaded in (load_torch(pt), read_checkpoint_file(safe)):
        assert loaded["format"] == "cyclemerge-checkpoint/1" and loaded["model"]["hidden"] == [16, 16]
        assert loaded["metrics"] == {"acc": 0.9} and loaded["history"] == [{"epoch": 1}]
        assert all(torch.equal(loaded["state_dict"][k], sd[k]) for k in sd)
    first = (pt.read_bytes(), safe.read_bytes())
    ck["metrics"]["seconds"], ck["history"][0]["seconds"] = 99.0, 1.0
    save_model_checkpoint(ck, tmp_path / "merged" / "merged.pt")
    assert (pt.read_bytes(), safe.read_bytes()) == first, "a different wall time must not change the bytes"


def test_save_safetensors_is_byte_stable_across_key_order(tmp_path):
    sd = {"b": torch.ones(3), "a": torch.arange(4.0).reshape(2, 2).t()}  # a non-contiguous view too
    save_safetensors(sd, tmp_path / "x.safetensors", {"cyclemerge": "{}"})
    save_safetensors(dict(reversed(list(sd.items()))), tmp_path / "y.safetensors", {"cyclemerge": "{}"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()


def test_save_torch_leaves_out_wall_clock_fields_at_any_depth(tmp_path):
    save_torch({"report": {"seconds": 1.0, "starts": [{"seconds": 2.0, "objective": 3.0}]}, "align_seconds": 4},
               tmp_path / "a.pt")
    assert load_torch(tmp_path / "a.pt") == {"report": {"starts": [{"objective": 3.0}]}}


# --- expected errors: one message ------------------------------------------------------------------


def _record(msg: str, exc: BaseException | None = None, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("prefect.task_runs", level, __file__, 1, msg, None,
                             (type(exc), exc, None) if exc else None)


def test_prefect_run_logs_stay_silent_about_expected_errors_only():
    from flows.expected_errors import ExpectedErrorFilter

    f = ExpectedErrorFilter((CheckpointError,))
    expected = CheckpointError("train.checkpoints: x.pt was refused")
    assert not f.filter(_record("Task run failed with exception: CheckpointError(...)", expected))
    assert not f.filter(_record("Finished in state Failed('Task run encountered an exception CheckpointError: x')"))
    assert not f.filter(_record("Finished in state Failed('Flow run encountered an exception: CheckpointError: x')"))
    assert f.filter(_record("Encountered exception during execution: KeyError('w')", KeyError("w")))
    assert f.filter(_record("Finished in state Failed('Task run encountered an exception KeyError: w')"))
    assert f.filter(_record("Finished in state Completed()", level=logging.INFO))
    from cyclemerge.data import DataError

    subclass = ExpectedErrorFilter((DataError,))  # DataNotFoundError is a DataError; Prefect quotes with "
    assert not subclass.filter(_record('Finished in state Failed("Task run encountered an exception '
                                       'DataNotFoundError: mnist: no usable copy")'))


def _user_env(tmp_path: Path) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "PREFECT_HOME": str(tmp_path / "prefect"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


@pytest.mark.slow
def test_a_hostile_checkpoint_under_dvc_repro_is_one_message_and_runs_nothing(tmp_path, data):
    """As a user meets it: `dvc repro` with a hostile file in train.checkpoints."""
    marker = tmp_path / "MARKER"
    root = make_project(tmp_path / "proj", {"train": {"checkpoints": ["good.pt", "evil.pt"]},
                                            "model": {"hidden": [16, 16]}, "tracking": {"enabled": False}})
    torch.save(good_state_dict(data), root / "good.pt")
    torch.save({**good_state_dict(data), "payload": RunsShell(marker)}, root / "evil.pt")
    env = _user_env(tmp_path)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True)
    run = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if "evil.pt" in ln]
    assert lines == [f"error: train.checkpoints: {root / 'evil.pt'} was refused without running it: unpickling it "
                     "would import and call posix.system, which can run any code. cyclemerge reads only data; if "
                     "you trust this file, load it yourself and save the weights alone again. Safe formats: "
                     f"{SAFE_FORMATS}"], out
    assert "ERROR: failed to reproduce 'train'" in out
    assert not marker.exists() and not (root / "artifacts").exists()


def test_a_stage_started_by_a_python_without_torch_hands_over_to_the_project_venv(tmp_path):
    base = Path(sys.base_prefix) / "bin" / "python3"
    probe = subprocess.run([str(base), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        pytest.skip(f"{base} has torch: nothing to hand over")
    root = make_project(tmp_path / "proj")
    code = "import flows._env, sys; print(sys.prefix)"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CYCLEMERGE_VENV", "PYTHONHOME")}
    run = subprocess.run([str(base), "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "does not have the project's packages (no module named 'torch')" in run.stderr
    assert f"no environment was found at {root / '.venv'}" in run.stderr and "Traceback" not in run.stderr
    (root / ".venv").symlink_to(Path(sys.prefix))
    run = subprocess.run([str(base), "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).resolve() == Path(sys.prefix).resolve()


# --- the data check `make run` does first --------------------------------------------------------------


FAKE_APT = """#!/usr/bin/env bash
echo "$*" >> "$APT_LOG"
if [ "$1" = install ] && [ -z "${APT_FAILS:-}" ]; then
  mkdir -p "$SYSTEM_DIR"
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    : > "$SYSTEM_DIR/$f.gz"
  done
fi
[ -z "${APT_FAILS:-}" ] || { echo "E: Unable to locate package dataset-fashion-mnist" >&2; exit 100; }
"""


@pytest.fixture
def fresh_clone(tmp_path):
    """What `make run` needs before the venv exists, a fake apt-get, and no dataset anywhere."""
    root = tmp_path / "clone"
    (root / "scripts").mkdir(parents=True)
    for name in ("Makefile", "params.yaml", "requirements-lock.txt", "pyproject.toml", "scripts/ensure_data.sh"):
        shutil.copy(REPO / name, root / name)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "apt-get").write_text(FAKE_APT)
    (fake_bin / "apt-get").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "APT_LOG": str(tmp_path / "apt.log"),
           "SYSTEM_DIR": str(tmp_path / "system"), "ENSURE_DATA_SYSTEM_DIR": str(tmp_path / "system"),
           "ENSURE_DATA_PROBE_URL": "http://127.0.0.1:9/train-images-idx3-ubyte.gz", "MAKEFLAGS": ""}
    return root, env, tmp_path


def _check(root: Path, env: dict, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/ensure_data.sh", "params.yaml"], cwd=root, env={**env, **extra},
                          capture_output=True, text=True, timeout=60)


def test_make_run_without_the_data_stops_first_with_one_message(fresh_clone):
    root, env, tmp = fresh_clone
    run = subprocess.run(["make", "run"], cwd=root, env={**env, "ENSURE_DATA_UID": "1000"}, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0
    assert not (root / ".venv").exists(), "the data check must come before the environment install"
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: fashion_mnist: no copy of the dataset was found and none can be had on this "
                      "machine. Tried, in order:"], run.stderr
    assert "3. apt-get install dataset-fashion-mnist: skipped (needs root; this is user id 1000)" in run.stderr
    assert "4. download from http://127.0.0.1:9/train-images-idx3-ubyte.gz: not reachable (URLError" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp / "apt.log").exists()


def test_as_root_the_check_installs_the_debian_package(fresh_clone):
    root, env, tmp = fresh_clone
    run = _check(root, env, ENSURE_DATA_UID="0")
    assert run.returncode == 0, run.stderr
    assert (tmp / "apt.log").read_text().splitlines() == ["update -qq", "install -y -qq dataset-fashion-mnist"]
    assert "apt-get install dataset-fashion-mnist" in run.stdout


def test_as_root_a_failed_install_is_named_in_the_message(fresh_clone):
    root, env, _ = fresh_clone
    run = _check(root, env, ENSURE_DATA_UID="0", APT_FAILS="1")
    assert run.returncode == 1
    assert ("3. apt-get install dataset-fashion-mnist: failed (E: Unable to locate package dataset-fashion-mnist)"
            in run.stderr), run.stderr


@pytest.mark.parametrize("edit, expect_apt", [
    (None, False),                                                  # the data is in data/FashionMNIST/raw
    (("name: fashion_mnist", "name: synthetic"), False),             # not the default dataset
    (("root: data   ", "root: /elsewhere   "), False),               # not the default folder
    (("download: true", "download: false"), True),                   # no download: the package is the way
])
def test_the_check_acts_only_for_the_default_dataset_and_folder(fresh_clone, edit, expect_apt):
    root, env, tmp = fresh_clone
    if edit is None:
        raw = root / "data" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            (raw / f).write_bytes(b"")
    else:
        text = (root / "params.yaml").read_text()
        assert edit[0] in text
        (root / "params.yaml").write_text(text.replace(edit[0], edit[1], 1))
    run = _check(root, env, ENSURE_DATA_UID="0")
    assert run.returncode == 0, run.stderr
    assert (tmp / "apt.log").exists() == expect_apt


# --- the merged model in MLflow ------------------------------------------------------------------------


@pytest.mark.slow
def test_the_merged_model_is_logged_in_a_format_that_loads_without_unpickling(tmp_path, data, monkeypatch, caplog):
    import mlflow
    import mlflow.pytorch

    from tasks.common import Project
    from tasks.tracking import stage_run

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    project = Project.load(make_project(tmp_path / "proj", {"model": {"hidden": [16, 16]}}))
    model = model_for(MODEL, data).eval()
    ck = make_checkpoint(model.state_dict(), MODEL, data, seed=None, params_hash="h", metrics={})
    _, safe = save_model_checkpoint(ck, tmp_path / "merged.pt")
    with caplog.at_level(logging.WARNING, logger="mlflow"), stage_run(project, "evaluate") as run:
        uri = run.log_model(model, "merged_model", data.test_x[:2].numpy(), "cyclemerge-merged", extra_files=[safe],
                            metadata={"cyclemerge": {k: ck[k] for k in ("format", "model", "data")}})
    assert uri == "models:/cyclemerge-merged/1"
    assert not [r for r in caplog.records if "pickle" in r.getMessage().lower()], "MLflow warned about pickle"
    mlflow.set_tracking_uri(f"sqlite:///{project.root / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # MLflow then verifies the archive first
    loaded = mlflow.pytorch.load_model("models:/cyclemerge-merged/latest")
    assert type(loaded).__name__ == "GraphModule", "a torch.export graph, not an unpickled cyclemerge class"
    x = data.test_x[:5]
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    info = mlflow.models.get_model_info("models:/cyclemerge-merged/1")
    assert info.metadata["cyclemerge"]["model"]["hidden"] == [16, 16]
    local = Path(mlflow.artifacts.download_artifacts("models:/cyclemerge-merged/1"))
    assert (local / "extra_files" / "merged.safetensors").read_bytes() == safe.read_bytes()

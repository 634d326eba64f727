"""Bad input and faults: each gives a clear error or warning, and nothing finished is lost.

Everything goes through the command line (``flows.pipeline.main``, in this process so that library
calls can be made to fail), as a user would meet it.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path

import pytest
import torch
import yaml

from tasks.common import STAGE_ORDER
from tests.conftest import make_project

STAGES = STAGE_ORDER


@pytest.fixture
def cli(monkeypatch, capsys):
    """``cli(root, *args) -> (exit code, stdout, stderr)``: the pipeline's command line in ``root``."""
    import flows._env
    from flows.pipeline import main

    def run(root: Path, *args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(flows._env, "ROOT", root)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def stage_status(out: str) -> dict[str, str]:
    """{stage: 'done' | 'cached'} from the '[  stage] done in ...' lines the CLI prints."""
    return {ln[1:12].strip(): ln.split("]")[1].split()[0] for ln in out.splitlines() if ln.startswith("[")}


def artifact_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "artifacts").rglob("*") if p.is_file()) \
        if (root / "artifacts").exists() else []


# --- params -------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("gates.lamda=0.1", "gates.lamda: unknown key; allowed keys here: enabled, granularity"),
    ("train.epochs=many", "train.epochs: Input should be a valid integer"),
    ("train.num_models=1", "train.num_models: Input should be greater than or equal to 2 (got 1)"),
    ("gates.zeta=0.5", "gates.zeta: Input should be greater than 1 (got 0.5)"),
    ("align.method=magic", "align.method: Input should be 'c2m3', 'merge_many', 'pairwise' or 'naive' (got 'magic')"),
    ("data.name=imagenet", "data.name: Input should be 'fashion_mnist', 'mnist', 'emnist', 'cifar10', 'cifar100' "
                           "or 'synthetic' (got 'imagenet')"),
    ("model.arch=vit", "model.arch: Input should be 'mlp', 'resnet20', 'vgg16' or 'custom' (got 'vit')"),
    ("gates.lam", "override 'gates.lam': expected key=value"),
])
def test_bad_params_exit_2_with_the_key_and_what_is_allowed(tmp_path, cli, override, message):
    root = make_project(tmp_path / "proj")
    code, out, err = cli(root, "--set", override)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert not (root / "artifacts").exists() and not (root / "mlflow.db").exists()


def test_bad_params_file_exits_2(tmp_path, cli):
    root = make_project(tmp_path / "proj")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epoch"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    code, _, err = cli(root)
    assert code == 2 and f"error: {root / 'params.yaml'}: invalid configuration\n  train.epoch: unknown key" in err
    code, _, err = cli(root, "--params", "missing.yaml")
    assert code == 2 and f"{root / 'missing.yaml'}: params file not found" in err


# --- user checkpoints ---------------------------------------------------------------------------


def mlp_state(hidden=(24, 24), seed=0) -> dict[str, torch.Tensor]:
    from cyclemerge.config import ModelConfig
    from cyclemerge.models import build_model

    torch.manual_seed(seed)
    return build_model(ModelConfig(arch="mlp", hidden=list(hidden)), in_channels=1, image_size=8,
                       num_classes=4).state_dict()


@pytest.fixture
def ckpt_project(tmp_path) -> Path:
    """A project with three good user checkpoints (bare state dicts of the configured MLP)."""
    root = make_project(tmp_path / "proj", {"tracking": {"enabled": False}})
    for i in range(3):
        torch.save(mlp_state(seed=i), root / f"good_{i}.pt")
    return root


def test_checkpoint_faults_stop_the_train_stage_with_the_file_and_the_fix(ckpt_project, cli, prefect_harness):
    from cyclemerge.config import ModelConfig
    from cyclemerge.models import build_model

    root = ckpt_project
    (root / "garbage.pt").write_bytes(b"this is not a checkpoint")
    torch.save({"format": "cyclemerge-checkpoint/1", "model": {"arch": "vgg16"}, "state_dict": {}}, root / "vgg.pt")
    torch.save(build_model(ModelConfig(arch="resnet20"), in_channels=1, image_size=8, num_classes=4).state_dict(),
               root / "resnet.pt")
    torch.save(mlp_state(hidden=(32, 24)), root / "wide.pt")
    cases = {
        "nope.pt": f"train.checkpoints: {root / 'nope.pt'} does not exist",
        "garbage.pt": f"train.checkpoints: {root / 'garbage.pt'} is not a readable PyTorch checkpoint",
        "vgg.pt": f"train.checkpoints: {root / 'vgg.pt'} holds a 'vgg16' model but model.arch is 'mlp'",
        "resnet.pt": f"train.checkpoints: {root / 'resnet.pt'} does not match model.arch='mlp': missing keys",
        "wide.pt": f"train.checkpoints: {root / 'wide.pt'} has mismatched shapes (layers.0.weight: (32, 64) vs "
                   "expected (24, 64)",
    }
    for bad, message in cases.items():
        code, _, err = cli(root, "--stage", "train", "--set", f"train.checkpoints=[good_0.pt, {bad}]")
        assert code == 1 and f"error: {message}" in err, (bad, err)
        assert artifact_files(root) == [], bad


@pytest.mark.slow
def test_a_non_finite_checkpoint_is_dropped_with_a_warning_and_the_rest_merge(ckpt_project, cli, prefect_harness):
    root = ckpt_project
    broken = mlp_state(seed=5)
    broken["layers.1.weight"][0, 0] = float("nan")
    torch.save(broken, root / "nan.pt")
    code, out, err = cli(root, "--set", "train.checkpoints=[good_0.pt, nan.pt, good_1.pt, good_2.pt]")
    assert code == 0, err[-3000:]
    assert "warning: model 1 flagged by the pre-filter and dropped: " in out
    align = json.loads((root / "metrics" / "align.json").read_text())
    assert align["dropped"] == [1] and align["models"] == [0, 2, 3] and align["cycle_error"] == 0.0
    evaluate = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert sorted(evaluate["endpoints"]) == ["mean", "model 0", "model 2", "model 3"]
    merged = torch.load(root / "artifacts" / "merged" / "merged.pt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert "model 1 dropped by the pre-filter" in (root / "reports" / "summary.md").read_text()


@pytest.mark.slow
def test_fewer_than_two_usable_models_is_a_clear_error(ckpt_project, cli, prefect_harness):
    root = ckpt_project
    broken = mlp_state(seed=5)
    broken["layers.0.bias"][:] = float("inf")
    torch.save(broken, root / "inf.pt")
    code, _, err = cli(root, "--set", "train.checkpoints=[good_0.pt, inf.pt]")
    assert code == 1
    assert "error: only 1 model(s) passed the pre-filter" in err and "merging needs at least 2" in err
    assert not (root / "artifacts" / "alignment").exists()
    assert len(artifact_files(root)) == 4  # the imported models and their statistics are kept


# --- data -----------------------------------------------------------------------------------------


def test_missing_data_that_cannot_be_downloaded_says_what_was_tried(tmp_path, cli, monkeypatch, prefect_harness):
    from cyclemerge.data import sources

    root = make_project(tmp_path / "proj", {"data": {"name": "fashion_mnist", "root": "data", "download": True},
                                            "tracking": {"enabled": False}})

    def offline(spec, into):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setitem(sources.SYSTEM_FOLDERS, "fashion_mnist", (str(tmp_path / "no-system-copy"),))
    monkeypatch.setattr(sources, "torchvision_download", offline)
    code, _, err = cli(root, "--stage", "train")
    assert code == 1
    assert "error: fashion_mnist: no usable copy of the dataset was found. Tried, in order:" in err
    assert f"1. data.root: {root / 'data' / 'FashionMNIST' / 'raw'} (folder does not exist)" in err
    assert f"3. download into {root / 'data'}: failed (OSError: [Errno -3] Temporary failure" in err
    assert "sudo apt-get install dataset-fashion-mnist" in err
    assert artifact_files(root) == []


def test_a_corrupted_data_file_is_named_with_the_fix(tmp_path, cli, prefect_harness):
    root = make_project(tmp_path / "proj", {"data": {"name": "fashion_mnist", "root": "data", "download": False},
                                            "tracking": {"enabled": False}})
    raw = root / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / f"{name}.gz").write_bytes(gzip.compress(b"\0" * 64))
    cut_off = gzip.compress(random.Random(0).randbytes(4096))[:1000]  # a download that stopped part way
    (raw / "train-images-idx3-ubyte.gz").write_bytes(cut_off)
    code, _, err = cli(root, "--stage", "train")
    assert code == 1
    assert f"error: {raw / 'train-images-idx3-ubyte.gz'}: cannot be decompressed" in err
    assert "the file is damaged or was only partly downloaded" in err
    assert artifact_files(root) == []


def test_a_calibration_slice_larger_than_the_train_split_exits_2(tmp_path, cli, prefect_harness):
    root = make_project(tmp_path / "proj", {"data": {"calibration_size": 1000, "validation_size": 0}, "tracking": {"enabled": False}})
    code, _, err = cli(root, "--stage", "train")
    assert code == 2
    assert "error: data.calibration_size is 1000 but the synthetic train split has 600 samples" in err
    assert "Fix: set data.calibration_size to at most 599" in err


# --- crashes, concurrent runs, tracking -----------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_mid_stage_leaves_no_partial_artifact_and_the_rerun_resumes(tmp_path, cli, monkeypatch, caplog,
                                                                          prefect_harness):
    """Ctrl-C while repair writes merged.pt, with an unreachable MLflow store (on_error: warn)."""
    import tasks.repair
    from cyclemerge import io
    from tasks.common import Project, ProjectLock

    torch.set_num_threads(1)
    root = make_project(tmp_path / "proj", {"tracking": {"uri": "http://127.0.0.1:9", "on_error": "warn"}})

    def interrupted_save(obj, path):
        def half_then_ctrl_c(f):
            f.write(b"PK\x03\x04" + bytes(1000))  # the start of a torch zip archive
            raise KeyboardInterrupt

        return io._atomic(path, half_then_ctrl_c)  # the writer every artifact goes through

    monkeypatch.setattr(tasks.repair, "save_model_checkpoint", interrupted_save)
    code, out, err = cli(root)
    assert code == 130 and "interrupted: every finished stage is kept; run the same command again" in err
    assert stage_status(out) == {s: "done" for s in STAGES[:STAGES.index("repair")]}
    assert not (root / "artifacts" / "merged").exists() or not any((root / "artifacts" / "merged").iterdir())
    assert not (root / "metrics" / "repair.json").exists()
    with ProjectLock(Project.load(root)):  # the interrupted run let go of the project
        pass

    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cyclemerge.tracking"):
        code, out, err = cli(root)
    assert code == 0, err[-3000:]
    assert stage_status(out) == {**{s: "cached" for s in STAGES[:STAGES.index("repair")]}, "repair": "done", "evaluate": "done"}
    ck = torch.load(root / "artifacts" / "merged" / "merged.pt", weights_only=False)
    assert ck["format"] == "cyclemerge-checkpoint/1" and not list(root.rglob("*.tmp"))
    # The store was unreachable: one warning for the run, and no result lost.
    skipped = [r.getMessage() for r in caplog.records if "tracking skipped" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith("MLflow store http://127.0.0.1:9 is not usable (")
    assert json.loads((root / "metrics" / "evaluate.json").read_text())["merged"]["test_acc"] > 0.6


def test_an_unreachable_mlflow_store_with_on_error_fail_stops_before_any_work(tmp_path, cli, prefect_harness):
    root = make_project(tmp_path / "proj", {"tracking": {"uri": "http://127.0.0.1:9", "on_error": "fail"}})
    code, _, err = cli(root)
    assert code == 1 and "error: MLflow store http://127.0.0.1:9 is not usable: " in err
    assert artifact_files(root) == []


def test_a_second_run_in_the_same_folder_refuses_clearly(tmp_path, cli, prefect_harness):
    from tasks.common import Project, ProjectLock

    root = make_project(tmp_path / "proj")
    with ProjectLock(Project.load(root)):
        for args in ([], ["--stage", "train"], ["--run-dvc"]):
            code, _, err = cli(root, *args)
            assert code == 2, args
            assert f"error: another cyclemerge run holds {root / '.pipeline.lock'} (pid " in err
            assert "wait for it to finish — two runs in one project folder would overwrite each other's" in err
    assert artifact_files(root) == [] and not (root / "mlflow.db").exists()

"""Shared fixtures: a tiny project folder (synthetic data, small MLPs), tiny models of every
architecture, one torch thread for modules of many tiny tensor ops, and Prefect's test harness."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "data": {"name": "synthetic", "calibration_size": 120, "validation_size": 0,
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


class RunsShell:
    """What a hostile checkpoint hides: unpickling calls os.system, which creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensor ops: on a shared 2-core machine a second intra-op
    thread only adds synchronisation waits (measured 20x slower). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model_configs() -> dict:
    from cyclemerge.config import ModelConfig

    return {
        "mlp": ModelConfig(arch="mlp", hidden=[24, 16, 12]),
        "resnet20-ln": ModelConfig(arch="resnet20", norm="layernorm"),
        "resnet20-bn": ModelConfig(arch="resnet20", norm="batchnorm"),
        "vgg16": ModelConfig(arch="vgg16"),
    }


TINY_MODELS = _model_configs()
CHANNELS, SIZE = 3, 8


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny model of ``TINY_MODELS[name]`` with non-trivial norms, shortcut affines and BN running
    statistics, so that its channels (and different seeds) differ."""
    from cyclemerge.models import ChannelAffine, LayerNorm2d, build_model

    torch.manual_seed(seed)
    model = build_model(TINY_MODELS[name], in_channels=CHANNELS, image_size=SIZE, num_classes=10)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LayerNorm2d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if isinstance(m, ChannelAffine):
                m.scale.uniform_(0.5, 1.5, generator=g)
                m.shift.normal_(0.0, 0.3, generator=g)
    return model.eval()


# --- every stage's task body on a tiny project, with the params it reads recorded ------------------

# Sections that say where results are logged and how tasks are scheduled, never what they contain:
# no stage declares them, so a changed tracking URI or worker count reruns nothing.
INFRASTRUCTURE = ("tracking", "orchestration")


@contextmanager
def recorded_params():
    """Record every config field a block reads, as dotted keys (``align.max_iter``).

    A recording proxy around the Config sections: ``Section.__getattribute__`` notes each field read
    (nested sections by their path), ``model_dump`` of a section counts as reading all of it, and a
    ``model_copy(update=...)`` does not count reads of the keys it overrode. The whole-config
    fingerprint (``Config.section_hash``, provenance in artifacts) is not a read of any one key.
    """
    from cyclemerge.config import Config, Section

    prefixes: dict[type, str] = {}

    def walk(cls: type, prefix: str) -> None:
        for name, f in cls.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, Section):
                prefixes[f.annotation] = prefix + name
                walk(f.annotation, prefix + name + ".")

    walk(Config, "")
    reads: set[str] = set()
    overridden: dict[int, frozenset[str]] = {}
    get, copy, dump = Section.__getattribute__, Section.model_copy, Section.model_dump

    def getattribute(self, name):
        value = get(self, name)
        cls = type(self)
        if cls in prefixes and name in cls.model_fields and not isinstance(value, Section) \
                and name not in overridden.get(id(self), ()):
            reads.add(f"{prefixes[cls]}.{name}")
        return value

    def model_copy(self, *, update=None, deep=False):
        out = copy(self, update=update, deep=deep)
        overridden[id(out)] = overridden.get(id(self), frozenset()) | frozenset(update or ())
        return out

    def model_dump(self, *args, **kwargs):
        if type(self) in prefixes:
            reads.add(prefixes[type(self)])
        return dump(self, *args, **kwargs)

    Section.__getattribute__, Section.model_copy, Section.model_dump = getattribute, model_copy, model_dump
    try:
        yield reads
    finally:
        Section.__getattribute__, Section.model_copy, Section.model_dump = get, copy, dump


def run_stage_bodies(root: Path) -> dict:
    """Every stage's task bodies (``.fn()``, no Prefect run, no MLflow) in pipeline order, as the flows
    call them; returns ``{stage: (what the tasks returned, the params they read)}``."""
    from tasks import activations, align, baselines, evaluate, gates, repair, train
    from tasks.common import Project

    project = Project.load(root)
    cfg = project.cfg
    out: dict[str, tuple] = {}

    def stage(name, body):
        with recorded_params() as reads:
            result = body()
        out[name] = (result, {r for r in reads if r.split(".")[0] not in INFRASTRUCTURE})

    def train_body():
        if cfg.train.checkpoints:
            results = train.import_user_checkpoints.fn(project, key="k", parent_run_id=None)
        else:
            results = [train.train_seed.fn(project, key="k", index=i, seed=s, parent_run_id=None)
                       for i, s in enumerate(cfg.train.model_seeds())]
        return results, train.summarize_training.fn(project, results, seconds=1.0)

    def activations_body():
        n = len(list(project.models_dir.glob("model_*.pt")))
        results = [activations.model_stats.fn(project, key="k", index=i) for i in range(n)]
        if cfg.activations.correlations:
            results.append(activations.cross_correlations.fn(project, key="k"))
        return activations.summarize_activations.fn(project, results, models=n)

    stage("train", train_body)
    stage("activations", activations_body)
    for name, module in (("align", align), ("baselines", baselines), ("gates", gates), ("repair", repair),
                         ("evaluate", evaluate)):
        stage(name, lambda module=module: module.stage_task.fn(project, key="k", run_id=None))
    return out


@pytest.fixture(scope="session")
def tiny_stages(tmp_path_factory) -> tuple[Path, dict]:
    """The default tiny project (C2M3, gates, REPAIR, every baseline, the cycle) run stage by stage."""
    torch.set_num_threads(1)
    root = make_project(tmp_path_factory.mktemp("stages") / "proj", {"tracking": {"enabled": False}})
    return root, run_stage_bodies(root)


@pytest.fixture(scope="session")
def tiny_stages_variant(tiny_stages, tmp_path_factory) -> tuple[Path, dict]:
    """The branches the default leaves out: the user's checkpoints (the default run's models), a
    validation slice, activation-cost matching with restarts chosen by calibration loss, no gates,
    no repair."""
    root, _ = tiny_stages
    models = sorted(str(p) for p in (root / "artifacts" / "models").glob("model_*.pt"))
    variant = make_project(tmp_path_factory.mktemp("variant") / "proj", {
        "tracking": {"enabled": False}, "train": {"checkpoints": models}, "data": {"validation_size": 60},
        "activations": {"correlations": True},
        "align": {"cost": "activations", "restarts": 2, "select_by": "calibration_loss"},
        "gates": {"enabled": False}, "repair": {"method": "none"}, "evaluate": {"baselines": ["naive", "ensemble"]},
    })
    return variant, run_stage_bodies(variant)

"""The public API: ``cyclemerge.merge`` for the common case, the stage functions it composes, and the
README's "From Python" example run verbatim."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import cyclemerge
from cyclemerge import api
from cyclemerge.config import Config
from cyclemerge.data import load_data
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"data": {"name": "synthetic", "calibration_size": 120, "validation_size": 0,
                  "synthetic": {"num_train": 600, "num_test": 200, "num_classes": 4, "image_size": 8}},
         "model": {"hidden": [24, 24]}, "train": {"epochs": 3, "batch_size": 64, "lr": 0.01},
         "align": {"max_iter": 30}, "gates": {"steps": 15, "batch_size": 60}}


@pytest.fixture(scope="module")
def setting():
    config = Config.model_validate(SMALL)
    data = load_data(config.data)
    trained = [api.train_model(config, data, seed) for seed in (1, 2, 3)]
    return config, data, trained


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    assert len(section.strip().splitlines()) <= 15, "the README's From Python section stays short"
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_verbatim_and_prints_a_merged_accuracy(tmp_path):
    out = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    accuracy = float(re.fullmatch(r"merged test accuracy: (\d\.\d{3})", out.stdout.strip()).group(1))
    assert accuracy > 0.5  # 10 synthetic classes: chance is 0.1


def test_merge_takes_modules_or_state_dicts_and_any_calibration_form(setting):
    config, data, trained = setting
    x, y = data.calibration_set()
    sds = [t.state_dict for t in trained]
    by_dicts = cyclemerge.merge(sds, calibration=(x, y), config=config)
    modules = []
    for sd in sds:
        m = api.build_model(config.model, in_channels=1, image_size=8, num_classes=4)
        m.load_state_dict(sd)
        modules.append(m)
    for calibration in (TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=50)):
        other = cyclemerge.merge(modules, calibration=calibration, config=config)
        assert all(torch.equal(other.state_dict[k], by_dicts.state_dict[k]) for k in by_dicts.state_dict)
    assert all(torch.equal(sd[k], t.state_dict[k]) for sd, t in zip(sds, trained) for k in sd)  # inputs untouched


def test_merge_is_the_pipeline_composition_of_the_stage_functions(setting):
    config, data, trained = setting
    sds = [t.state_dict for t in trained]
    calibration = api.calibration_slice(data, len(data.calib_idx))
    result = cyclemerge.merge(sds, calibration=calibration, config=config)
    model = api.build_model(config.model, in_channels=1, image_size=8, num_classes=4)
    stats = [api.activation_stats(model, sd, calibration[0], config) for sd in sds]
    alignment = api.align(sds, model, config)
    gates = api.learn_gates(model, alignment, calibration, config)
    merged = api.repair(model, alignment, gates, calibration, config, endpoint_stats=stats)
    assert all(torch.equal(merged.state_dict[k], result.state_dict[k]) for k in merged.state_dict)
    report = result.report
    assert report["method"] == "c2m3" and report["cycle_error"] == 0.0 and report["objective"] == alignment.objective
    assert set(report["timings"]) == {"activations", "align", "gates", "repair"} and report["gates"]["learned"]
    assert result.score(data.test_x, data.test_y)["acc"] > 0.6
    assert torch.equal(result.model(data.test_x[:5]), api.load_into(model, result.state_dict)(data.test_x[:5]))


def test_merging_copies_of_one_model_returns_that_model(setting):
    config, data, trained = setting
    one = trained[0].state_dict
    result = cyclemerge.merge([copy.deepcopy(one) for _ in range(3)], calibration=data.calibration_set(),
                              config=config)
    x = data.test_x[:50]
    reference = api.load_into(api.build_model(config.model, in_channels=1, image_size=8, num_classes=4), one)
    torch.testing.assert_close(result.model(x), reference.eval()(x), rtol=1e-4, atol=1e-4)


def test_merge_explains_inputs_it_cannot_use(setting):
    config, data, trained = setting
    calibration = data.calibration_set()
    with pytest.raises(ValueError, match="at least 2 models"):
        cyclemerge.merge([trained[0].state_dict], calibration=calibration, config=config)
    wider = Config.model_validate({**SMALL, "model": {"hidden": [32, 24]}})
    with pytest.raises(ValueError, match="model 1 does not fit the architecture"):
        cyclemerge.merge([trained[0].state_dict, api.train_model(wider, data, 1).state_dict], calibration=calibration,
                         config=config)
    with pytest.raises(TypeError, match="has no perm_spec"):
        cyclemerge.merge([torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)], calibration=calibration)
    with pytest.raises(TypeError, match="calibration: expected"):
        cyclemerge.merge([t.state_dict for t in trained], calibration=[1, 2, 3], config=config)


def test_results_survive_their_artifact_form(setting, tmp_path):
    from cyclemerge.io import load_torch, save_torch, without_wall_clock
    from cyclemerge.results import Alignment, Gates

    config, data, trained = setting
    model = api.build_model(config.model, in_channels=1, image_size=8, num_classes=4)
    alignment = api.align([t.state_dict for t in trained], model, config)
    back = Alignment.from_artifact(load_torch(save_torch(alignment.to_artifact(), tmp_path / "a.pt")))
    assert without_wall_clock(back.metrics()) == without_wall_clock(alignment.metrics())  # wall clock is not saved
    assert all(torch.equal(p[g], q[g]) for p, q in zip(back.perms, alignment.perms) for g in p)
    gates = api.learn_gates(model, alignment, data.calibration_set(), config)
    again = Gates.from_artifact(load_torch(save_torch(gates.to_artifact(), tmp_path / "g.pt")))
    assert without_wall_clock(again.metrics()) == without_wall_clock(gates.metrics())


def test_the_package_exports_resolve_lazily():
    assert cyclemerge.merge is api.merge and cyclemerge.Alignment is api.Alignment
    assert set(cyclemerge.__all__) <= set(dir(cyclemerge))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cyclemerge.nope  # noqa: B018

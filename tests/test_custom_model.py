"""User architectures in the pipeline (``model.arch: custom``): the factory is imported, never unpickled,
its spec derived and verified; every failure names model.factory; models with block-structured tensors
(torch.cat, flatten into a Linear) are matched on views and mapped into the universe exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from cyclemerge import universe
from cyclemerge.activations import channel_stats, permute_stats
from cyclemerge.config import AlignConfig, ConfigError, GatesConfig, ModelConfig, config_from_dict
from cyclemerge.gates import make_plan
from cyclemerge.models import build_model
from cyclemerge.permutation import apply_perms
from cyclemerge.spec import derive_spec
from tests.fixtures.user_cnn import build as build_user_cnn

USER_CNN = "tests.fixtures.user_cnn:build"


def custom(factory: str = USER_CNN, **fields) -> ModelConfig:
    return ModelConfig(arch="custom", factory=factory, **fields)


def build(cfg: ModelConfig, in_channels: int = 1, image_size: int = 16, num_classes: int = 10) -> nn.Module:
    return build_model(cfg, in_channels=in_channels, image_size=image_size, num_classes=num_classes)


# Factories for the failure cases, importable as tests.test_custom_model:<name>.
NOT_CALLABLE = 42


def not_a_model(**kwargs):
    return {"weights": torch.zeros(3)}


def sorting_cnn(num_classes: int = 10, in_channels: int = 1):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), Sorted(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


class Sorted(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=1).values


# --- configuration -----------------------------------------------------------------------------------

@pytest.mark.parametrize("model, needles", [
    ({"arch": "custom"}, ["model.factory", "needs a factory", "package.module:function"]),
    ({"arch": "custom", "factory": "tests.fixtures.user_cnn.build"}, ["model.factory", "not \"package.module:function\""]),
    ({"arch": "custom", "factory": "tests/fixtures/user_cnn.py:build"}, ["model.factory", "one colon"]),
    ({"arch": "custom", "factory": "a:b:c"}, ["model.factory", "'a:b:c'"]),
    ({"arch": "custom", "factory": USER_CNN, "kwargs": {"not valid": 1}}, ["model.kwargs", "'not valid'"]),
    ({"arch": "mlp", "factory": USER_CNN}, ["model.factory applies only to model.arch: custom", "'mlp'"]),
    ({"arch": "resnet20", "opaque_modules": ["stages.0"]}, ["model.opaque_modules applies only"]),
])
def test_bad_custom_model_params_fail_on_load(model, needles):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": model}, source="params.yaml")
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} missing from:\n{err.value}"


@pytest.mark.parametrize("factory, kwargs, needles", [
    ("no_such_package.models:build", {}, ["model.factory 'no_such_package.models:build'", "cannot import",
                                           "'no_such_package'", "python -c 'import no_such_package.models'"]),
    ("tests.fixtures.user_cnn:buld", {}, ["has no attribute 'buld'", "build"]),
    ("tests.test_custom_model:NOT_CALLABLE", {}, ["is a int, not callable"]),
    (USER_CNN, {"depth": 3}, ["raised TypeError", "depth", "fix model.kwargs"]),
    (USER_CNN, {"width": -4}, ["raised RuntimeError", "\"width\": -4"]),
    ("tests.test_custom_model:not_a_model", {}, ["returned a dict, not a torch.nn.Module"]),
    (USER_CNN, {"num_classes": 7}, ["to [2, 7]", "logits of shape [2, 10]", "model.kwargs"]),
    (USER_CNN, {"in_channels": 3}, ["fails on one batch of the dataset's shape [2, 1, 16, 16]"]),
])
def test_factory_failures_name_the_factory_and_the_fix(factory, kwargs, needles):
    with pytest.raises(ConfigError) as err:
        build(custom(factory, kwargs=kwargs))
    message = str(err.value)
    assert message.startswith("model.factory ") or message.startswith(f"model.factory {factory!r}")
    for needle in needles:
        assert needle in message, f"{needle!r} missing from:\n{message}"


def test_an_op_without_a_rule_is_refused_before_training_and_opaque_modules_pass():
    with pytest.raises(ConfigError) as err:
        build(custom("tests.test_custom_model:sorting_cnn"))
    message = str(err.value)
    assert "model.factory 'tests.test_custom_model:sorting_cnn'" in message and "torch.sort" in message
    assert 'model.opaque_modules: ["1"]' in message
    model = build(custom("tests.test_custom_model:sorting_cnn", opaque_modules=["1"]))
    # The sort fixes the conv's channels, so nothing is permuted, but the model is still mergeable.
    assert model.derived_spec().groups == {} and set(model.layer_parts()) == {"0", "4"}
    with pytest.raises(ConfigError, match=r"model.opaque_modules: \['blocks.3'\] are not modules"):
        build(custom("tests.test_custom_model:sorting_cnn", opaque_modules=["blocks.3"]))


# --- building ----------------------------------------------------------------------------------------

def test_build_model_calls_the_factory_with_the_dataset_shape_and_attaches_a_verified_spec():
    torch.manual_seed(0)
    model = build(custom(kwargs={"width": 8}), in_channels=3, image_size=12, num_classes=5)
    torch.manual_seed(0)
    direct = build_user_cnn(num_classes=5, in_channels=3, width=8)
    # Same weights as calling the factory yourself: deriving the spec draws nothing from torch's RNG.
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))
    spec = model.derived_spec()
    assert spec.max_relative_change is not None and spec.max_relative_change < 1e-5
    assert spec.groups == derive_spec(direct, torch.zeros(1, 3, 12, 12), verify=False).groups
    assert spec.groups == {"stem": 8, "block1.narrow": 4, "block1.wide": 4, "down": 16, "block2.narrow": 8,
                           "block2.wide": 8}
    assert model.perm_spec() == spec.perm_spec and model.stat_points() == spec.stat_points
    assert "head.weight[1:0:64]" in model.perm_spec()  # a flatten block: matched on its view
    assert model(torch.zeros(2, 3, 12, 12)).shape == (2, 5)


def test_checkpoints_that_do_not_fit_the_factory_name_the_file_and_the_factory(tmp_path):
    from types import SimpleNamespace

    from cyclemerge.io import CheckpointError
    from cyclemerge.train import import_checkpoints

    data = SimpleNamespace(in_channels=1, image_size=16, num_classes=10)
    cfg = custom(kwargs={"width": 8})
    good = [tmp_path / f"good{i}.pt" for i in range(2)]
    for i, path in enumerate(good):
        torch.manual_seed(i)
        torch.save(build_user_cnn(width=8).state_dict(), path)
    assert [set(sd) for sd in import_checkpoints(good, cfg, data)] == [set(build(cfg).state_dict())] * 2
    narrow = tmp_path / "narrow.pt"
    torch.save(build_user_cnn(width=4).state_dict(), narrow)
    with pytest.raises(CheckpointError) as err:
        import_checkpoints([good[0], narrow], cfg, data)
    message = str(err.value)
    assert str(narrow) in message and "mismatched shapes" in message and f"model.factory {USER_CNN!r}" in message
    assert "model.kwargs" in message
    other = tmp_path / "other.pt"
    torch.save(sorting_cnn().state_dict(), other)
    with pytest.raises(CheckpointError) as err:
        import_checkpoints([good[0], other], cfg, data)
    message = str(err.value)
    assert str(other) in message and f"does not match model.factory {USER_CNN!r}" in message
    assert "set model.factory and model.kwargs" in message


# --- block-structured specs through the pipeline's one map ------------------------------------------------

def trained_like(seed: int, width: int = 8) -> nn.Module:
    """A user CNN with non-trivial norms (fresh ones are permutation invariant and hide missing ties)."""
    torch.manual_seed(seed)
    model = build(custom(kwargs={"width": width}))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return model.eval()


def test_mapping_into_the_universe_keeps_the_function_of_a_model_with_cat_and_flatten_blocks():
    model = trained_like(1)
    spec = universe.spec_of(model)
    assert spec.composite_keys
    sd = model.state_dict()
    perms = {g: torch.randperm(n, generator=torch.Generator().manual_seed(3)) for g, n in spec.groups.items()}
    [mapped] = universe.to_universe_all([sd], spec, [perms])
    assert set(mapped) == set(sd) and any(not torch.equal(mapped[k], sd[k]) for k in spec.composite_keys)
    x = torch.randn(4, 1, 16, 16)
    moved = copy.deepcopy(model)
    moved.load_state_dict(mapped)
    with torch.no_grad():
        torch.testing.assert_close(moved(x), model(x), rtol=1e-4, atol=1e-5)
    # The same as permuting the views the matchers read and putting the pieces back.
    via_views = spec.unview(apply_perms(spec.view(sd), spec.perm_spec, perms))
    assert all(torch.equal(via_views[k], mapped[k]) for k in sd)


def test_c2m3_on_views_undoes_planted_permutations_of_a_user_cnn():
    base = trained_like(2).state_dict()
    spec = universe.spec_of(trained_like(2))
    g = torch.Generator().manual_seed(7)
    planted = [{gr: torch.randperm(n, generator=g) for gr, n in spec.groups.items()} for _ in range(3)]
    copies = [universe.permute(base, spec, p) for p in planted]
    result = universe.match_models(state_dicts=copies, spec=spec, config=AlignConfig(method="c2m3", max_iter=50))
    aligned = universe.to_universe_all(copies, spec, result.perms)
    for sd in aligned[1:]:
        assert all(torch.equal(sd[k], aligned[0][k]) for k in base)
    assert universe.alignment_objective(copies, spec, result.perms) > universe.alignment_objective(copies, spec, planted)
    perms = universe.match_pair_models(copies[0], copies[1], spec, seed=0, max_iter=20)
    assert all(torch.equal(a, b) for a, b in zip(universe.permute(copies[1], spec, perms).values(), copies[0].values()))
    mapped, _ = universe.map_into_universe(copies[2], aligned[:2], spec)
    assert all(torch.equal(mapped[k], aligned[0][k]) for k in base)


def test_stats_and_gate_parts_of_a_user_cnn_follow_the_universe():
    model = trained_like(3)
    spec = universe.spec_of(model)
    x = torch.randn(16, 1, 16, 16)
    perms = {g: torch.randperm(n, generator=torch.Generator().manual_seed(5)) for g, n in spec.groups.items()}
    stats = channel_stats(model, x, batch_size=16, points=spec.stat_points)
    moved = copy.deepcopy(model)
    moved.load_state_dict(universe.permute(model.state_dict(), spec, perms))
    # REPAIR's statistics of universe channel j are the model's channel perms[group][j].
    expected = permute_stats(stats, perms, spec.stat_points)
    for point, got in channel_stats(moved, x, batch_size=16, points=spec.stat_points).items():
        torch.testing.assert_close(got.mean, expected[point].mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.var, expected[point].var, rtol=1e-4, atol=1e-5)
    sds = [model.state_dict(), moved.state_dict()]
    for granularity in ("layer", "channel"):
        plan = make_plan(sds, model.layer_parts(), GatesConfig(granularity=granularity), spec=model.perm_spec())
        assert set(plan.parts) == set(model.layer_parts())
    plan = make_plan(sds, model.layer_parts(), GatesConfig(granularity="channel"), spec=model.perm_spec())
    assert plan.rows["block1.mix"].stop - plan.rows["block1.mix"].start == 8
    assert plan.rows["block1.norm"].stop - plan.rows["block1.norm"].start == 8


def test_a_hand_written_spec_is_a_plain_derived_spec():
    model = build_model(ModelConfig(arch="mlp", hidden=[6, 5]), in_channels=1, image_size=3, num_classes=4)

    class HandWritten(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x)

        def perm_spec(self):
            return {f"inner.{k}": v for k, v in model.perm_spec().items()}

    hand = HandWritten()
    spec = universe.spec_of(hand)
    assert spec.perm_spec == hand.perm_spec() and spec.groups == {"h0": 6, "h1": 5} and not spec.composite_keys
    perms = {"h0": torch.randperm(6), "h1": torch.randperm(5)}
    sd = hand.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(universe.permute(sd, spec, perms).values(),
                                                 apply_perms(sd, hand.perm_spec(), perms).values()))


# --- end to end ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dvc_repro_merges_user_cnns_from_a_factory(tmp_path):
    """The whole DAG through ``dvc repro`` with ``model.arch: custom`` on the fixture CNN (cat, GroupNorm,
    residual adds, a flatten into the classifier) and a tiny data slice."""
    import json

    from tests.conftest import make_project
    from tests.test_pipeline import FASHION, _run

    small = {"model": {"arch": "custom", "factory": USER_CNN, "kwargs": {"width": 4}},
             "evaluate": {"baselines": ["naive", "merge_many", "ensemble"], "cycle": False},
             "gates": {"steps": 5}}
    if FASHION.exists():
        small |= {"data": {"name": "fashion_mnist", "root": str(tmp_path / "data"), "calibration_size": 200, "validation_size": 0,
                           "train_subset": 600, "test_subset": 300}}
    root = make_project(tmp_path / "proj", small)
    (root / "tests").symlink_to(Path(__file__).resolve().parent)  # the factory's package, as a user's would be
    env = {"OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PREFECT_HOME": str(tmp_path / "prefect")}
    assert _run(["git", "init", "-q"], root).returncode == 0
    assert _run(["dvc", "init", "-q"], root).returncode == 0
    run = _run(["dvc", "repro"], root, **env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for stage in ("train", "activations", "align", "baselines", "gates", "repair", "evaluate"):
        assert f"Running stage '{stage}'" in run.stdout
    ev = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert {"C2M3 uniform", "C2M3 uniform + repair", "C2M3 + gates", "C2M3 + gates + repair", "MergeMany",
            "MergeMany + repair", "naive average", "naive average + repair"} <= set(ev["methods"])
    for block in (ev["ensemble"], ev["merged"], *ev["endpoints"].values()):
        assert 0.0 <= block["test_acc"] <= 1.0 and block["test_loss"] > 0
    align = json.loads((root / "metrics" / "align.json").read_text())
    assert align["cycle_error"] == 0.0
    assert align["spec"]["groups"] == {"stem": 4, "block1.narrow": 2, "block1.wide": 2, "down": 8,
                                       "block2.narrow": 4, "block2.wide": 4}
    assert "head.weight" in align["spec"]["composite_keys"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cyclemerge")
    runs = client.search_runs([exp.experiment_id])
    params = {k: v for r in runs for k, v in r.data.params.items()}
    assert params["model.factory"] == USER_CNN and params["model.kwargs.width"] == "4"
    assert params["spec.groups.block1.narrow"] == "2" and params["spec.num_groups"] == "6"


def test_the_run_summary_names_the_factory_not_builtin_widths():
    from cyclemerge.config import Config
    from cyclemerge.report import params_from_config

    cfg = Config(model=custom(kwargs={"width": 16}))
    assert params_from_config(cfg)["architecture"] == f"custom (factory {USER_CNN}, kwargs {{'width': 16}})"

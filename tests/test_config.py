"""The configuration schema: params.yaml mirrors it, and bad input fails early with a useful message."""

from pathlib import Path

import pytest
import yaml

from cyclemerge.config import Config, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_mirrors_the_schema_defaults():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert Config.model_validate(raw).model_dump() == Config().model_dump()
    assert set(raw) == set(Config.model_fields)
    for section, fields in raw.items():
        assert set(fields) == set(Config.model_fields[section].annotation.model_fields), section


def test_every_dvc_stage_lists_existing_params_sections():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    dumped = Config().model_dump()
    for name, stage in stages.items():
        for entry in stage["params"]:
            node = dumped
            for part in entry.split("."):
                assert part in node, f"dvc.yaml stage {name} lists unknown param {entry}"
                node = node[part]


@pytest.mark.parametrize("raw, needles", [
    ({"gates": {"lamda": 0.1}}, ["gates.lamda", "unknown key", "lam"]),
    ({"bogus": {}}, ["bogus", "unknown key", "data", "gates"]),
    ({"train": {"num_models": 1}}, ["train.num_models", "greater than or equal to 2"]),
    ({"model": {"width": 0}}, ["model.width", "greater than or equal to 1"]),
    ({"model": {"hidden": [64, 0]}}, ["model.hidden", ">= 1"]),
    ({"data": {"name": "imagenet"}}, ["data.name", "fashion_mnist", "cifar100", "synthetic"]),
    ({"model": {"arch": "vit"}}, ["model.arch", "mlp", "resnet20", "vgg16"]),
    ({"align": {"method": "zipit"}}, ["align.method", "c2m3", "merge_many"]),
    ({"train": {"epochs": "many"}}, ["train.epochs", "integer"]),
    ({"train": {"num_models": 3, "seeds": [1, 2]}}, ["train.seeds", "num_models"]),
    ({"gates": {"ungated_rule": "median"}}, ["gates.ungated_rule", "model:<k>"]),
])
def test_bad_params_fail_with_the_key_and_the_allowed_values(raw, needles):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="params.yaml")
    msg = str(err.value)
    assert msg.startswith("params.yaml: invalid configuration")
    for needle in needles:
        assert needle in msg, f"{needle!r} missing from:\n{msg}"


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("gates: {lam: 0.5}\n")
    cfg = load_config(p, ["gates.lam=0.25", "model.hidden=[8, 8]", "train.seeds=null"])
    assert cfg.gates.lam == 0.25 and cfg.model.hidden == [8, 8] and cfg.train.seeds is None
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["gates.lam"])
    with pytest.raises(ConfigError, match="gates.lam"):
        load_config(p, ["gates.lam=-1"])
    # A bad --set key is blamed on the override, not on the (valid) params file alone.
    with pytest.raises(ConfigError, match=r"p.yaml with --set gates.lamda=0.1(.|\n)*gates.lamda: unknown key"):
        load_config(p, ["gates.lamda=0.1"])


def test_section_hash_changes_only_with_its_sections():
    a, b = Config(), Config()
    b.gates.lam = 0.5
    assert a.section_hash("train", "align") == b.section_hash("train", "align")
    assert a.section_hash("gates") != b.section_hash("gates")
    assert a.train.model_seeds() == [1, 2, 3, 4, 5]

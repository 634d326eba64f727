"""Training of seed models and import of user checkpoints."""

import math

import pytest
import torch

from cyclemerge.config import DataConfig, ModelConfig, SyntheticConfig, TrainConfig
from cyclemerge.data import load_data
from cyclemerge.train import CheckpointError, import_checkpoints, lr_factor, make_checkpoint, model_for, train_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = DataConfig(name="synthetic", calibration_size=100, validation_size=0,
                     synthetic=SyntheticConfig(num_train=500, num_test=100, num_classes=4, image_size=8))
    return load_data(cfg, project_dir=tmp_path_factory.mktemp("d"))


MODEL = ModelConfig(arch="mlp", hidden=[16, 16])
TRAIN = TrainConfig(epochs=3, batch_size=50, lr=0.01)


def test_lr_schedules():
    assert lr_factor(0, 100, 0, "constant") == 1.0
    assert lr_factor(0, 100, 0, "cosine") == 1.0
    assert lr_factor(50, 100, 0, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, 100, 10, "warmup_cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "warmup_cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "warmup_cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_training_is_deterministic_learns_and_never_sees_calibration_or_test(data):
    a = train_model(MODEL, TRAIN, data, seed=3)
    b = train_model(MODEL, TRAIN, data, seed=3)
    c = train_model(MODEL, TRAIN, data, seed=4)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert not torch.equal(a.state_dict["layers.0.weight"], c.state_dict["layers.0.weight"])
    assert [h["epoch"] for h in a.history] == [1, 2, 3]
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    assert a.history[-1]["train_acc"] > 0.5  # 4 classes: chance is 0.25
    assert set(data.train_idx.tolist()).isdisjoint(data.calib_idx.tolist())


def test_bf16_training_learns_and_returns_plain_fp32_weights(data):
    conv = ModelConfig(arch="resnet20", width=1)
    fp32 = train_model(conv, TRAIN.model_copy(update={"epochs": 2}), data, seed=3)
    bf16 = train_model(conv, TRAIN.model_copy(update={"epochs": 2, "precision": "bf16"}), data, seed=3)
    for k, v in bf16.state_dict.items():
        assert v.dtype == fp32.state_dict[k].dtype and v.is_contiguous(), k
    assert bf16.history[-1]["train_loss"] < bf16.history[0]["train_loss"]
    # same seed, same batches: bf16 rounding moves the run, but not far from the fp32 one
    assert abs(bf16.history[-1]["train_acc"] - fp32.history[-1]["train_acc"]) < 0.15
    assert not torch.equal(bf16.state_dict["conv1.weight"], fp32.state_dict["conv1.weight"])


def test_checkpoint_carries_what_made_it(data):
    sd = model_for(MODEL, data).state_dict()
    ck = make_checkpoint(sd, MODEL, data, seed=7, params_hash="abc", metrics={"test_acc": 0.5})
    assert ck["model"]["arch"] == "mlp" and ck["seed"] == 7 and ck["params_hash"] == "abc"
    assert ck["data"] == {"name": "synthetic", "in_channels": 1, "image_size": 8, "num_classes": 4}


def test_import_checkpoints_accepts_ours_and_bare_state_dicts(data, tmp_path):
    sd = model_for(MODEL, data).state_dict()
    torch.save(make_checkpoint(sd, MODEL, data, seed=1, params_hash="x", metrics={}), tmp_path / "a.pt")
    torch.save(sd, tmp_path / "b.pt")
    out = import_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"], MODEL, data)
    assert len(out) == 2 and all(torch.equal(out[1][k], sd[k]) for k in sd)


def test_import_checkpoints_errors_name_the_file_and_the_fix(data, tmp_path):
    sd = model_for(MODEL, data).state_dict()
    good = tmp_path / "good.pt"
    torch.save(sd, good)
    with pytest.raises(CheckpointError, match="at least 2"):
        import_checkpoints([good], MODEL, data)
    with pytest.raises(CheckpointError, match=r"missing\.pt does not exist"):
        import_checkpoints([good, tmp_path / "missing.pt"], MODEL, data)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt is not a readable PyTorch checkpoint"):
        import_checkpoints([good, tmp_path / "junk.pt"], MODEL, data)
    wide = model_for(ModelConfig(arch="mlp", hidden=[32, 16]), data).state_dict()
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"wide\.pt has mismatched shapes.*layers\.0\.weight"):
        import_checkpoints([good, tmp_path / "wide.pt"], MODEL, data)
    deeper = model_for(ModelConfig(arch="mlp", hidden=[16, 16, 16]), data).state_dict()
    torch.save(deeper, tmp_path / "deeper.pt")
    with pytest.raises(CheckpointError, match=r"deeper\.pt does not match model\.arch='mlp'.*unexpected keys"):
        import_checkpoints([good, tmp_path / "deeper.pt"], MODEL, data)
    resnet = ModelConfig(arch="resnet20")
    torch.save(make_checkpoint(sd, resnet, data, seed=1, params_hash="x", metrics={}), tmp_path / "res.pt")
    with pytest.raises(CheckpointError, match=r"holds a 'resnet20' model but model\.arch is 'mlp'"):
        import_checkpoints([good, tmp_path / "res.pt"], MODEL, data)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        import_checkpoints([good, tmp_path / "list.pt"], MODEL, data)

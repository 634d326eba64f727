"""Atomic artifact writes and content hashes."""

import os

import pytest
import torch

from cyclemerge.io import file_hash, load_torch, save_torch, tensors_hash, write_json


def test_atomic_write_replaces_whole_files_and_leaves_no_temp_on_failure(tmp_path):
    path = tmp_path / "a" / "x.pt"
    save_torch({"w": torch.ones(3)}, path)
    assert torch.equal(load_torch(path)["w"], torch.ones(3))

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt  # a Ctrl-C in the middle of serialisation

    with pytest.raises(KeyboardInterrupt):
        save_torch({"w": torch.zeros(3), "boom": Boom()}, path)
    assert torch.equal(load_torch(path)["w"], torch.ones(3)), "the old artifact must survive a failed write"
    assert os.listdir(path.parent) == ["x.pt"], "no temp file may be left behind"


def test_hashes_follow_content_not_objects(tmp_path):
    sd = {"b": torch.arange(4.0), "a": torch.ones(2, 2)}
    assert tensors_hash(sd) == tensors_hash({k: v.clone() for k, v in reversed(list(sd.items()))})
    assert tensors_hash(sd) != tensors_hash({**sd, "b": torch.arange(4.0) + 1e-6})
    write_json({"x": 1}, tmp_path / "d" / "m.json")
    h = file_hash(tmp_path / "d")
    assert h == file_hash(tmp_path / "d")
    write_json({"x": 2}, tmp_path / "d" / "m.json")
    assert file_hash(tmp_path / "d") != h


def test_loading_a_damaged_empty_or_missing_file_names_it(tmp_path):
    from cyclemerge.io import CheckpointError

    save_torch({"w": torch.ones(100)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:200])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name, needle in [("cut.pt", "is not a readable PyTorch checkpoint"), ("empty.pt", "is empty (0 bytes)"),
                         ("folder.pt", "is a folder, not a checkpoint file"),
                         ("text.pt", "is not a readable PyTorch checkpoint")]:
        with pytest.raises(CheckpointError) as err:
            load_torch(tmp_path / name, label="train.checkpoints")
        assert str(err.value).startswith(f"train.checkpoints: {tmp_path / name} {needle}"), str(err.value)
    with pytest.raises(FileNotFoundError):
        load_torch(tmp_path / "missing.pt")


def test_safetensors_files_carry_a_checkpoint_or_a_bare_state_dict(tmp_path):
    from cyclemerge.io import CheckpointError, read_checkpoint_file, save_safetensors

    sd = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    save_safetensors(sd, tmp_path / "bare.safetensors")
    bare = read_checkpoint_file(tmp_path / "bare.safetensors")
    assert set(bare) == {"w", "b"} and torch.equal(bare["w"], sd["w"])
    save_safetensors(sd, tmp_path / "bad.safetensors", {"cyclemerge": "[1, 2]"})
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: its 'cyclemerge' metadata is not a JSON object"):
        read_checkpoint_file(tmp_path / "bad.safetensors")

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

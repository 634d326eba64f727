"""The data layer: offline resolution, checksums, decoding, caching, slicing and batching.

Real-format files are generated tiny in tmp_path, in torchvision's layouts; nothing needs the internet.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from cyclemerge.config import ConfigError, DataConfig, SyntheticConfig, config_from_dict
from cyclemerge.data import (
    KNOWN_MD5,
    Checksums,
    DataCorruptedError,
    DataNotFoundError,
    augment_batch,
    calibration_split,
    capped_test_indices,
    dataset_spec,
    fingerprint,
    iterate_batches,
    load_data,
    resolve_root,
    split_train,
)
from cyclemerge.data import sources
from cyclemerge.data.registry import EMNIST_CLASSES

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---------------------------------------------------------------- fixture helpers: tiny files in real layouts

def idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob, mtime=0)
    path.write_bytes(blob)
    return path


def make_idx_dataset(folder: Path, *, n_train=12, n_test=6, classes=10, offset=0, seed=0, gz=True,
                     names=IDX_NAMES) -> dict[str, np.ndarray]:
    """Random images and labels written as the four idx files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        names[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        names[1]: (np.arange(n_train) % classes + offset).astype(np.uint8),
        names[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        names[3]: (np.arange(n_test) % classes + offset).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=gz)
    return arrays


def make_cifar_dataset(folder: Path, files: dict[str, int], label_key: str, classes: int, seed=0):
    """Pickled batches as in cifar-10-batches-py / cifar-100-python; returns {file: (data [n,3072], labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in files.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, label_key: labels, "data": data}, f, protocol=2)
        written[name] = (data, labels)
    return written


def register_md5(monkeypatch, name: str, folder: Path) -> None:
    """Make the files now in ``folder`` the known-good ones for ``name`` (content digests)."""
    table = {}
    for path in folder.iterdir():
        blob = path.read_bytes()
        content = gzip.decompress(blob) if path.name.endswith(".gz") else blob
        table[path.name.removesuffix(".gz")] = Checksums(content=frozenset({hashlib.md5(content).hexdigest()}))
    monkeypatch.setitem(KNOWN_MD5, name, table)


@pytest.fixture
def no_system(monkeypatch, tmp_path):
    """No system folder, and a download that fails like it does offline."""
    monkeypatch.setattr(sources, "SYSTEM_FOLDERS", {})

    def offline(spec, root):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(sources, "torchvision_download", offline)


def cfg_for(name: str, root: Path, **kw) -> DataConfig:
    kw.setdefault("calibration_size", 4)
    kw.setdefault("validation_size", 0)
    return DataConfig(name=name, root=str(root), download=kw.pop("download", False), **kw)


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    shape = (1, len(mean), 1, 1)
    return x * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)


# ---------------------------------------------------------------- synthetic data

SMALL = SyntheticConfig(num_train=300, num_test=100, num_classes=5, channels=3, image_size=8, noise=1.0)


def test_synthetic_shape_dtype_and_normalization():
    b = load_data(DataConfig(name="synthetic", synthetic=SMALL, calibration_size=50, validation_size=0))
    assert b.train_x.shape == (300, 3, 8, 8) and b.test_x.shape == (100, 3, 8, 8)
    assert b.train_x.dtype == torch.float32 and b.train_y.dtype == torch.int64
    assert (b.num_classes, b.in_channels, b.image_size) == (5, 3, 8)
    assert torch.equal(b.train_y.bincount(), torch.full((5,), 60))
    assert b.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (b.train_x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4


def test_synthetic_is_deterministic_and_test_split_ignores_num_train():
    a = load_data(DataConfig(name="synthetic", synthetic=SMALL, calibration_size=50, validation_size=0))
    b = load_data(DataConfig(name="synthetic", synthetic=SMALL, calibration_size=50, validation_size=0))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert fingerprint(a) == fingerprint(b)
    bigger = load_data(DataConfig(name="synthetic", synthetic=SMALL.model_copy(update={"num_train": 400}),
                                  calibration_size=50, validation_size=0))
    assert torch.equal(bigger.test_y, a.test_y)
    # the test split is normalized with the train statistics, which moved a little
    assert torch.allclose(denormalize(bigger.test_x, bigger.mean, bigger.std), denormalize(a.test_x, a.mean, a.std),
                          atol=1e-5)


def test_synthetic_is_learnable_well_above_chance():
    b = load_data(DataConfig(name="synthetic", synthetic=SMALL, calibration_size=50, validation_size=0))
    means = torch.stack([b.train_x[b.train_y == k].mean(0) for k in range(5)]).flatten(1)
    predicted = torch.cdist(b.test_x.flatten(1), means).argmin(1)
    assert (predicted == b.test_y).float().mean() > 0.8  # chance is 0.2


# ---------------------------------------------------------------- calibration slice and subsets

def test_calibration_slice_is_deterministic_disjoint_and_from_train():
    cfg = DataConfig(name="synthetic", synthetic=SMALL, calibration_size=50, validation_size=0, seed=3)
    a, b = load_data(cfg), load_data(cfg)
    assert torch.equal(a.calib_idx, b.calib_idx) and torch.equal(a.train_idx, b.train_idx)
    assert len(a.calib_idx) == 50 and len(a.train_idx) == 250
    assert not set(a.calib_idx.tolist()) & set(a.train_idx.tolist())
    assert sorted(a.calib_idx.tolist() + a.train_idx.tolist()) == list(range(300))
    calib_x, calib_y = a.calibration_set()
    assert torch.equal(calib_x, a.train_x[a.calib_idx]) and torch.equal(calib_y, a.train_y[a.calib_idx])
    # no calibration image is a test image
    assert torch.cdist(calib_x.flatten(1), a.test_x.flatten(1)).min() > 1e-3
    other = load_data(cfg.model_copy(update={"seed": 4}))
    assert not torch.equal(other.calib_idx, a.calib_idx)
    assert fingerprint(other) != fingerprint(a)


def test_calibration_not_disjoint_trains_on_whole_split_and_subsets_cap():
    cfg = DataConfig(name="synthetic", synthetic=SMALL, calibration_size=50, validation_size=0, calibration_disjoint=False)
    train_idx, calib_idx = calibration_split(300, cfg)
    assert torch.equal(train_idx, torch.arange(300)) and len(calib_idx) == 50
    capped, calib2 = calibration_split(300, cfg.model_copy(update={"train_subset": 40}))
    assert len(capped) == 40 and torch.equal(calib2, calib_idx)
    disjoint = cfg.model_copy(update={"calibration_disjoint": True, "train_subset": 40})
    train3, calib3 = calibration_split(300, disjoint)
    assert len(train3) == 40 and not set(train3.tolist()) & set(calib3.tolist())


def test_test_subset_is_fixed_and_independent_of_seed():
    base = DataConfig(name="synthetic", synthetic=SMALL, calibration_size=50, validation_size=0, test_subset=30)
    a = load_data(base)
    b = load_data(base.model_copy(update={"seed": 9}))
    assert len(a.test_x) == 30 and torch.equal(a.test_idx, b.test_idx)
    full = load_data(base.model_copy(update={"test_subset": None}))
    assert torch.equal(a.test_x, full.test_x[a.test_idx]) and torch.equal(a.test_y, full.test_y[a.test_idx])
    assert torch.equal(capped_test_indices(10, 50), torch.arange(10))


@pytest.mark.parametrize("disjoint, limit", [(True, 299), (False, 300)])
def test_calibration_larger_than_train_split_is_a_clear_error(disjoint, limit):
    cfg = DataConfig(name="synthetic", synthetic=SMALL, calibration_size=limit + 1, validation_size=0, calibration_disjoint=disjoint)
    with pytest.raises(ConfigError) as err:
        load_data(cfg)
    msg = str(err.value)
    assert "data.calibration_size" in msg and "300 samples" in msg and f"at most {limit}" in msg
    assert "never the test split" in msg


def test_unknown_dataset_lists_the_known_ones():
    cfg = DataConfig.model_construct(**{**DataConfig().model_dump(), "name": "imagenet"})
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'.*fashion_mnist, mnist, emnist, cifar10"):
        dataset_spec(cfg)


def test_relative_root_resolves_against_project_dir(tmp_path):
    assert resolve_root("data", tmp_path) == tmp_path / "data"
    assert resolve_root(str(tmp_path / "abs"), "/elsewhere") == tmp_path / "abs"


# ---------------------------------------------------------------- real formats

@pytest.mark.parametrize("name, folder", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw")])
def test_idx_gz_in_torchvision_layout(tmp_path, monkeypatch, no_system, name, folder):
    arrays = make_idx_dataset(tmp_path / folder)
    register_md5(monkeypatch, name, tmp_path / folder)
    b = load_data(cfg_for(name, tmp_path))
    assert b.train_x.shape == (12, 1, 28, 28) and b.test_x.shape == (6, 1, 28, 28)
    pixels = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float()[:, None] / 255
    assert torch.allclose(denormalize(b.train_x, b.mean, b.std), pixels, atol=1e-5)
    assert b.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert b.source == str(tmp_path / folder) and b.num_classes == 10
    assert set(b.checksums) == set(IDX_NAMES)


def test_extracted_idx_files_load_too(tmp_path, no_system):
    arrays = make_idx_dataset(tmp_path / "MNIST/raw", gz=False)
    b = load_data(cfg_for("mnist", tmp_path))  # no content digests known for MNIST: structural checks only
    assert b.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_emnist_letters_are_transposed_and_shifted(tmp_path, no_system):
    names = tuple(f"emnist-letters-{s}-{k}" for s, k in
                  [("train", "images-idx3-ubyte"), ("train", "labels-idx1-ubyte"),
                   ("test", "images-idx3-ubyte"), ("test", "labels-idx1-ubyte")])
    arrays = make_idx_dataset(tmp_path / "EMNIST/raw", classes=26, offset=1, n_train=30, gz=False, names=names)
    b = load_data(cfg_for("emnist", tmp_path, emnist_split="letters"))
    assert b.num_classes == 26 and b.variant == "letters"
    assert b.train_y.min() == 0 and b.train_y.max() == 25
    assert b.train_y.tolist() == (arrays[names[1]].astype(int) - 1).tolist()
    stored = torch.from_numpy(arrays[names[0]]).float() / 255
    assert torch.allclose(denormalize(b.train_x, b.mean, b.std)[:, 0], stored.transpose(1, 2), atol=1e-5)


@pytest.mark.parametrize("name, folder, files, key, classes", [
    ("cifar10", "cifar-10-batches-py", {**{f"data_batch_{i}": 3 for i in range(1, 6)}, "test_batch": 4},
     "labels", 10),
    ("cifar100", "cifar-100-python", {"train": 7, "test": 5}, "fine_labels", 100),
])
def test_cifar_pickles_in_torchvision_layout(tmp_path, monkeypatch, no_system, name, folder, files, key, classes):
    written = make_cifar_dataset(tmp_path / folder, files, key, classes)
    register_md5(monkeypatch, name, tmp_path / folder)
    b = load_data(cfg_for(name, tmp_path, calibration_size=2, validation_size=0))
    train_names = [f for f in files if f not in ("test_batch", "test")]
    n_train = sum(files[f] for f in train_names)
    assert b.train_x.shape == (n_train, 3, 32, 32) and b.num_classes == classes and b.in_channels == 3
    data = np.concatenate([written[f][0] for f in train_names]).reshape(-1, 3, 32, 32)
    assert torch.allclose(denormalize(b.train_x, b.mean, b.std), torch.from_numpy(data).float() / 255, atol=1e-5)
    assert b.train_y.tolist() == sum((written[f][1] for f in train_names), [])


def test_known_checksums_match_torchvision_resource_lists():
    from torchvision import datasets

    for name, cls in [("mnist", datasets.MNIST), ("fashion_mnist", datasets.FashionMNIST)]:
        for filename, md5 in cls.resources:
            assert md5 in KNOWN_MD5[name][filename.removesuffix(".gz")].gz
    for name, cls in [("cifar10", datasets.CIFAR10), ("cifar100", datasets.CIFAR100)]:
        for filename, md5 in cls.train_list + cls.test_list:
            assert md5 in KNOWN_MD5[name][filename].content
    # torchvision lists an unused "N/A" class 0 for letters, which cyclemerge shifts away
    classes = {s: len(c) - (s == "letters") for s, c in datasets.EMNIST.classes_split_dict.items()}
    assert classes == EMNIST_CLASSES


# ---------------------------------------------------------------- where the data comes from

def test_root_is_preferred_over_system_folder(tmp_path, monkeypatch, no_system):
    system = tmp_path / "system"
    make_idx_dataset(system, classes=10, seed=1)
    root_arrays = make_idx_dataset(tmp_path / "root/FashionMNIST/raw", classes=5, seed=2)
    monkeypatch.setitem(KNOWN_MD5, "fashion_mnist", {})
    monkeypatch.setitem(sources.SYSTEM_FOLDERS, "fashion_mnist", (str(system),))
    b = load_data(cfg_for("fashion_mnist", tmp_path / "root"))
    assert b.source == str(tmp_path / "root/FashionMNIST/raw")
    assert b.train_y.tolist() == root_arrays["train-labels-idx1-ubyte"].tolist()


def test_system_folder_is_used_when_root_is_empty_or_partial(tmp_path, monkeypatch, no_system):
    system = tmp_path / "system"
    arrays = make_idx_dataset(system)
    register_md5(monkeypatch, "fashion_mnist", system)
    monkeypatch.setitem(sources.SYSTEM_FOLDERS, "fashion_mnist", (str(tmp_path / "absent"), str(system)))
    b = load_data(cfg_for("fashion_mnist", tmp_path / "root"))
    assert b.source == str(system)
    assert b.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert list((tmp_path / "root/fashion_mnist").glob("processed-*.pt")), "the cache goes under data.root"

    write_idx(tmp_path / "partial/FashionMNIST/raw/train-images-idx3-ubyte", arrays["train-images-idx3-ubyte"])
    with pytest.warns(UserWarning, match="incomplete.*t10k-labels-idx1-ubyte"):
        b = load_data(cfg_for("fashion_mnist", tmp_path / "partial"))
    assert b.source == str(system)


def test_missing_everywhere_names_all_three_ways(tmp_path, monkeypatch, no_system):
    monkeypatch.setitem(sources.SYSTEM_FOLDERS, "fashion_mnist", (str(tmp_path / "nowhere"),))
    with pytest.raises(DataNotFoundError) as err:
        load_data(cfg_for("fashion_mnist", tmp_path / "root", download=True))
    msg = str(err.value)
    assert f"{tmp_path / 'root/FashionMNIST/raw'}" in msg and "train-images-idx3-ubyte.gz" in msg
    assert str(tmp_path / "nowhere") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "URLError" in msg and "Name or service not known" in msg
    assert "with internet access: rerun (data.download is already true)" in msg

    with pytest.raises(DataNotFoundError) as err:
        load_data(cfg_for("cifar10", tmp_path / "root"))
    msg = str(err.value)
    assert "skipped (data.download is false)" in msg and "with internet access: set data.download: true" in msg
    assert "cifar-10-batches-py/ holding data_batch_1" in msg and "no Debian package for cifar10" in msg


def test_download_fills_root_and_is_then_read(tmp_path, monkeypatch, no_system):
    calls = []

    def fake_download(spec, root):
        calls.append(spec.name)
        make_idx_dataset(root / "MNIST/raw")

    monkeypatch.setattr(sources, "torchvision_download", fake_download)
    monkeypatch.setitem(KNOWN_MD5, "mnist", {})
    b = load_data(cfg_for("mnist", tmp_path, download=True))
    assert calls == ["mnist"] and b.source == str(tmp_path / "MNIST/raw")


# ---------------------------------------------------------------- corruption

def test_truncated_gz_is_a_clear_error_not_a_zlib_traceback(tmp_path, monkeypatch, no_system):
    folder = tmp_path / "MNIST/raw"
    make_idx_dataset(folder)
    monkeypatch.setitem(KNOWN_MD5, "mnist", {})
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataCorruptedError) as err:
        load_data(cfg_for("mnist", tmp_path))
    msg = str(err.value)
    assert str(path) in msg and "cannot be decompressed" in msg and "Delete it" in msg


def test_checksum_mismatch_names_the_file_and_the_fix(tmp_path, monkeypatch, no_system):
    folder = tmp_path / "FashionMNIST/raw"
    make_idx_dataset(folder)
    register_md5(monkeypatch, "fashion_mnist", folder)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(6, dtype=np.uint8))))  # valid gz, wrong content
    with pytest.raises(DataCorruptedError, match=r"t10k-labels-idx1-ubyte\.gz: checksum mismatch.*Delete it"):
        load_data(cfg_for("fashion_mnist", tmp_path))


def test_truncated_extracted_idx_and_bad_system_file(tmp_path, monkeypatch, no_system):
    folder = tmp_path / "MNIST/raw"
    make_idx_dataset(folder, gz=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataCorruptedError, match="truncated or damaged"):
        load_data(cfg_for("mnist", tmp_path))

    system = tmp_path / "system"
    make_idx_dataset(system)
    register_md5(monkeypatch, "fashion_mnist", system)
    (system / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    monkeypatch.setitem(sources.SYSTEM_FOLDERS, "fashion_mnist", (str(system),))
    with pytest.raises(DataCorruptedError, match="apt-get install --reinstall dataset-fashion-mnist"):
        load_data(cfg_for("fashion_mnist", tmp_path / "root"))


def test_out_of_range_labels_are_refused(tmp_path, monkeypatch, no_system):
    make_idx_dataset(tmp_path / "MNIST/raw", classes=12)  # labels 10 and 11 do not exist in MNIST
    monkeypatch.setitem(KNOWN_MD5, "mnist", {})
    with pytest.raises(DataCorruptedError, match=r"labels span \[0, 11\] but this dataset has 10 classes"):
        load_data(cfg_for("mnist", tmp_path))


# ---------------------------------------------------------------- the decoded-data cache

def test_cache_is_reused_then_rebuilt_when_sources_change(tmp_path, monkeypatch, no_system):
    folder = tmp_path / "MNIST/raw"
    make_idx_dataset(folder, seed=1)
    monkeypatch.setitem(KNOWN_MD5, "mnist", {})
    first = load_data(cfg_for("mnist", tmp_path))

    def must_not_decode(*args):
        raise AssertionError("decoded again although the cache matches")

    monkeypatch.setattr(sources, "decode", must_not_decode)
    again = load_data(cfg_for("mnist", tmp_path))
    assert torch.equal(again.train_x, first.train_x) and fingerprint(again) == fingerprint(first)
    monkeypatch.undo()

    monkeypatch.setattr(sources, "SYSTEM_FOLDERS", {})
    monkeypatch.setitem(KNOWN_MD5, "mnist", {})
    arrays = make_idx_dataset(folder, seed=2, classes=3)  # same names, new content
    changed = load_data(cfg_for("mnist", tmp_path))
    assert changed.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert fingerprint(changed) != fingerprint(first)


def test_unreadable_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, no_system):
    make_idx_dataset(tmp_path / "MNIST/raw")
    monkeypatch.setitem(KNOWN_MD5, "mnist", {})
    first = load_data(cfg_for("mnist", tmp_path))
    (cache,) = (tmp_path / "mnist").glob("processed-*.pt")
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable decoded-data cache"):
        again = load_data(cfg_for("mnist", tmp_path))
    assert torch.equal(again.train_x, first.train_x)
    assert not list((tmp_path / "mnist").glob("*.tmp"))


# ---------------------------------------------------------------- the real Fashion-MNIST (Debian package)

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    b = load_data(DataConfig(root=str(tmp_path), download=False))
    assert b.train_x.shape == (60000, 1, 28, 28) and b.test_x.shape == (10000, 1, 28, 28)
    assert b.source == str(DEBIAN_FMNIST)
    assert abs(b.train_x.mean().item()) < 0.01 and abs(b.train_x.std().item() - 1) < 0.01
    assert torch.equal(b.train_y.bincount(), torch.full((10,), 6000))
    assert len(b.calib_idx) == len(b.val_idx) == 5000 and len(b.train_idx) == 50000 and b.has_validation
    assert not set(b.val_idx.tolist()) & (set(b.train_idx.tolist()) | set(b.calib_idx.tolist()))
    # Without a validation slice the data are those hashed before data.validation_size existed.
    assert fingerprint(load_data(DataConfig(root=str(tmp_path), download=False, validation_size=0))) == "f8c0398d5b00a244"
    held = load_data(DataConfig(root=str(tmp_path), download=False, validation_size=5000))
    assert len(held.val_idx) == 5000 and len(held.train_idx) == 50000 and torch.equal(held.calib_idx, b.calib_idx)


# ---------------------------------------------------------------- validation slice

def digest(*idx: torch.Tensor) -> str:
    return hashlib.sha256(b"".join(i.numpy().tobytes() for i in idx)).hexdigest()[:16]


@pytest.mark.parametrize("kw, expected", [
    ({}, "f103fb6345666df0"),
    ({"calibration_disjoint": False, "train_subset": 20000, "seed": 2}, "db42a8e3fa776c5c"),
])
def test_slices_without_validation_are_those_from_before_it_existed(kw, expected):
    """Digests recorded with the code before data.validation_size: with 0 nothing moves."""
    cfg = DataConfig(**kw, validation_size=0)
    train_idx, calib_idx, val_idx = split_train(60000, cfg)
    assert digest(train_idx, calib_idx) == expected and len(val_idx) == 0
    assert digest(*calibration_split(60000, cfg)) == expected
    bundle = load_data(DataConfig(name="synthetic", synthetic=SMALL, calibration_size=50, validation_size=0, seed=3))
    assert fingerprint(bundle) == "1d2fb7383c727666"


@pytest.mark.parametrize("disjoint, subset", list(itertools.product([True, False], [None, 40])))
def test_validation_is_disjoint_from_training_calibration_and_test(disjoint, subset):
    cfg = DataConfig(name="synthetic", synthetic=SMALL, calibration_size=50, validation_size=60,
                     calibration_disjoint=disjoint, train_subset=subset, seed=5)
    b = load_data(cfg)
    train, calib, val = (set(i.tolist()) for i in (b.train_idx, b.calib_idx, b.val_idx))
    assert len(val) == len(b.val_idx) == 60 and b.has_validation
    assert not val & train and not val & calib
    assert (calib <= train) == (not disjoint and subset is None)
    assert len(train) == (subset or (300 - 60 - (50 if disjoint else 0)))
    if subset is None:
        assert train | calib | val == set(range(300))
    val_x, val_y = b.validation_set()
    assert torch.equal(val_x, b.train_x[b.val_idx]) and torch.equal(val_y, b.train_y[b.val_idx])
    assert torch.cdist(val_x.flatten(1), b.test_x.flatten(1)).min() > 1e-3  # no validation image is a test image
    assert fingerprint(b) != fingerprint(load_data(cfg.model_copy(update={"validation_size": 0})))


def test_validation_is_deterministic_and_keeps_the_other_slices_in_place():
    cfg = DataConfig(name="synthetic", synthetic=SMALL, calibration_size=50, validation_size=30, train_subset=100)
    a, b = split_train(300, cfg), split_train(300, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    without = split_train(300, cfg.model_copy(update={"validation_size": 0}))
    # Validation comes off the far end of the seeded order: calibration and a fitting subset stay put.
    assert torch.equal(a[1], without[1]) and torch.equal(a[0], without[0])
    wider = split_train(300, cfg.model_copy(update={"validation_size": 60}))
    assert set(a[2].tolist()) < set(wider[2].tolist())
    other_seed = split_train(300, cfg.model_copy(update={"seed": 1}))
    assert not torch.equal(other_seed[2], a[2])


@pytest.mark.parametrize("disjoint, most", [(True, 249), (False, 250)])
def test_validation_too_large_for_the_train_split_names_the_key(disjoint, most):
    cfg = DataConfig(name="synthetic", synthetic=SMALL, calibration_size=50, validation_size=0, calibration_disjoint=disjoint)
    split_train(300, cfg.model_copy(update={"validation_size": most}))
    with pytest.raises(ConfigError) as err:
        load_data(cfg.model_copy(update={"validation_size": most + 1}))
    msg = str(err.value)
    assert "data.validation_size" in msg and "300 samples" in msg and f"at most {most}" in msg
    assert "never the test split" in msg
    with pytest.raises(ConfigError, match="data.validation_size"):
        config_from_dict({"data": {"validation_size": -1}})


# ---------------------------------------------------------------- batches and augmentation

def test_iterate_batches_covers_each_sample_once_and_is_reproducible():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    batches = list(iterate_batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in batches)
    replay = list(iterate_batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.cat([b[1] for b in replay]), seen)
    plain = list(iterate_batches(x, y, 4, shuffle=False, drop_last=True))
    assert [b[1].tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="x has 10 samples but y has 9"):
        next(iterate_batches(x, y[:9], 4, shuffle=False))


def test_augment_batch_is_a_padded_crop_possibly_flipped():
    x = torch.randn(16, 3, 6, 6)
    out = augment_batch(x, torch.Generator().manual_seed(1), padding=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = set()
    for i in range(16):
        matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy:dy + 6, dx:dx + 6]))]
        assert matches, f"sample {i} is not a crop of its padded input"
        flips.update(m[2] for m in matches)
    assert flips == {False, True}
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(1), padding=2))

"""The datasets cyclemerge knows: where torchvision keeps their files, their shapes and statistics.

A :class:`DatasetSpec` is plain data; reading, checking and caching the files it names is done by
``formats`` and ``sources``. The checksum table lives here too, one entry per file that is read, so
that a corrupted or half-downloaded file is refused instead of decoded into garbage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cyclemerge.config import ConfigError, DataConfig


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset looks like on disk and in memory.

    ``train_files``/``test_files`` are logical file names inside ``folder`` (torchvision's folder under
    ``data.root``): for the idx formats (images, labels), each present either gzipped (``<name>.gz``)
    or extracted; for CIFAR the pickled batches, in order.
    """

    name: str
    format: str  # "idx", "cifar" or "synthetic"
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    variant: str = ""
    label_offset: int = 0  # subtracted from stored labels (EMNIST letters are stored as 1..26)
    transposed: bool = False  # EMNIST images are stored column-major
    label_key: str = "labels"  # CIFAR-100 stores its 100-way labels as "fine_labels"


@dataclass(frozen=True)
class Checksums:
    """Accepted md5 digests of one file: of the ``.gz`` as stored, and of the bytes it holds.

    The content digest is what survives recompression (Debian's ``.gz`` files differ byte-wise from
    the ones torchvision downloads but decompress to the same idx data); for uncompressed files
    (CIFAR pickles, extracted idx files) it is the digest of the file itself.
    """

    gz: frozenset[str] = frozenset()
    content: frozenset[str] = frozenset()


def _md5s(gz: tuple[str, ...] = (), content: tuple[str, ...] = ()) -> Checksums:
    return Checksums(frozenset(gz), frozenset(content))


_IDX_TRAIN = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_IDX_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# The mean/std of the train split's pixels in [0, 1], per channel: the constants every paper's
# loader uses, so that a checkpoint trained elsewhere sees inputs on the scale it expects.
SPECS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec("fashion_mnist", "idx", "FashionMNIST/raw", _IDX_TRAIN, _IDX_TEST,
                                 10, 1, 28, (0.2860,), (0.3530,)),
    "mnist": DatasetSpec("mnist", "idx", "MNIST/raw", _IDX_TRAIN, _IDX_TEST, 10, 1, 28, (0.1307,), (0.3081,)),
    # Filled in per split by dataset_spec; the statistics are the commonly used EMNIST ones, so a
    # split's normalized data is close to, not exactly, zero-mean and unit-variance.
    "emnist": DatasetSpec("emnist", "idx", "EMNIST/raw", (), (), 0, 1, 28, (0.1736,), (0.3317,), transposed=True),
    "cifar10": DatasetSpec("cifar10", "cifar", "cifar-10-batches-py",
                           tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                           10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetSpec("cifar100", "cifar", "cifar-100-python", ("train",), ("test",),
                            100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), label_key="fine_labels"),
    "synthetic": DatasetSpec("synthetic", "synthetic", "", (), (), 0, 0, 0, (), ()),
}

EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10, "mnist": 10}

# Per dataset, per logical file. The .gz digests are torchvision 0.29's resource lists (what its
# download fetches); the Fashion-MNIST content digests were measured on the files of Debian's
# dataset-fashion-mnist package. EMNIST has no per-file digests (torchvision only checks the 560 MB
# zip), so its files get the structural checks of formats.parse_idx only.
KNOWN_MD5: dict[str, dict[str, Checksums]] = {
    "fashion_mnist": {
        "train-images-idx3-ubyte": _md5s(("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "cf8536b0aa1a6ac5fa3f23001093305c"),
                                         ("f4a8712d7a061bf5bd6d2ca38dc4d50a",)),
        "train-labels-idx1-ubyte": _md5s(("25c81989df183df01b3e8a0aad5dffbe", "10bea18fdb374794d4bb42e356e600c9"),
                                         ("9018921c3c673c538a1fc5bad174d6f9",)),
        "t10k-images-idx3-ubyte": _md5s(("bef4ecab320f06d8554ea6380940ec79", "f78720b4224f21cce2f2ccf2d7a94c9a"),
                                        ("8181f5470baa50b63fa0f6fddb340f0a",)),
        "t10k-labels-idx1-ubyte": _md5s(("bb300cfdad3c16e7a12a480ee83cd310", "0d30e22e447f3c33dab9ed536400ac01"),
                                        ("15d484375f8d13e6eb1aabb0c3f46965",)),
    },
    "mnist": {
        "train-images-idx3-ubyte": _md5s(("f68b3c2dcbeaaa9fbdd348bbdeb94873",)),
        "train-labels-idx1-ubyte": _md5s(("d53e105ee54ea40749a09fcbcd1e9432",)),
        "t10k-images-idx3-ubyte": _md5s(("9fb629c4189551a2d022fa330f9573f3",)),
        "t10k-labels-idx1-ubyte": _md5s(("ec29112dd5afa0611ce80d1b7f02629c",)),
    },
    "emnist": {},
    "cifar10": {
        "data_batch_1": _md5s(content=("c99cafc152244af753f735de768cd75f",)),
        "data_batch_2": _md5s(content=("d4bba439e000b95fd0a9bffe97cbabec",)),
        "data_batch_3": _md5s(content=("54ebc095f3ab1f0389bbae665268c751",)),
        "data_batch_4": _md5s(content=("634d18415352ddfa80567beed471001a",)),
        "data_batch_5": _md5s(content=("482c414d41f54cd18b22e5b47cb7c3cb",)),
        "test_batch": _md5s(content=("40351d587109b95175f43aff81a1287e",)),
    },
    "cifar100": {
        "train": _md5s(content=("16019d7e3df5f24257cddd939b257f8d",)),
        "test": _md5s(content=("f0ef6b0ae62326f3e7ffdfab6717acfc",)),
    },
}


def dataset_spec(cfg: DataConfig) -> DatasetSpec:
    """The spec of ``cfg.name``; an unknown name fails and lists the known ones."""
    spec = SPECS.get(cfg.name)
    if spec is None:
        raise ConfigError(f"data.name: unknown dataset {cfg.name!r}; known datasets: {', '.join(SPECS)}")
    if spec.name == "emnist":
        split = cfg.emnist_split
        if split not in EMNIST_CLASSES:
            raise ConfigError(f"data.emnist_split: unknown split {split!r}; known splits: {', '.join(EMNIST_CLASSES)}")
        spec = dataclasses.replace(
            spec,
            variant=split,
            train_files=(f"emnist-{split}-train-images-idx3-ubyte", f"emnist-{split}-train-labels-idx1-ubyte"),
            test_files=(f"emnist-{split}-test-images-idx3-ubyte", f"emnist-{split}-test-labels-idx1-ubyte"),
            num_classes=EMNIST_CLASSES[split],
            label_offset=1 if split == "letters" else 0,
        )
    if spec.name == "synthetic":
        syn = cfg.synthetic
        spec = dataclasses.replace(spec, num_classes=syn.num_classes, channels=syn.channels,
                                   image_size=syn.image_size)
    return spec

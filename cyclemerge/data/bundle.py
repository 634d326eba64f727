"""``load_data``: a dataset in memory as normalized tensors, with its training, calibration and
validation slices.

The calibration slice (activation statistics, gate learning, REPAIR) and the validation slice
(every selection the pipeline makes by data) are drawn from the TRAIN split only, deterministically
from ``data.seed``; the test split never reaches any of those stages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cyclemerge.config import ConfigError, DataConfig
from cyclemerge.data.registry import DatasetSpec, dataset_spec
from cyclemerge.data.sources import load_decoded
from cyclemerge.data.synthetic import make_synthetic, synthetic_checksum

# The test subset must not move when data.seed does, so runs that differ only in seed are
# evaluated on the same images.
TEST_SUBSET_SEED = 0


@dataclass
class DataBundle:
    """One dataset in memory. ``x`` tensors are float32 [N, C, H, W], normalized; ``y`` are int64.

    ``train_idx``, ``calib_idx`` and ``val_idx`` index ``train_x``: the samples models train on, the
    calibration slice and the validation slice (empty when ``data.validation_size`` is 0); the
    validation slice is disjoint from the other two. ``test_x`` is the (possibly capped) test split; ``test_idx`` says which
    samples of the full test split it holds. ``checksums`` are the md5s of the source files'
    contents (for synthetic data, of its recipe); ``source`` is the folder they came from.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_idx: torch.Tensor
    calib_idx: torch.Tensor
    test_idx: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checksums: dict[str, str]
    source: str
    variant: str = ""
    val_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def train_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_x[self.train_idx], self.train_y[self.train_idx]

    def calibration_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_x[self.calib_idx], self.train_y[self.calib_idx]

    @property
    def has_validation(self) -> bool:
        return len(self.val_idx) > 0

    def validation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out validation slice of the train split (empty tensors when there is none)."""
        return self.train_x[self.val_idx], self.train_y[self.val_idx]


def resolve_root(root: str, project_dir: str | Path = ".") -> Path:
    """``data.root`` as a path; a relative one is relative to the project folder, not the cwd."""
    path = Path(root).expanduser()
    return path if path.is_absolute() else Path(project_dir) / path


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 ((x / 255) - mean) / std per channel.

    Done in numpy, single-threaded, in place on one new array: on a busy 2-core machine torch's
    OpenMP kernels were 3-10x slower for this memory-bound pass (and for sorting indices).
    """
    shape = (1, len(mean), 1, 1)
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float64))).astype(np.float32).reshape(shape)
    shift = (np.asarray(mean, dtype=np.float64) / np.asarray(std, dtype=np.float64)).astype(np.float32).reshape(shape)
    x = images.numpy().astype(np.float32)
    x *= scale
    x -= shift
    return torch.from_numpy(x)


def _sorted(idx: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.sort(idx.numpy()))


def split_train(num_train: int, cfg: DataConfig, dataset: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_idx, calib_idx, val_idx)``, sorted index tensors into the train split.

    One permutation from ``data.seed``: its first ``calibration_size`` entries are the calibration
    slice and its last ``validation_size`` entries the validation slice. With
    ``calibration_disjoint`` the models train on what lies between; otherwise on everything but the
    validation slice. Either way ``train_subset`` then keeps a prefix of that order (a seeded random
    subset). Taking validation from the far end keeps every other slice where it was: with
    ``validation_size`` 0 the slices are those of a config without it, and a ``train_subset`` that
    fits keeps the same training samples whatever the validation size.
    """
    size, held_out = cfg.calibration_size, cfg.validation_size
    limit = num_train - 1 if cfg.calibration_disjoint else num_train
    if size > limit:
        why = " and leave at least one training sample (data.calibration_disjoint is true)" \
            if cfg.calibration_disjoint else ""
        raise ConfigError(
            f"data.calibration_size is {size} but the {dataset or 'dataset'} train split has {num_train} samples; "
            f"the calibration slice is drawn from the train split only (never the test split) and must fit in it{why}. "
            f"Fix: set data.calibration_size to at most {limit}"
            + (", or set data.calibration_disjoint: false to calibrate on training samples" if cfg.calibration_disjoint
               else "") + ".")
    if size + held_out > limit:
        raise ConfigError(
            f"data.validation_size is {held_out} and data.calibration_size is {size}, but the {dataset or 'dataset'} "
            f"train split has {num_train} samples; both slices are drawn from the train split only (never the test "
            f"split), disjoint from each other" + (" and leaving at least one training sample" if cfg.calibration_disjoint
                                                   else "") +
            f". Fix: set data.validation_size to at most {max(limit - size, 0)} (or lower data.calibration_size).")
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(cfg.seed))
    calib_idx = order[:size]
    val_idx = order[num_train - held_out:] if held_out else order[:0]
    kept = order[:num_train - held_out]
    train_pool = kept[size:] if cfg.calibration_disjoint else kept
    if cfg.train_subset is not None:
        train_pool = train_pool[:cfg.train_subset]
    return _sorted(train_pool), _sorted(calib_idx), _sorted(val_idx)


def calibration_split(num_train: int, cfg: DataConfig, dataset: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_idx, calib_idx)`` of :func:`split_train`, for callers that hold no validation slice."""
    train_idx, calib_idx, _ = split_train(num_train, cfg, dataset)
    return train_idx, calib_idx


def capped_test_indices(num_test: int, cap: int | None) -> torch.Tensor:
    """Indices of the test samples kept: all of them, or a fixed random subset of ``cap``."""
    if cap is None or cap >= num_test:
        return torch.arange(num_test)
    order = torch.randperm(num_test, generator=torch.Generator().manual_seed(TEST_SUBSET_SEED))
    return _sorted(order[:cap])


def load_data(cfg: DataConfig, project_dir: str | Path = ".") -> DataBundle:
    """Load ``cfg.name`` (see ``sources`` for where it is looked for) and slice it as configured."""
    spec: DatasetSpec = dataset_spec(cfg)
    if spec.format == "synthetic":
        train_x, train_y, test_x, test_y, mean, std = make_synthetic(cfg.synthetic)
        checksums, source = {"synthetic": synthetic_checksum(cfg.synthetic)}, "generated"
    else:
        decoded = load_decoded(spec, resolve_root(cfg.root, project_dir), download=cfg.download)
        mean, std = spec.mean, spec.std
        train_x, test_x = normalize(decoded.train_x, mean, std), normalize(decoded.test_x, mean, std)
        train_y, test_y = decoded.train_y, decoded.test_y
        checksums, source = decoded.checksums, decoded.origin

    train_idx, calib_idx, val_idx = split_train(len(train_x), cfg, spec.name)
    test_idx = capped_test_indices(len(test_x), cfg.test_subset)
    if len(test_idx) < len(test_x):
        test_x, test_y = test_x[test_idx], test_y[test_idx]
    return DataBundle(name=spec.name, train_x=train_x, train_y=train_y.long(), test_x=test_x, test_y=test_y.long(),
                      train_idx=train_idx, calib_idx=calib_idx, test_idx=test_idx, num_classes=spec.num_classes,
                      in_channels=spec.channels, image_size=spec.image_size, mean=tuple(mean), std=tuple(std),
                      checksums=dict(checksums), source=source, variant=spec.variant, val_idx=val_idx)


def fingerprint(bundle: DataBundle) -> str:
    """A short content hash of the data a stage sees: source contents, normalization and slices.

    Equal fingerprints mean equal tensors and indices, whichever folder or compression the files
    came from, so it can go into a stage's cache key.
    """
    h = hashlib.sha256()
    meta = {"name": bundle.name, "variant": bundle.variant, "checksums": bundle.checksums,
            "mean": list(bundle.mean), "std": list(bundle.std), "shape": [bundle.in_channels, bundle.image_size]}
    h.update(json.dumps(meta, sort_keys=True).encode())
    # Without a validation slice the hash is the one from before the slice existed, so caches stay valid.
    slices = (bundle.train_idx, bundle.calib_idx, bundle.test_idx) + ((bundle.val_idx,) if bundle.has_validation else ())
    for idx in slices:
        h.update(str(len(idx)).encode())
        h.update(idx.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

"""Datasets in memory: loading offline, checking, caching, slicing, batching.

``load_data(cfg.data, project_dir)`` returns a :class:`DataBundle` of normalized float tensors with
its training, calibration and validation index slices; ``iterate_batches`` and ``augment_batch`` feed models
from it; ``fingerprint`` hashes what a stage saw, for cache keys.
"""

from cyclemerge.data.batches import augment_batch, iterate_batches
from cyclemerge.data.bundle import (
    DataBundle,
    calibration_split,
    capped_test_indices,
    fingerprint,
    load_data,
    normalize,
    resolve_root,
    split_train,
)
from cyclemerge.data.formats import DataCorruptedError, DataError
from cyclemerge.data.registry import KNOWN_MD5, SPECS, Checksums, DatasetSpec, dataset_spec
from cyclemerge.data.sources import DEBIAN_PACKAGES, SYSTEM_FOLDERS, DataNotFoundError

__all__ = [
    "DEBIAN_PACKAGES",
    "KNOWN_MD5",
    "SPECS",
    "SYSTEM_FOLDERS",
    "Checksums",
    "DataBundle",
    "DataCorruptedError",
    "DataError",
    "DataNotFoundError",
    "DatasetSpec",
    "augment_batch",
    "calibration_split",
    "capped_test_indices",
    "dataset_spec",
    "fingerprint",
    "iterate_batches",
    "load_data",
    "normalize",
    "resolve_root",
    "split_train",
]

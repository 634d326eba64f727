"""Finding a dataset's files offline, decoding them once, and caching the decoded tensors.

Resolution order: (1) ``data.root`` in torchvision's on-disk layout, (2) the system folders of
:data:`SYSTEM_FOLDERS` (Debian's ``dataset-fashion-mnist`` package), (3) torchvision's download into
``data.root`` when ``data.download`` is true. When all three fail, one :class:`DataNotFoundError`
says what was tried and the three ways to get the data.

Decoding (checksums, gunzip, parsing) runs once; the uint8 images and labels are then kept in
``<root>/<name>/processed-<key>.pt``, keyed by the source files' paths, sizes and modification
times, so a replaced source file is decoded again and a later run loads in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cyclemerge.data.formats import DataCorruptedError, DataError, check_labels, parse_cifar, parse_idx, read_verified
from cyclemerge.data.registry import KNOWN_MD5, DatasetSpec

log = logging.getLogger(__name__)

# Folders holding a dataset's files side by side (no torchvision sub-folders). Tests monkeypatch this.
SYSTEM_FOLDERS: dict[str, tuple[str, ...]] = {"fashion_mnist": ("/usr/share/datasets/fashion-mnist",)}
DEBIAN_PACKAGES: dict[str, str] = {"fashion_mnist": "dataset-fashion-mnist"}

CACHE_VERSION = 1


class DataNotFoundError(DataError):
    """No usable copy of a dataset in data.root, the system folders, or by download."""


@dataclass(frozen=True)
class Located:
    folder: Path
    files: dict[str, Path]  # logical file name -> the file to read
    origin: str  # "data.root", "system folder" or "download"


@dataclass
class Decoded:
    """A dataset's splits as stored: images uint8 [N, C, H, W], labels int64, and the content md5s."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    checksums: dict[str, str]
    origin: str


def _scan(folder: Path, spec: DatasetSpec) -> tuple[dict[str, Path], list[str]]:
    """The files of ``spec`` found in ``folder`` (a .gz preferred: its digest is the one torchvision
    publishes) and the logical names that are missing."""
    found, missing = {}, []
    for name in spec.train_files + spec.test_files:
        candidates = [folder / f"{name}.gz", folder / name] if spec.format == "idx" else [folder / name]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            missing.append(name)
        else:
            found[name] = hit
    return found, missing


def _describe_missing(folder: Path, missing: list[str], total: int) -> str:
    if not folder.is_dir():
        return "folder does not exist"
    if len(missing) == total:
        return "no dataset files in it"
    return f"missing {', '.join(missing)}"


def torchvision_download(spec: DatasetSpec, root: Path) -> None:
    """Fetch the dataset into ``root`` with torchvision's own dataset class (needs internet)."""
    from torchvision import datasets  # imported here: it costs ~1.4 s and only downloads need it

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "emnist": datasets.EMNIST,
           "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[spec.name]
    kwargs = {"split": spec.variant} if spec.name == "emnist" else {}
    root.mkdir(parents=True, exist_ok=True)
    cls(root=str(root), train=True, download=True, **kwargs)


def locate(spec: DatasetSpec, root: Path, *, download: bool) -> Located:
    """Where to read ``spec`` from, in the documented order; fails with every way to get the data."""
    wanted = len(spec.train_files) + len(spec.test_files)
    root_folder = root / spec.folder
    found, missing = _scan(root_folder, spec)
    if not missing:
        return Located(root_folder, found, "data.root")
    tried = [f"data.root: {root_folder} ({_describe_missing(root_folder, missing, wanted)})"]
    partial_root = len(missing) < wanted

    for system in SYSTEM_FOLDERS.get(spec.name, ()):
        folder = Path(system)
        sys_found, sys_missing = _scan(folder, spec)
        if not sys_missing:
            if partial_root:
                warnings.warn(f"{spec.name}: {root_folder} is incomplete ({', '.join(missing)} missing); "
                              f"reading the system copy in {folder} instead", stacklevel=3)
            return Located(folder, sys_found, "system folder")
        tried.append(f"system folder: {folder} ({_describe_missing(folder, sys_missing, wanted)})")

    if download:
        try:
            torchvision_download(spec, root)
        except Exception as e:  # noqa: BLE001 - offline, DNS, HTTP or disk errors all mean "download failed"
            reason = " ".join(str(e).split())
            tried.append(f"download into {root}: failed ({type(e).__name__}: {reason[:300]})")
        else:
            found, missing = _scan(root_folder, spec)
            if not missing:
                return Located(root_folder, found, "download")
            tried.append(f"download into {root}: finished but {', '.join(missing)} still missing")
    else:
        tried.append("download: skipped (data.download is false)")
    raise DataNotFoundError(_not_found_message(spec, root_folder, tried, download))


def _not_found_message(spec: DatasetSpec, root_folder: Path, tried: list[str], download: bool) -> str:
    names = [f"{n}.gz (or extracted)" if spec.format == "idx" else n for n in spec.train_files + spec.test_files]
    ways = [f"  - put the files in torchvision's layout under data.root: {root_folder}/ holding {', '.join(names)}"]
    package = DEBIAN_PACKAGES.get(spec.name)
    if package:
        folders = ", ".join(SYSTEM_FOLDERS.get(spec.name, ())) or "its system folder"
        ways.append(f"  - on Debian/Ubuntu: sudo apt-get install {package} (installs {folders})")
    else:
        ways.append(f"  - no Debian package for {spec.name} is known; copy the files from a machine that has them")
    ways.append("  - with internet access: " + ("rerun (data.download is already true)" if download else
                                               "set data.download: true")
                + "; torchvision then fetches the files into data.root")
    label = f"{spec.name} ({spec.variant})" if spec.variant else spec.name
    return "\n".join([f"{label}: no usable copy of the dataset was found. Tried, in order:",
                      *(f"  {i}. {t}" for i, t in enumerate(tried, 1)), "Ways to get it:", *ways])


def _fix_hint(spec: DatasetSpec, located: Located) -> str:
    if located.origin == "system folder" and spec.name in DEBIAN_PACKAGES:
        return f"Reinstall it: sudo apt-get install --reinstall {DEBIAN_PACKAGES[spec.name]}."
    return (f"Delete it and fetch it again: set data.download: true (with internet access) or copy an intact "
            f"file into {located.folder}.")


def decode(spec: DatasetSpec, located: Located) -> Decoded:
    """Read, verify and parse every file of ``spec`` (the slow path: seconds for CIFAR)."""
    fix = _fix_hint(spec, located)
    known = KNOWN_MD5.get(spec.name, {})
    checksums: dict[str, str] = {}

    def read(name: str) -> bytes:
        content, checksums[name] = read_verified(located.files[name], known.get(name), fix)
        return content

    splits = []
    for files in (spec.train_files, spec.test_files):
        if spec.format == "idx":
            images_name, labels_name = files
            images = parse_idx(read(images_name), located.files[images_name], 3, fix)
            labels = parse_idx(read(labels_name), located.files[labels_name], 1, fix).astype(np.int64)
            if images.shape[0] != labels.shape[0] or images.shape[1:] != (spec.image_size, spec.image_size):
                raise DataCorruptedError(
                    f"{located.files[images_name]}: {images.shape[0]} images of {images.shape[1:]} but "
                    f"{labels.shape[0]} labels in {located.files[labels_name]}; expected matching counts of "
                    f"{spec.image_size}x{spec.image_size} images. {fix}")
            if spec.transposed:
                images = images.transpose(0, 2, 1)
            images = images[:, None]
            labels_path = located.files[labels_name]
        else:
            parts = [parse_cifar(read(name), located.files[name], spec.label_key, fix) for name in files]
            images = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            labels_path = located.files[files[-1]]
        labels = labels - spec.label_offset
        check_labels(labels, spec.num_classes, labels_path, fix)
        splits.append((torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)))
    (train_x, train_y), (test_x, test_y) = splits
    return Decoded(train_x, train_y, test_x, test_y, checksums, str(located.folder))


def cache_path(spec: DatasetSpec, located: Located, root: Path) -> Path:
    """``<root>/<name>/processed-<key>.pt``; the key changes when any source file is replaced."""
    files = []
    for name, path in sorted(located.files.items()):
        st = path.stat()
        files.append([name, str(path.resolve()), st.st_size, st.st_mtime_ns])
    payload = {"version": CACHE_VERSION, "name": spec.name, "variant": spec.variant, "files": files}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return root / spec.name / f"processed-{key}.pt"


def _read_cache(path: Path, spec: DatasetSpec) -> Decoded | None:
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        shape = (spec.channels, spec.image_size, spec.image_size)
        ok = (obj["version"] == CACHE_VERSION
              and all(obj[k].dtype == torch.uint8 and tuple(obj[k].shape[1:]) == shape for k in ("train_x", "test_x"))
              and len(obj["train_x"]) == len(obj["train_y"]) and len(obj["test_x"]) == len(obj["test_y"]))
        if not ok:
            raise ValueError("unexpected contents")
        return Decoded(obj["train_x"], obj["train_y"], obj["test_x"], obj["test_y"], dict(obj["checksums"]),
                       obj["origin"])
    except Exception as e:  # noqa: BLE001 - an unreadable cache is rebuilt, whatever broke it
        warnings.warn(f"{path}: unreadable decoded-data cache ({type(e).__name__}: {e}); decoding the source files "
                      "again and replacing it", stacklevel=3)
        return None


def _write_cache(path: Path, decoded: Decoded) -> None:
    """Atomic: a crash leaves the old cache or none, never half a file."""
    obj = {"version": CACHE_VERSION, "train_x": decoded.train_x, "train_y": decoded.train_y,
           "test_x": decoded.test_x, "test_y": decoded.test_y, "checksums": decoded.checksums,
           "origin": decoded.origin}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a unique name per writer: threads of one process may decode the same dataset at once
        fd, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        warnings.warn(f"could not cache the decoded data at {path} ({e}); every run will decode the files again "
                      "(make data.root writable to avoid that)", stacklevel=3)


def load_decoded(spec: DatasetSpec, root: Path, *, download: bool) -> Decoded:
    """The decoded splits of ``spec``: from the cache when it matches the source files, else decoded."""
    located = locate(spec, root, download=download)
    path = cache_path(spec, located, root)
    cached = _read_cache(path, spec)
    if cached is not None:
        return cached
    start = time.perf_counter()
    decoded = decode(spec, located)
    _write_cache(path, decoded)
    log.info("decoded %s from %s (%s) in %.2f s; cached at %s", spec.name, located.folder, located.origin,
             time.perf_counter() - start, path)
    return decoded

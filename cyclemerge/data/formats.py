"""Reading dataset files byte-exactly: idx (MNIST family) and pickled CIFAR batches.

Every file is checked before it is trusted: its md5 against the known digests when there are any,
then its structure (header, sizes, label range). Whatever is wrong with it, the caller gets one
:class:`DataCorruptedError` that names the file and what to do, never a zlib or pickle traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

from cyclemerge.data.registry import Checksums


class DataError(Exception):
    """Data that cannot be used; the message says which file or setting and how to fix it."""


class DataCorruptedError(DataError):
    """A dataset file that is damaged, truncated or not what its name says."""


def md5_hex(blob: bytes) -> str:
    return hashlib.md5(blob, usedforsecurity=False).hexdigest()


def read_verified(path: Path, known: Checksums | None, fix: str) -> tuple[bytes, str]:
    """The content of ``path`` (decompressed when it ends in ``.gz``) and the md5 of that content.

    ``fix`` is the sentence telling the user how to replace the file; it ends every error.
    """
    blob = path.read_bytes()
    is_gz = path.name.endswith(".gz")
    if is_gz:
        try:
            content = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as e:
            raise DataCorruptedError(f"{path}: cannot be decompressed ({e}); the file is damaged or was only "
                                     f"partly downloaded. {fix}") from None
    else:
        content = blob
    content_md5 = md5_hex(content)
    known = known or Checksums()
    # a stored .gz may match its own digest or, recompressed elsewhere, the digest of what it holds
    accepted = (known.gz | known.content) if is_gz else known.content
    if accepted:
        digests = {md5_hex(blob), content_md5} if is_gz else {content_md5}
        if not digests & accepted:
            raise DataCorruptedError(f"{path}: checksum mismatch (md5 {md5_hex(blob)}, not one of the known digests "
                                     f"{', '.join(sorted(accepted))}); the file is damaged, incomplete or a different "
                                     f"version. {fix}")
    return content, content_md5


def parse_idx(content: bytes, path: Path, ndim: int, fix: str) -> np.ndarray:
    """Decode an idx file of unsigned bytes (the MNIST family's format) with ``ndim`` dimensions."""
    head = 4 + 4 * ndim
    if len(content) < head or content[:2] != b"\x00\x00" or content[2] != 0x08 or content[3] != ndim:
        raise DataCorruptedError(f"{path}: not an idx file of {ndim}-d unsigned bytes (header "
                                 f"{content[:4].hex() or 'empty'}, expected 000008{ndim:02x}). {fix}")
    dims = struct.unpack(f">{ndim}I", content[4:head])
    expected = int(np.prod(dims))
    if len(content) - head != expected:
        raise DataCorruptedError(f"{path}: the header announces shape {dims} ({expected} bytes of data) but the "
                                 f"file holds {len(content) - head}; it is truncated or damaged. {fix}")
    return np.frombuffer(content, dtype=np.uint8, offset=head).reshape(dims).copy()


def parse_cifar(content: bytes, path: Path, label_key: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, 3, 32, 32] uint8 and labels [n] of one pickled CIFAR batch.

    Unpickling runs code named by the file, so callers verify known digests first (read_verified);
    every CIFAR file has one.
    """
    try:
        entry = pickle.loads(content, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to a user: a bad file
        raise DataCorruptedError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e}). {fix}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise DataCorruptedError(f"{path}: expected 'data' [n, 3072] and '{label_key}' [n], got {data.shape} and "
                                 f"{labels.shape}. {fix}")
    return data.reshape(-1, 3, 32, 32), labels


def check_labels(labels: np.ndarray, num_classes: int, path: Path, fix: str) -> None:
    """Labels must lie in [0, num_classes) once shifted; anything else means a wrong or damaged file."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataCorruptedError(f"{path}: labels span [{labels.min()}, {labels.max()}] but this dataset has "
                                 f"{num_classes} classes; the file is damaged or belongs to another dataset. {fix}")

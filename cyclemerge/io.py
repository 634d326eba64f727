"""Artifact I/O: atomic writes, and reads that never run code from a file.

Every artifact is written to a temp file and renamed into place, so a crash or Ctrl-C mid-write
leaves either the old file or no file, never half of one (PIPELINE.md invariant 5).

Every ``torch.load`` goes through :func:`load_torch`, with ``weights_only=True``: a pickle can name
any Python callable (``os.system`` included) and unpickling calls it, and the checkpoints users
merge often come from someone else. The project's own files hold only tensors, dicts, lists,
strings and numbers, which the restricted unpickler accepts. A file that needs more is refused
with :class:`CheckpointError` before any of its code runs. ``.safetensors`` files cannot carry
code at all; the merged model is written in that format too.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import pickletools
import tempfile
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any

import torch

SAFE_FORMATS = ("a state dict saved with torch.save(model.state_dict(), path) (tensors only), "
                "or a .safetensors file (safetensors.torch.save_file(model.state_dict(), path))")
# The .safetensors metadata entry holding a checkpoint's non-tensor part as one JSON string: one
# entry, because the format keeps metadata in a hash map whose order differs from run to run.
_META_KEY = "cyclemerge"


class CheckpointError(ValueError):
    """A checkpoint or artifact file that cannot be loaded safely or used; the message names the
    file and the fix."""


def _atomic(path: str | Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# Wall-clock fields: they belong in metrics/*.json and MLflow, never in an artifact, or equal
# params and seeds would give different bytes (PIPELINE.md invariant 6) and DVC and the Prefect
# cache keys would see changed inputs after a retrain that changed nothing.
WALL_CLOCK_KEYS = frozenset({"seconds", "align_seconds"})


def without_wall_clock(obj: Any) -> Any:
    """``obj`` with every dict entry named in :data:`WALL_CLOCK_KEYS` left out, at any depth."""
    if isinstance(obj, dict):
        return {k: without_wall_clock(v) for k, v in obj.items() if k not in WALL_CLOCK_KEYS}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(without_wall_clock(v) for v in obj)
    return obj


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically, without wall-clock fields (so equal content gives equal bytes)."""
    clean = without_wall_clock(obj)
    return _atomic(path, lambda f: torch.save(clean, f))


def write_text(text: str, path: str | Path) -> Path:
    return _atomic(path, lambda f: f.write(text.encode()))


def write_json(obj: Any, path: str | Path) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n", path)


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def unsafe_globals(path: str | Path) -> list[str] | None:
    """The Python objects a torch.save file (or a plain pickle) would import and call when unpickled,
    read without unpickling it; None when the file is no pickle at all (junk, a cut-off archive)."""
    if zipfile.is_zipfile(path):
        try:
            from torch.serialization import get_unsafe_globals_in_checkpoint

            return sorted(get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - a damaged archive: the load's own error says more
            return None
    try:
        found = _pickled_globals(Path(path).read_bytes())
    except OSError:
        return None
    if found is None:
        return None
    # What torch's tensors-only reader itself allows (legacy files name their storages and rebuilders).
    allowed = ("torch._utils.", "collections.OrderedDict", "torch.serialization.")
    return sorted(n for n in found if n.startswith("torch.nn.") or not (n.startswith(allowed)
                                                                        or n.rsplit(".", 1)[-1].endswith("Storage")))


def _pickled_globals(data: bytes) -> set[str] | None:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in the pickles at the start of ``data``, by
    reading the opcodes only (pickletools never calls anything); None if not even one pickle parses."""
    names: set[str] = set()
    stream, parsed = BytesIO(data), 0
    while stream.tell() < len(data):
        strings: list[str] = []
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    names.add(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                    strings.append(str(arg))
        except Exception:  # noqa: BLE001 - raw storage bytes after the pickles, or no pickle at all
            break
        parsed += 1
    return names if parsed else None


# Callables a pickle can use to run commands or code: named first in a refusal (the refusal itself
# does not depend on them: everything beyond tensors is refused).
_CODE_RUNNERS = frozenset({"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty",
                           "code", "codeop", "ctypes", "webbrowser", "pickle", "marshal", "platform", "pdb"})
_RUNNING_BUILTINS = frozenset({"eval", "exec", "compile", "__import__", "getattr", "setattr", "open", "apply",
                               "execfile", "input", "breakpoint", "globals", "vars"})


def _runs_code(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    return module.split(".")[0] in _CODE_RUNNERS or (module in ("builtins", "__builtin__") and attr in _RUNNING_BUILTINS)


def refusal_message(path: str | Path, names: list[str], label: str = "") -> str:
    """Why a pickle-carrying file is refused, and how to save it safely instead."""
    where = f"{label}: {path}" if label else str(path)
    runners = [n for n in names if _runs_code(n)]
    layers = [n for n in names if n.startswith("torch.nn.modules.")]
    if layers and not runners:
        classes = [n for n in names if not n.startswith(("torch.nn.modules.", "builtins.", "__builtin__."))] + layers
        return (f"{where} holds a whole pickled model ({', '.join(classes[:3])}{', …' if len(classes) > 3 else ''}), "
                "as torch.save(model) writes it; loading that would run code named in the file, so cyclemerge "
                "refuses it. Save the weights instead: torch.save(model.state_dict(), path) or, safest, "
                "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')")
    shown = runners + [n for n in names if n not in runners]
    listed = ", ".join(shown[:3]) + (", …" if len(shown) > 3 else "") if shown else "objects other than tensors"
    what = (f"was refused without running it: unpickling it would import and call {listed}, which can run "
            "any code. cyclemerge reads only data; if you trust this file, load it yourself and save the "
            "weights alone again")
    return f"{where} {what}. Safe formats: {SAFE_FORMATS}"


def load_torch(path: str | Path, *, label: str = "") -> Any:
    """``torch.load`` that never runs code from the file (``weights_only=True``), on the CPU.

    A file that needs arbitrary objects, a damaged file, an empty file or a folder raises
    :class:`CheckpointError` naming the file (``label`` prefixes it, e.g. the params key).
    A missing file stays a :class:`FileNotFoundError`.
    """
    path = Path(path)
    where = f"{label}: {path}" if label else str(path)
    if path.is_dir():
        raise CheckpointError(f"{where} is a folder, not a checkpoint file. Safe formats: {SAFE_FORMATS}")
    if path.exists() and path.stat().st_size == 0:
        raise CheckpointError(f"{where} is empty (0 bytes): the save or copy did not finish; save it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        names = unsafe_globals(path)
        if names:
            raise CheckpointError(refusal_message(path, names, label)) from None
        if names is None or "Weights only load failed" not in str(e):  # the bytes are no pickle at all
            raise CheckpointError(f"{where} is not a readable PyTorch checkpoint ({_unpickler_reason(e)}); it may be "
                                  f"damaged or only partly copied. Safe formats: {SAFE_FORMATS}") from None
        raise CheckpointError(f"{where} was refused without running it: it holds pickled Python objects that the "
                              f"tensors-only reader does not accept ({_unpickler_reason(e)}). "
                              f"Safe formats: {SAFE_FORMATS}") from None
    except Exception as e:  # noqa: BLE001 - truncated zips, bad magic numbers, EOF: all one thing to a user
        raise CheckpointError(f"{where} is not a readable PyTorch checkpoint ({_short(e)}); it may be damaged or "
                              f"only partly copied. Safe formats: {SAFE_FORMATS}") from None


def _unpickler_reason(e: BaseException) -> str:
    """The specific part of torch's weights-only refusal, without its advice to load unsafely."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    boilerplate = ("Weights only load failed", "weights_only", "Check the documentation", "Please file an issue",
                   "Do it only")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not any(b in ln for b in boilerplate)]
    return " ".join(lines)[:200] or "not a tensors-only file"


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'…' if len(text) > 200 else ''}"


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    """A state dict as ``.safetensors`` (atomic; keys sorted, so equal weights give equal bytes)."""
    from safetensors.torch import save

    tensors = {k: state_dict[k].detach().cpu().contiguous().clone() for k in sorted(state_dict)}
    return _atomic(path, lambda f: f.write(save(tensors, metadata=metadata)))


def load_safetensors(path: str | Path, *, label: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the string metadata of a ``.safetensors`` file."""
    from safetensors import safe_open

    path = Path(path)
    where = f"{label}: {path}" if label else str(path)
    if path.is_dir():
        raise CheckpointError(f"{where} is a folder, not a .safetensors file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError for a bad header or a cut-off file
        raise CheckpointError(f"{where} is not a readable .safetensors file ({_short(e)}); it may be damaged or "
                              "only partly copied: save it again with safetensors.torch.save_file") from None
    return tensors, metadata


def checkpoint_metadata(checkpoint: dict[str, Any]) -> dict[str, str]:
    """A checkpoint dict's non-tensor entries as .safetensors metadata (one sorted JSON string)."""
    rest = {k: v for k, v in without_wall_clock(checkpoint).items() if k != "state_dict"}
    return {_META_KEY: json.dumps(rest, sort_keys=True, default=_jsonable)}


def read_checkpoint_file(path: str | Path, *, label: str = "") -> Any:
    """What a checkpoint file holds, by suffix, without running code from it.

    ``.safetensors``: the state dict, or the cyclemerge checkpoint dict when its metadata carries
    one (written by :func:`save_model_checkpoint`). Anything else: :func:`load_torch`.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_torch(path, label=label)
    tensors, metadata = load_safetensors(path, label=label)
    if _META_KEY not in metadata:
        return tensors
    try:
        checkpoint = json.loads(metadata[_META_KEY])
    except ValueError as e:
        checkpoint = e
    if not isinstance(checkpoint, dict):
        where = f"{label}: {path}" if label else str(path)
        raise CheckpointError(f"{where}: its {_META_KEY!r} metadata is not a JSON object ({str(checkpoint)[:100]}); "
                              "remove the metadata or save the state dict alone") from None
    return {**checkpoint, "state_dict": tensors}


def save_model_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """A checkpoint dict as ``path`` (torch.save) and beside it as ``.safetensors`` with the same
    metadata: each file written atomically; the safetensors copy is the one to share."""
    path = Path(path)
    safe = save_safetensors(checkpoint["state_dict"], path.with_suffix(".safetensors"), checkpoint_metadata(checkpoint))
    return save_torch(checkpoint, path), safe


def file_hash(path: str | Path) -> str:
    """sha256 of a file or, for a folder, of its files' relative names and contents."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and "__pycache__" not in p.parts)
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def tensors_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict, stable across processes (unlike hashing the objects)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


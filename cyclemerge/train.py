"""Training of the seed models, and import of the user's own checkpoints.

A checkpoint carries what made it (architecture, dataset shape, seed, params hash, metrics)
beside the weights, so it can be explained and reloaded without the params file.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cyclemerge.config import ModelConfig, TrainConfig
from cyclemerge.data import DataBundle, augment_batch, iterate_batches
from cyclemerge.io import SAFE_FORMATS, CheckpointError, read_checkpoint_file
from cyclemerge.models import build_model
from cyclemerge.models.custom import describe, how_to_fit
from cyclemerge.permutation import StateDict

CHECKPOINT_FORMAT = "cyclemerge-checkpoint/1"
_INIT_LOCK = threading.Lock()


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is visible; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimisation step ``step`` of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    state_dict: StateDict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def model_for(model_cfg: ModelConfig, data: DataBundle) -> torch.nn.Module:
    return build_model(model_cfg, in_channels=data.in_channels, image_size=data.image_size, num_classes=data.num_classes)


def train_model(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: DataBundle,
    seed: int,
    *,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train one model from ``seed`` on the training subset of the TRAIN split (never the test split)."""
    device = resolve_device(train_cfg.device)
    with _INIT_LOCK:  # initialisation draws from torch's global RNG: seeds trained in threads must not interleave
        torch.manual_seed(seed)
        model = model_for(model_cfg, data).to(device)
    x_all = data.train_x[data.train_idx]
    y_all = data.train_y[data.train_idx]
    if device.type == "cuda":
        x_all, y_all = x_all.to(device), y_all.to(device)

    params = [p for p in model.parameters() if p.requires_grad]
    if train_cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)

    steps_per_epoch = math.ceil(len(x_all) / train_cfg.batch_size)
    total = steps_per_epoch * train_cfg.epochs
    warmup = steps_per_epoch * train_cfg.warmup_epochs if train_cfg.schedule == "warmup_cosine" else 0
    gen = torch.Generator().manual_seed(seed)
    bf16 = train_cfg.precision == "bf16"
    if bf16 and x_all.dim() == 4:
        model = model.to(memory_format=torch.channels_last)  # oneDNN's bf16 convolutions want NHWC
    history: list[dict] = []
    step = 0
    start = time.perf_counter()
    for epoch in range(train_cfg.epochs):
        model.train()
        loss_sum = correct = seen = 0.0
        for xb, yb in iterate_batches(x_all, y_all, train_cfg.batch_size, shuffle=True, generator=gen):
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if train_cfg.augment:
                xb = augment_batch(xb, gen)
            for group in opt.param_groups:
                group["lr"] = train_cfg.lr * lr_factor(step, total, warmup, train_cfg.schedule)
            if bf16 and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if train_cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
            opt.step()
            step += 1
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
            if on_step:
                on_step(step, total)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                  "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        history.append(record)
        if on_epoch:
            on_epoch(record)
    state_dict = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return TrainResult(state_dict=state_dict, history=history, seconds=time.perf_counter() - start)


def make_checkpoint(state_dict: StateDict, model_cfg: ModelConfig, data: DataBundle, *, seed: int | None,
                    params_hash: str, metrics: dict, history: list[dict] | None = None, source: str = "trained") -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "state_dict": state_dict,
        "model": model_cfg.model_dump(mode="json"),
        "data": {"name": data.name, "in_channels": data.in_channels, "image_size": data.image_size,
                 "num_classes": data.num_classes},
        "seed": seed,
        "params_hash": params_hash,
        "metrics": metrics,
        "history": history or [],
        "source": source,
    }


def _describe(obj: object) -> str:
    """What a loaded file holds, for an error message (a training checkpoint names its keys)."""
    if isinstance(obj, dict):
        nested = [str(k) for k, v in obj.items() if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor)
                                                                                        for t in v.values())]
        hint = f"; its state dict may be under {', '.join(map(repr, nested[:3]))}: save that dict alone" if nested else ""
        keys = ", ".join(repr(k) for k in list(obj)[:5]) + (", …" if len(obj) > 5 else "")
        return f"a dict with non-tensor entries (keys {keys}){hint}"
    return f"a {type(obj).__name__}"


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating point" if dtype.is_floating_point else "integer"


def read_user_checkpoint(path: str | Path, model_cfg: ModelConfig, reference: StateDict) -> StateDict:
    """One user checkpoint as a state dict that fits ``reference``, or a CheckpointError saying why.

    Reads ``.safetensors`` or a ``torch.save`` file without running code from it (a pickled whole
    model or any other object is refused before it can execute). A state dict's values must be
    dense tensors whose keys, shapes and kind of dtype (floating point, integer) match the model;
    a float16 or float64 checkpoint is converted to the model's dtype.
    """
    path = Path(path)
    label = "train.checkpoints"
    if not path.exists():
        raise CheckpointError(f"{label}: {path} does not exist (check the path; relative paths are "
                              "resolved against the project folder)")
    obj = read_checkpoint_file(path, label=label)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        saved_arch = obj.get("model", {}).get("arch") if isinstance(obj.get("model"), dict) else None
        if saved_arch != model_cfg.arch:
            raise CheckpointError(f"{label}: {path} holds a {saved_arch!r} model but model.arch is "
                                  f"{model_cfg.arch!r}; set model.arch (and its widths) to match the checkpoints")
        obj = obj.get("state_dict")
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = "an empty dict" if isinstance(obj, dict) and not obj else _describe(obj)
        raise CheckpointError(f"{label}: {path} holds {what}, not a state dict; "
                              f"save models with torch.save(model.state_dict(), path). Safe formats: {SAFE_FORMATS}")
    names = {str(k) for k in obj}
    missing = sorted(set(reference) - names)
    unexpected = sorted(names - set(reference))
    if missing or unexpected or len(names) != len(obj):
        raise CheckpointError(
            f"{label}: {path} does not match {describe(model_cfg)}: missing keys {missing[:5]}"
            f"{'…' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
            f"; {how_to_fit(model_cfg)}")
    obj = {str(k): v for k, v in obj.items()}
    odd = [f"{k}: {obj[k].layout} on {obj[k].device.type}" for k in reference
           if obj[k].layout != torch.strided or obj[k].device.type != "cpu"]
    if odd:
        raise CheckpointError(f"{label}: {path} holds sparse, meta or other non-dense tensors ({'; '.join(odd[:3])}); "
                              "save dense weights that hold values (model.state_dict() of a model on a real device)")
    wrong = [f"{k}: {tuple(obj[k].shape)} vs expected {tuple(t.shape)}" for k, t in reference.items()
             if tuple(obj[k].shape) != tuple(t.shape)]
    if wrong:
        raise CheckpointError(f"{label}: {path} has mismatched shapes ({'; '.join(wrong[:3])}); "
                              + ("set model.hidden / model.width and the dataset to those the checkpoints were trained with"
                                 if model_cfg.arch != "custom" else f"{describe(model_cfg)} builds other shapes; {how_to_fit(model_cfg)} (and the dataset)"))
    kinds = [f"{k}: {obj[k].dtype} vs expected {t.dtype}" for k, t in reference.items()
             if _kind(obj[k].dtype) != _kind(t.dtype)]
    if kinds:
        raise CheckpointError(f"{label}: {path} has tensors of the wrong kind of dtype ({'; '.join(kinds[:3])}); "
                              "weights must be floating point and counters integers, as model.state_dict() gives them")
    return {k: obj[k].detach().to(reference[k].dtype).clone() for k in reference}


def import_checkpoints(paths: list[str | Path], model_cfg: ModelConfig, data: DataBundle) -> list[StateDict]:
    """Load N user checkpoints (our format, a bare state dict, or .safetensors) and check they fit one
    architecture (see :func:`read_user_checkpoint`).

    Non-finite weights are not rejected here: the pre-filter before alignment flags and drops them,
    so one broken checkpoint does not stop a merge of the others.
    """
    if len(paths) < 2:
        raise CheckpointError(f"train.checkpoints: merging needs at least 2 checkpoints, got {len(paths)}")
    reference = model_for(model_cfg, data).state_dict()
    return [read_user_checkpoint(path, model_cfg, reference) for path in paths]

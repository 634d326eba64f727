"""Train stage: seed models trained, scored on the test split and packed as checkpoints, or the user's
own checkpoints imported and scored the same way.

``train_model`` is the one "train, score, checkpoint" step the pipeline, the grid and the benchmarks
share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cyclemerge.config import Config
from cyclemerge.data import DataBundle
from cyclemerge.evaluate import accuracy_and_loss, load_into
from cyclemerge.permutation import StateDict
from cyclemerge.train import import_checkpoints, make_checkpoint, model_for
from cyclemerge.train import train_model as fit

# Test-split scoring of a seed model: a batch size of inference only (it does not change a score), fixed
# here so that no evaluation param makes DVC or Prefect think the models need retraining.
SCORE_BATCH_SIZE = 1000


@dataclass
class TrainedModel:
    """One endpoint: its weights, where they came from, its test scores and the checkpoint to save."""

    state_dict: StateDict
    seed: int | None
    metrics: dict[str, float]
    checkpoint: dict
    history: list[dict] = field(default_factory=list)

    @property
    def source(self) -> str:
        return str(self.checkpoint.get("source", ""))


def test_scores(model: torch.nn.Module, state_dict: StateDict, data: DataBundle) -> dict[str, float]:
    """Test accuracy and loss of ``state_dict``, or NaN for weights that are not all finite."""
    if not all(torch.isfinite(t).all() for t in state_dict.values() if t.is_floating_point()):
        return {"test_acc": float("nan"), "test_loss": float("nan")}
    scores = accuracy_and_loss(load_into(model, state_dict), data.test_x, data.test_y, batch_size=SCORE_BATCH_SIZE)
    return {"test_acc": scores["acc"], "test_loss": scores["loss"]}


def train_model(config: Config, data: DataBundle, seed: int, *, params_hash: str = "", source: str = "trained",
                on_epoch: Callable[[dict], None] | None = None,
                on_step: Callable[[int, int], None] | None = None) -> TrainedModel:
    """Train one model from ``seed`` with ``config.train`` (TRAIN split only), score it, make its checkpoint."""
    result = fit(config.model, config.train, data, seed, on_epoch=on_epoch, on_step=on_step)
    metrics = {**test_scores(model_for(config.model, data), result.state_dict, data),
               "train_acc": result.history[-1]["train_acc"], "train_loss": result.history[-1]["train_loss"],
               "seconds": result.seconds}
    checkpoint = make_checkpoint(result.state_dict, config.model, data, seed=seed, params_hash=params_hash,
                                 metrics=metrics, history=result.history, source=source)
    return TrainedModel(result.state_dict, seed, metrics, checkpoint, result.history)


def train_models(config: Config, data: DataBundle, seeds: Sequence[int] | None = None, **kwargs) -> list[TrainedModel]:
    """Every seed model of ``config.train`` (``seeds``: these instead), one after another."""
    return [train_model(config, data, s, **kwargs) for s in (config.train.model_seeds() if seeds is None else seeds)]


def import_models(paths: Sequence[str | Path], config: Config, data: DataBundle, *,
                  params_hash: str = "") -> list[TrainedModel]:
    """The user's checkpoints checked against ``config.model`` and scored like trained models.

    Non-finite weights are kept (scored NaN): the pre-filter before alignment decides what to do.
    """
    model = model_for(config.model, data)
    out = []
    for path, sd in zip(paths, import_checkpoints(list(paths), config.model, data)):
        metrics = test_scores(model, sd, data)
        checkpoint = make_checkpoint(sd, config.model, data, seed=None, params_hash=params_hash, metrics=metrics,
                                     source=str(path))
        out.append(TrainedModel(sd, None, metrics, checkpoint))
    return out


def training_summary(models: Sequence[dict]) -> dict:
    """``metrics/train.json`` of the per-model rows ``{"index", "seed", "test_acc", ...}``: mean and min
    test accuracy over the models that have one (an imported model with non-finite weights has none)."""
    accs = [m["test_acc"] for m in models if m["test_acc"] == m["test_acc"]]
    return {"models": list(models), "mean_test_acc": sum(accs) / len(accs) if accs else None,
            "min_test_acc": min(accs) if accs else None}

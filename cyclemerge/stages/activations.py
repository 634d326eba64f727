"""Activations stage: each model's per-channel statistics on the calibration slice (for REPAIR), and the
cross-model correlations activation matching needs.

Every slice is a prefix of the data bundle's calibration slice of the TRAIN split: the test split
never reaches activation statistics, gates or repair (invariant 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cyclemerge.activations import Stats, channel_stats, cross_correlations
from cyclemerge.config import Config
from cyclemerge.data import DataBundle
from cyclemerge.evaluate import load_into
from cyclemerge.permutation import StateDict


def calibration_slice(data: DataBundle, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of the calibration slice (inputs and labels), TRAIN split only."""
    idx = data.calib_idx[:n]
    return data.train_x[idx], data.train_y[idx]


def activation_stats(model: nn.Module, state_dict: StateDict, x: torch.Tensor, config: Config) -> dict[str, Stats]:
    """Per-stat-point channel mean and variance of ``state_dict`` (loaded into ``model``) over ``x``."""
    return channel_stats(load_into(model, state_dict).eval(), x[:config.activations.num_samples],
                         batch_size=config.activations.batch_size)


def correlations(models: Sequence[nn.Module], x: torch.Tensor, config: Config) -> dict[str, torch.Tensor]:
    """Cross-model unit correlations per permutation group (float32), over the same slice as the statistics."""
    corr = cross_correlations(list(models), x[:config.activations.num_samples], batch_size=config.activations.batch_size)
    return {k: v.float() for k, v in corr.items()}

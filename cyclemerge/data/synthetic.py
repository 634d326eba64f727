"""Generated image data of any shape, for tests, benchmarks and machines without the real datasets.

Each class has a smooth prototype image (coarse noise upsampled, so convolutions have spatial
structure to find); a sample is its class prototype at a random contrast plus white noise of
scale ``noise``. The data depends on the ``data.synthetic`` section only: the same numbers on every
run and machine, and the test split does not change when ``num_train`` does.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.nn.functional as F

from cyclemerge.config import SyntheticConfig

# Fixed seeds of the three independent streams; data.seed is for the calibration slice only, so
# changing it never changes the dataset itself.
_PROTOTYPE_SEED, _TRAIN_SEED, _TEST_SEED = 7001, 7002, 7003
GENERATOR_VERSION = 1


def _prototypes(cfg: SyntheticConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(_PROTOTYPE_SEED)
    coarse = max(2, cfg.image_size // 4)
    low = torch.randn(cfg.num_classes, cfg.channels, coarse, coarse, generator=g)
    protos = F.interpolate(low, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    return protos / protos.std(dim=(1, 2, 3), keepdim=True)


def _draw(protos: torch.Tensor, n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = protos.shape[0]
    # balanced classes in random order, so any prefix of the split is close to balanced too
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    x = contrast * protos[y] + noise * torch.randn(n, *protos.shape[1:], generator=g)
    return x, y


def make_synthetic(cfg: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  tuple[float, ...], tuple[float, ...]]:
    """Train and test splits, normalized per channel with the train split's mean/std (also returned)."""
    protos = _prototypes(cfg)
    train_x, train_y = _draw(protos, cfg.num_train, cfg.noise, _TRAIN_SEED)
    test_x, test_y = _draw(protos, cfg.num_test, cfg.noise, _TEST_SEED)
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True)
    train_x = ((train_x - mean) / std).float()
    test_x = ((test_x - mean) / std).float()
    return train_x, train_y, test_x, test_y, tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())


def synthetic_checksum(cfg: SyntheticConfig) -> str:
    """Stands in for the source files' md5 in the data fingerprint: the recipe fixes the data."""
    recipe = {"generator": GENERATOR_VERSION, **cfg.model_dump(mode="json")}
    return hashlib.md5(json.dumps(recipe, sort_keys=True).encode(), usedforsecurity=False).hexdigest()

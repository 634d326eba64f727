"""Weighted averaging of state dicts that already share one basis (the universe), and the map into it.

The bottom layer of merging: it knows permutations and tensors, nothing of matching, gates or
REPAIR, so every method above it can average without importing the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cyclemerge.permutation import PermSpec, Perms, StateDict, apply_perms


def average(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None) -> StateDict:
    """Convex combination of N state dicts; integer buffers (BatchNorm's counter) come from the first.

    Averaging is done in float64 and cast back, so the mean of N identical models is bit-identical
    to that model.
    """
    if not state_dicts:
        raise ValueError("average: need at least one state dict")
    n = len(state_dicts)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.numel() != n:
        raise ValueError(f"average: {n} state dicts but {w.numel()} weights")
    w = w / w.sum()
    out: StateDict = {}
    for key, first in state_dicts[0].items():
        if not torch.is_floating_point(first):
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for wk, sd in zip(w.tolist(), state_dicts):
            acc += wk * sd[key].to(torch.float64)
        out[key] = acc.to(first.dtype)
    return out


def to_universe_all(state_dicts: Sequence[StateDict], spec: PermSpec, perms: Sequence[Perms]) -> list[StateDict]:
    """Every model mapped into the universe by its own permutations, for a plain PermSpec. Stages map
    through :func:`cyclemerge.universe.to_universe_all`, which also handles block-structured specs."""
    return [apply_perms(sd, spec, p) for sd, p in zip(state_dicts, perms)]

"""Quality measures of an alignment: the objective, cycle-consistency error, cosine similarity."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from cyclemerge.matching.base import Correlations, MatchResult
from cyclemerge.permutation import PermSpec, Perms, StateDict, apply_perms, compose, invert, pairwise_map

PairMaps = dict[tuple[int, int], Perms]
"""(a, b) -> the permutation expressing model b in model a's basis (``pairwise_map`` convention)."""


def _spec_keys(state_dict: StateDict, spec: PermSpec) -> list[str]:
    return [k for k in spec if torch.is_floating_point(state_dict[k])]


def objective(state_dicts: Sequence[StateDict], spec: PermSpec, perms: Sequence[Perms]) -> float:
    """sum_{a<b} <U_a, U_b> over every floating tensor of the spec, U_i = model i in the universe.

    Computed as (||sum_i U_i||^2 - sum_i ||U_i||^2) / 2, in float64.
    """
    if len(perms) != len(state_dicts):
        raise ValueError(f"objective: {len(state_dicts)} models but {len(perms)} permutation sets")
    keys = _spec_keys(state_dicts[0], spec)
    total = 0.0
    universe = [apply_perms({k: sd[k] for k in keys}, spec, p) for sd, p in zip(state_dicts, perms)]
    for key in keys:
        stack = torch.stack([u[key].detach().to("cpu", torch.float64) for u in universe])
        total += 0.5 * (stack.sum(0).square().sum() - stack.square().sum()).item()
    return total


def activation_objective(correlations: Correlations, perms: Sequence[Perms]) -> float:
    """sum_g sum_{a<b} sum_u C_ab[p_a[u], p_b[u]]: total correlation of the units matched in the universe."""
    total = 0.0
    for g, c in correlations.items():
        for a, b in itertools.combinations(range(len(perms)), 2):
            total += c[a, b][perms[a][g], perms[b][g]].to(torch.float64).sum().item()
    return total


def pairwise_maps(result: MatchResult) -> PairMaps:
    """Every ordered pair's map a user of the method would get.

    Universe methods (c2m3, merge_many, naive) factor each map through the universe, P_ab = P_a P_b^T.
    The pairwise baseline matched pair by pair and stored those maps in ``report.extra``: that is what
    a Git Re-Basin user composes, so its cycle error is measured on them.
    """
    stored = result.report.extra.get("pairwise_maps")
    if stored is not None:
        return dict(stored)
    perms = result.perms
    return {(a, b): pairwise_map(perms[a], perms[b]) for a in range(len(perms)) for b in range(len(perms)) if a != b}


def cycle_error(maps: PairMaps, n_models: int) -> float:
    """Fraction of units not sent back to themselves along a -> b -> c -> a, over all ordered triples.

    Each group counts by its size. Model a is taken to c's basis, then b's, then back to a's.
    0 for cycle-consistent maps; 0 (no triples) when n_models < 3.
    """
    wrong = total = 0
    for a, b, c in itertools.permutations(range(n_models), 3):
        around = compose(compose(maps[(c, a)], maps[(b, c)]), maps[(a, b)])
        for p in around.values():
            wrong += int((p != torch.arange(p.numel(), device=p.device)).sum())
            total += p.numel()
    return wrong / total if total else 0.0


def cycle_error_by_group(maps: PairMaps, n_models: int) -> dict[str, float]:
    """Per group fraction of units not sent back to themselves, over all ordered triples."""
    wrong: dict[str, int] = {}
    total: dict[str, int] = {}
    for a, b, c in itertools.permutations(range(n_models), 3):
        around = compose(compose(maps[(c, a)], maps[(b, c)]), maps[(a, b)])
        for g, p in around.items():
            wrong[g] = wrong.get(g, 0) + int((p != torch.arange(p.numel(), device=p.device)).sum())
            total[g] = total.get(g, 0) + p.numel()
    return {g: wrong[g] / total[g] for g in total}


def cosine_similarity(state_dicts: Sequence[StateDict], keys: Sequence[str] | None = None) -> float:
    """Mean pairwise cosine similarity of the flattened models (all floating tensors unless ``keys``).

    Report it before and after mapping to the universe: alignment should raise it.
    """
    if len(state_dicts) < 2:
        raise ValueError("cosine_similarity needs at least two models")
    keys = list(keys) if keys is not None else [k for k, t in state_dicts[0].items() if torch.is_floating_point(t)]
    flat = torch.stack([torch.cat([sd[k].detach().to("cpu", torch.float64).flatten() for k in keys]) for sd in state_dicts])
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)
    gram = flat @ flat.T
    n = len(state_dicts)
    return ((gram.sum() - gram.diagonal().sum()) / (n * (n - 1))).item()


def maps_from_pairs(pair_perms: dict[tuple[int, int], Perms], n_models: int) -> PairMaps:
    """Complete one computed map per unordered pair ((a, b): b expressed in a's basis) with its inverse."""
    maps: PairMaps = {}
    for (a, b), p in pair_perms.items():
        maps[(a, b)] = p
        maps[(b, a)] = invert(p)
    missing = [(a, b) for a, b in itertools.permutations(range(n_models), 2) if (a, b) not in maps]
    if missing:
        raise ValueError(f"maps_from_pairs: no map for pairs {missing[:5]}")
    return maps

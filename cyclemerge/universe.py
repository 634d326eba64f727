"""The one way from a model's state dicts to the matching methods and into the universe.

A model's spec is a :class:`~cyclemerge.spec.DerivedSpec` (``cyclemerge.models.spec_of``). When it
has block-structured tensors (``composite_keys``: the input channels of a conv after ``torch.cat``, a
Linear after a flatten of C x H x W), its ``perm_spec`` describes *views* of the state dicts, where each block is a
tensor of its own; the matching methods run on those views, and permutations are applied to the real
state dicts with ``DerivedSpec.apply``. For every other model (all built-ins) the view is the state
dict itself and both paths are exactly ``apply_perms`` with ``model.perm_spec()``.

Stages match and map through these functions, never through ``apply_perms`` on ``model.perm_spec()``,
so no call site can forget the views. Permutations keep the one convention of
:mod:`cyclemerge.permutation` (``perms[i][g]`` maps model ``i`` into the universe).
"""

from __future__ import annotations

from collections.abc import Sequence

from cyclemerge import matching
from cyclemerge.config import AlignConfig
from cyclemerge.matching import MatchResult
from cyclemerge.models.graph_spec import spec_of
from cyclemerge.permutation import PermSpec, Perms, StateDict, apply_perms
from cyclemerge.prefilter import map_into_universe as _map_into_universe
from cyclemerge.spec.derived import DerivedSpec

__all__ = ["alignment_objective", "map_into_universe", "match_models", "match_pair_models", "permute", "spec_of",
           "to_universe_all", "views"]


def views(spec: DerivedSpec, state_dicts: Sequence[StateDict]) -> list[StateDict]:
    """The state dicts as the matching methods read them (the same dicts when there are no blocks)."""
    if not spec.composite_keys:
        return list(state_dicts)
    return [spec.view(sd) for sd in state_dicts]


def permute(state_dict: StateDict, spec: DerivedSpec | PermSpec, perms: Perms) -> StateDict:
    """One real state dict permuted by ``perms`` (blocks included)."""
    if isinstance(spec, DerivedSpec):
        return spec.apply(state_dict, perms) if spec.composite_keys else apply_perms(state_dict, spec.perm_spec, perms)
    return apply_perms(state_dict, spec, perms)


def to_universe_all(state_dicts: Sequence[StateDict], spec: DerivedSpec | PermSpec,
                    perms: Sequence[Perms]) -> list[StateDict]:
    """Every model mapped into the universe by its own permutations."""
    if len(perms) != len(state_dicts):
        raise ValueError(f"to_universe_all: {len(state_dicts)} models but {len(perms)} permutation sets")
    return [permute(sd, spec, p) for sd, p in zip(state_dicts, perms)]


def match_models(*, state_dicts: Sequence[StateDict], spec: DerivedSpec, config: AlignConfig, **options) -> MatchResult:
    """``matching.match`` on the views (``options``: correlations, progress, score)."""
    return matching.match(state_dicts=views(spec, state_dicts), spec=spec.perm_spec, config=config, **options)


def alignment_objective(state_dicts: Sequence[StateDict], spec: DerivedSpec, perms: Sequence[Perms]) -> float:
    """``matching.objective`` (sum of universe inner products); every block counts once, as in the tensor."""
    return matching.objective(views(spec, state_dicts), spec.perm_spec, perms)


def match_pair_models(target: StateDict, source: StateDict, spec: DerivedSpec, *, seed: int, max_iter: int) -> Perms:
    """Weight matching of ``source`` into ``target``'s basis."""
    t, s = views(spec, [target, source])
    return matching.match_pair(t, s, spec.perm_spec, seed=seed, max_iter=max_iter)


def map_into_universe(flagged: StateDict, universe_models: Sequence[StateDict], spec: DerivedSpec, *,
                      seed: int = 0, max_iter: int = 100) -> tuple[StateDict, Perms]:
    """A flagged model matched to the average of the clean universe models and mapped in
    (``align.outlier_action: gate_off``); returns the real mapped state dict and its perms."""
    viewed = views(spec, [flagged, *universe_models])
    _, perms = _map_into_universe(viewed[0], viewed[1:], spec.perm_spec, seed=seed, max_iter=max_iter)
    return permute(flagged, spec, perms), perms

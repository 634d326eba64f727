"""The one way from a model's state dicts to the matching methods and into the universe.

A model's spec is a :class:`~cyclemerge.spec.DerivedSpec` (``spec_of``). When it has block-structured
tensors (``composite_keys``: the input channels of a conv after ``torch.cat``, a Linear after a
flatten of C x H x W), its ``perm_spec`` describes *views* of the state dicts, where each block is a
tensor of its own; the matching methods run on those views, and permutations are applied to the real
state dicts with ``DerivedSpec.apply``. For every other model (all built-ins) the view is the state
dict itself and both paths are exactly ``apply_perms`` with ``model.perm_spec()``.

Stages match and map through these functions, never through ``apply_perms`` on ``model.perm_spec()``,
so no call site can forget the views. Permutations keep the one convention of
:mod:`cyclemerge.permutation` (``perms[i][g]`` maps model ``i`` into the universe).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cyclemerge import matching
from cyclemerge.config import AlignConfig
from cyclemerge.matching import MatchResult
from cyclemerge.permutation import PermSpec, Perms, StateDict, apply_perms, group_sizes
from cyclemerge.prefilter import map_into_universe as _map_into_universe
from cyclemerge.spec.derived import DerivedSpec


def plain_spec(spec: PermSpec, state_dict: StateDict, *, stat_points: dict[str, str] | None = None,
               layer_parts: dict[str, list[str]] | None = None) -> DerivedSpec:
    """A hand-written PermSpec as a DerivedSpec (no blocks); keys it does not list are fixed."""
    axes = {}
    # the spec's own key order first: the matchers visit groups in the order they first appear
    for key in [*(k for k in spec if k in state_dict), *(k for k in state_dict if k not in spec)]:
        tensor = state_dict[key]
        groups = spec.get(key, (None,) * tensor.dim())
        axes[key] = tuple(((g, n, 1),) for g, n in zip(groups, tensor.shape))
    return DerivedSpec(groups=group_sizes(spec, state_dict), axes=axes,
                       shapes={k: tuple(t.shape) for k, t in state_dict.items()},
                       stat_points=dict(stat_points or {}), layer_parts={k: list(v) for k, v in (layer_parts or {}).items()})


def spec_of(model: nn.Module) -> DerivedSpec:
    """The model's derived spec (``model.derived_spec()``, every model of ``build_model``), or one made
    from a model that only writes ``perm_spec()`` by hand."""
    derived = getattr(model, "derived_spec", None)
    if callable(derived):
        return derived()
    if not hasattr(model, "perm_spec"):
        raise TypeError(f"{type(model).__name__} has neither derived_spec() nor perm_spec(); build it with "
                        "cyclemerge.models.build_model or derive one with cyclemerge.spec.derive_spec(...).attach")
    points = model.stat_points() if hasattr(model, "stat_points") else None
    parts = model.layer_parts() if hasattr(model, "layer_parts") else None
    return plain_spec(model.perm_spec(), model.state_dict(), stat_points=points, layer_parts=parts)


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


def match(*, state_dicts: Sequence[StateDict], spec: DerivedSpec, config: AlignConfig, **options) -> MatchResult:
    """``matching.match`` on the views (``options``: correlations, progress, score)."""
    return matching.match(state_dicts=views(spec, state_dicts), spec=spec.perm_spec, config=config, **options)


def objective(state_dicts: Sequence[StateDict], spec: DerivedSpec, perms: Sequence[Perms]) -> float:
    """``matching.objective`` (sum of universe inner products); every block counts once, as in the tensor."""
    return matching.objective(views(spec, state_dicts), spec.perm_spec, perms)


def match_pair(target: StateDict, source: StateDict, spec: DerivedSpec, *, seed: int, max_iter: int) -> Perms:
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

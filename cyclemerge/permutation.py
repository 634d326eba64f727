"""Permutations as data: apply, invert, compose, map to the universe and back.

The one index convention of cyclemerge
--------------------------------------
A *perm spec* maps every state-dict key (parameters and buffers) to one entry per tensor axis:
the name of the *permutation group* that axis belongs to, or ``None`` when the axis is never
permuted (inputs, classes, scalars).

A *permutation* of a group is a ``LongTensor`` index vector ``p`` of the group's size. Applying it
gathers along every axis tied to the group: ``W_new = W.index_select(axis, p)``, so new unit ``j``
is old unit ``p[j]``. Its matrix is ``P[j, p[j]] = 1`` (``P @ W == W[p]``).

``perms[i][g]`` maps model ``i`` INTO the universe: the universe copy of model ``i`` is
``apply_perms(sd_i, spec, perms[i])``; universe unit ``j`` of group ``g`` is model ``i``'s unit
``perms[i][g][j]``. (In the C2M3 paper's notation, where ``P_i`` maps universe -> model ``i`` and
``U_i = P_i^T W_i``, our matrix is ``P_i^T``.)

The pairwise map that expresses model ``b`` in model ``a``'s basis is
``pairwise_map(perms[a], perms[b]) = perms[b][inv(perms[a])]``; maps built this way compose to the
identity around every cycle.
"""

from __future__ import annotations

import torch

PermSpec = dict[str, tuple[str | None, ...]]
Perms = dict[str, torch.Tensor]
StateDict = dict[str, torch.Tensor]


def group_sizes(spec: PermSpec, state_dict: StateDict) -> dict[str, int]:
    """Size of every permutation group, read off the tensors (checks they agree)."""
    sizes: dict[str, int] = {}
    for key, axes in spec.items():
        for axis, group in enumerate(axes):
            if group is None:
                continue
            n = state_dict[key].shape[axis]
            if sizes.setdefault(group, n) != n:
                raise ValueError(f"perm spec: group {group!r} has size {sizes[group]} but {key} axis {axis} has {n}")
    return sizes


def check_spec(spec: PermSpec, state_dict: StateDict) -> None:
    """Every key has a spec entry with one item per axis, and group sizes are consistent."""
    missing = sorted(set(state_dict) - set(spec))
    extra = sorted(set(spec) - set(state_dict))
    if missing or extra:
        raise ValueError(f"perm spec does not match the state dict: missing {missing}, unknown {extra}")
    for key, axes in spec.items():
        if len(axes) != state_dict[key].dim():
            raise ValueError(f"perm spec: {key} has {state_dict[key].dim()} axes but the spec lists {len(axes)}")
    group_sizes(spec, state_dict)


def identity_perms(spec: PermSpec, state_dict: StateDict) -> Perms:
    return {g: torch.arange(n) for g, n in group_sizes(spec, state_dict).items()}


def random_perms(spec: PermSpec, state_dict: StateDict, generator: torch.Generator | None = None) -> Perms:
    return {g: torch.randperm(n, generator=generator) for g, n in group_sizes(spec, state_dict).items()}


def apply_perms(state_dict: StateDict, spec: PermSpec, perms: Perms) -> StateDict:
    """Gather every tied axis by its group's index vector; keys without groups are copied as is."""
    out: StateDict = {}
    for key, tensor in state_dict.items():
        for axis, group in enumerate(spec.get(key, ())):
            if group is not None and group in perms:
                tensor = tensor.index_select(axis, perms[group].to(tensor.device))
        out[key] = tensor
    return out


def invert(perms: Perms) -> Perms:
    return {g: torch.argsort(p) for g, p in perms.items()}


def compose(first: Perms, second: Perms) -> Perms:
    """The single permutation equal to applying ``first`` and then ``second``."""
    return {g: first[g][second[g]] for g in first}


def to_universe(state_dict: StateDict, spec: PermSpec, perms: Perms) -> StateDict:
    return apply_perms(state_dict, spec, perms)


def from_universe(state_dict: StateDict, spec: PermSpec, perms: Perms) -> StateDict:
    return apply_perms(state_dict, spec, invert(perms))


def pairwise_map(perms_a: Perms, perms_b: Perms) -> Perms:
    """Permutation that expresses model b in model a's basis: into the universe, then out to a."""
    return compose(perms_b, invert(perms_a))


def perm_matrix(p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Matrix ``P`` with ``P[j, p[j]] = 1``, so that ``P @ W == W[p]``."""
    n = p.numel()
    m = torch.zeros(n, n, dtype=dtype, device=p.device)
    m[torch.arange(n, device=p.device), p] = 1
    return m


def is_identity(perms: Perms) -> bool:
    return all(torch.equal(p, torch.arange(p.numel(), device=p.device)) for p in perms.values())

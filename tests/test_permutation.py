"""The index convention of cyclemerge.permutation: inverses, composition, pairwise maps, matrices."""

from __future__ import annotations

import itertools

import pytest
import torch

from cyclemerge.permutation import (
    apply_perms,
    check_spec,
    compose,
    from_universe,
    group_sizes,
    identity_perms,
    invert,
    is_identity,
    pairwise_map,
    perm_matrix,
    random_perms,
    to_universe,
)

# A 3-layer MLP-like spec with a conv-shaped tensor and a scalar buffer, over two groups.
SPEC = {
    "a.weight": ("g", None),
    "a.bias": ("g",),
    "b.weight": ("h", "g", None, None),
    "b.count": (),
    "c.weight": (None, "h"),
}


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(5, 3, generator=g),
        "a.bias": torch.randn(5, generator=g),
        "b.weight": torch.randn(4, 5, 3, 3, generator=g),
        "b.count": torch.tensor(7),
        "c.weight": torch.randn(2, 4, generator=g),
    }


def n_models(n: int, seed: int = 0):
    sd = state_dict()
    g = torch.Generator().manual_seed(seed)
    return sd, [random_perms(SPEC, sd, g) for _ in range(n)]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_group_sizes_and_identity():
    sd = state_dict()
    assert group_sizes(SPEC, sd) == {"g": 5, "h": 4}
    ident = identity_perms(SPEC, sd)
    assert is_identity(ident)
    out = apply_perms(sd, SPEC, ident)
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_apply_gathers_every_tied_axis():
    sd = state_dict()
    perms = {"g": torch.tensor([4, 0, 3, 1, 2]), "h": torch.tensor([2, 3, 0, 1])}
    out = apply_perms(sd, SPEC, perms)
    assert torch.equal(out["a.weight"], sd["a.weight"][perms["g"]])
    assert torch.equal(out["a.bias"], sd["a.bias"][perms["g"]])
    assert torch.equal(out["b.weight"], sd["b.weight"][perms["h"]][:, perms["g"]])
    assert torch.equal(out["c.weight"], sd["c.weight"][:, perms["h"]])
    assert torch.equal(out["b.count"], sd["b.count"])
    # New unit j is old unit p[j].
    assert torch.equal(out["a.bias"][1], sd["a.bias"][0])


def test_perm_matrix_acts_as_the_index_vector():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randperm(6, generator=g), torch.randperm(4, generator=g)
    w = torch.randn(6, 4, generator=g)
    P, Q = perm_matrix(p), perm_matrix(q)
    assert torch.equal(P @ w, w[p])
    assert torch.equal(w @ Q.T, w[:, q])
    assert torch.equal(P @ P.T, torch.eye(6))
    assert torch.equal(perm_matrix(invert({"p": p})["p"]), P.T)
    assert perm_matrix(p, dtype=torch.float64).dtype == torch.float64


def test_invert_and_compose_identities():
    _, (p, q, r) = n_models(3)
    assert is_identity(compose(p, invert(p)))
    assert is_identity(compose(invert(p), p))
    assert_same(invert(invert(p)), p)
    assert_same(compose(compose(p, q), r), compose(p, compose(q, r)))
    assert_same(invert(compose(p, q)), compose(invert(q), invert(p)))


def test_compose_means_first_then_second():
    sd, (p, q) = n_models(2, seed=4)
    twice = apply_perms(apply_perms(sd, SPEC, p), SPEC, q)
    once = apply_perms(sd, SPEC, compose(p, q))
    assert all(torch.equal(twice[k], once[k]) for k in sd)


def test_universe_round_trip_is_exact():
    sd, (p,) = n_models(1, seed=2)
    universe = to_universe(sd, SPEC, p)
    assert any(not torch.equal(universe[k], sd[k]) for k in sd)
    back = from_universe(universe, SPEC, p)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_pairwise_map_expresses_b_in_a_basis():
    # Model b is model a with its units shuffled; the pairwise map from universe maps recovers a.
    sd_a, (pa, pb) = n_models(2, seed=3)
    to_b = compose(pa, invert(pb))  # a -> universe -> b's basis
    assert_same(to_b, pairwise_map(pb, pa))
    sd_b = apply_perms(sd_a, SPEC, to_b)
    assert_same(to_universe(sd_a, SPEC, pa), to_universe(sd_b, SPEC, pb))
    in_a = apply_perms(sd_b, SPEC, pairwise_map(pa, pb))
    assert all(torch.equal(in_a[k], sd_a[k]) for k in sd_a)
    assert is_identity(pairwise_map(pa, pa))


def test_pairwise_maps_compose_to_identity_around_every_3_cycle():
    sd, perms = n_models(4, seed=5)
    for a, b, c in itertools.permutations(range(4), 3):
        # a -> c (express a in c's basis), then c -> b, then b -> a.
        cycle = compose(compose(pairwise_map(perms[c], perms[a]), pairwise_map(perms[b], perms[c])), pairwise_map(perms[a], perms[b]))
        assert is_identity(cycle), (a, b, c)
        moved = sd
        for src, dst in ((a, c), (c, b), (b, a)):
            moved = apply_perms(moved, SPEC, pairwise_map(perms[dst], perms[src]))
        assert all(torch.equal(moved[k], sd[k]) for k in sd)


def test_random_perms_are_deterministic_given_a_generator():
    sd = state_dict()
    a = random_perms(SPEC, sd, torch.Generator().manual_seed(9))
    b = random_perms(SPEC, sd, torch.Generator().manual_seed(9))
    assert_same(a, b)
    assert all(torch.equal(torch.sort(p).values, torch.arange(p.numel())) for p in a.values())


def test_check_spec_accepts_a_valid_spec():
    check_spec(SPEC, state_dict())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda spec, sd: spec.pop("a.bias"), r"missing \['a.bias'\]"),
        (lambda spec, sd: spec.__setitem__("z.weight", ("g",)), r"unknown \['z.weight'\]"),
        (lambda spec, sd: spec.__setitem__("b.weight", ("h", "g")), r"b.weight has 4 axes but the spec lists 2"),
        (lambda spec, sd: spec.__setitem__("c.weight", (None, "g")), r"group 'g' has size 5 but c.weight axis 1 has 4"),
    ],
    ids=["missing", "unknown", "axes", "size"],
)
def test_check_spec_errors_name_the_offending_key(edit, message):
    spec, sd = dict(SPEC), state_dict()
    edit(spec, sd)
    with pytest.raises(ValueError, match=message):
        check_spec(spec, sd)

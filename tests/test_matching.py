"""Alignment methods: planted permutations are recovered, the universe keeps every model's function,
C2M3 is cycle-consistent, and the Frank-Wolfe pieces (gradient, exact line search) are exact."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cyclemerge import matching
from cyclemerge.averaging import average
from cyclemerge.config import MATCHERS, AlignConfig, ModelConfig
from cyclemerge.matching import c2m3
from cyclemerge.matching.objectives import ActivationObjective, WeightObjective, vertex
from cyclemerge.matching.polish import polish_activations, polish_weights, reanchor
from cyclemerge.matching.metrics import cycle_error, cycle_error_by_group, maps_from_pairs, objective
from cyclemerge.models import ChannelAffine, LayerNorm2d, build_model
from cyclemerge.permutation import apply_perms, group_sizes, invert, is_identity, pairwise_map, random_perms

CPU = torch.device("cpu")
ARCHS = {
    "mlp": (ModelConfig(arch="mlp", hidden=[24, 20, 16]), 1, 6),
    "resnet20-ln": (ModelConfig(arch="resnet20", norm="layernorm"), 3, 8),
    "resnet20-bn": (ModelConfig(arch="resnet20", norm="batchnorm"), 3, 8),
    "vgg16": (ModelConfig(arch="vgg16"), 3, 8),
}


def make(arch: str, seed: int) -> nn.Module:
    """A float64 model in eval mode whose norms and buffers are not permutation-invariant."""
    cfg, channels, size = ARCHS[arch]
    torch.manual_seed(seed)
    model = build_model(cfg, in_channels=channels, image_size=size, num_classes=5).double().eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LayerNorm2d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if isinstance(m, ChannelAffine):
                m.scale.uniform_(0.5, 1.5, generator=g)
                m.shift.normal_(0.0, 0.1, generator=g)
    return model


def inputs(arch: str) -> torch.Tensor:
    _, channels, size = ARCHS[arch]
    return torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def outputs(model: nn.Module, sd: dict, x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(x)


def planted(arch: str, n_models: int, noise: float = 0.0, seed: int = 0):
    """N randomly permuted copies of one model (+ noise); truth[i] maps copy i back to the original."""
    model = make(arch, seed)
    sd, spec = model.state_dict(), model.perm_spec()
    g = torch.Generator().manual_seed(seed + 1)
    relabel = [random_perms(spec, sd, g) for _ in range(n_models)]
    sds = []
    for r in relabel:
        copy = apply_perms(sd, spec, r)
        sds.append({k: v + noise * v.std() * torch.randn(v.shape, generator=g, dtype=v.dtype)
                    if torch.is_floating_point(v) and v.numel() > 1 else v for k, v in copy.items()})
    return model, sds, spec, [invert(r) for r in relabel]


def truth_maps(truth):
    return {(a, b): pairwise_map(truth[a], truth[b]) for a in range(len(truth)) for b in range(len(truth)) if a != b}


def same_maps(found, expected) -> bool:
    return all(torch.equal(found[ab][g], expected[ab][g]) for ab in expected for g in expected[ab])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained():
    """Three MLPs trained from different seeds on the same synthetic 5-class task (float64)."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 36, generator=g) * 1.5
    y = torch.randint(0, 5, (600,), generator=g)
    x = (centers[y] + torch.randn(600, 36, generator=g)).view(-1, 1, 6, 6)
    sds = []
    for seed in range(3):
        torch.manual_seed(seed + 10)
        model = build_model(ARCHS["mlp"][0], in_channels=1, image_size=6, num_classes=5)
        for step in range(200):  # plain SGD: no optimizer object, whose first step imports a compiler stack
            idx = torch.arange(step * 64, step * 64 + 64) % 600
            model.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.2 * p.grad
        with torch.no_grad():
            assert (model(x).argmax(1) == y).float().mean() > 0.9
        sds.append({k: v.detach().double() for k, v in model.state_dict().items()})
    return sds, model.perm_spec()


def test_registry_matches_config_and_names_methods_on_error():
    assert set(matching.METHODS) == set(MATCHERS)
    with pytest.raises(ValueError, match="unknown alignment method 'zipit'; known: c2m3, merge_many, naive, pairwise"):
        matching.get("zipit")


@pytest.mark.parametrize("arch", ["mlp", "resnet20-ln"])
@pytest.mark.parametrize("method", ["c2m3", "merge_many", "pairwise"])
def test_planted_permutations_are_recovered_and_merge_to_the_original(arch, method):
    model, sds, spec, truth = planted(arch, n_models=4)
    result = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(method=method))
    assert same_maps(matching.pairwise_maps(result), truth_maps(truth))
    merged = average([apply_perms(sd, spec, p) for sd, p in zip(sds, result.perms)])
    x = inputs(arch)
    original = outputs(model, sds[0], x)
    torch.testing.assert_close(outputs(model, merged, x), original, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["c2m3", "merge_many", "pairwise"])
def test_batchnorm_buffers_are_matched_and_the_step_counter_kept(method):
    model, sds, spec, truth = planted("resnet20-bn", n_models=2, seed=4)
    for sd in sds:
        sd["norm1.num_batches_tracked"].fill_(7)
    result = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(method=method))
    assert same_maps(matching.pairwise_maps(result), truth_maps(truth))
    merged = average([apply_perms(sd, spec, p) for sd, p in zip(sds, result.perms)])
    assert merged["norm1.num_batches_tracked"].item() == 7
    torch.testing.assert_close(outputs(model, merged, inputs("resnet20-bn")), outputs(model, sds[1], inputs("resnet20-bn")))


@pytest.mark.parametrize("method", ["c2m3", "merge_many", "pairwise"])
@pytest.mark.parametrize("n_models", [2, 5])
def test_planted_permutations_are_recovered_through_noise(method, n_models):
    _, sds, spec, truth = planted("mlp", n_models=n_models, noise=0.05, seed=3)
    result = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(method=method))
    assert same_maps(matching.pairwise_maps(result), truth_maps(truth))


@pytest.mark.parametrize("arch", ["mlp", "resnet20-ln", "resnet20-bn"])
def test_mapping_to_the_c2m3_universe_keeps_every_model_function(arch):
    models = [make(arch, seed) for seed in range(3)]
    sds, spec = [m.state_dict() for m in models], models[0].perm_spec()
    result = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(max_iter=3))
    assert not all(is_identity(p) for p in result.perms[1:])
    x = inputs(arch)
    for model, sd, perms in zip(models, sds, result.perms):
        torch.testing.assert_close(outputs(model, apply_perms(sd, spec, perms), x), outputs(model, sd, x))


def test_mapping_a_vgg16_to_the_universe_keeps_its_function():
    """Activation matching on random correlations: cheap non-trivial permutations of every group."""
    models = [make("vgg16", seed) for seed in range(2)]
    sds, spec = [m.state_dict() for m in models], models[0].perm_spec()
    g = torch.Generator().manual_seed(0)
    corr = {name: torch.rand(2, 2, n, n, generator=g) for name, n in group_sizes(spec, sds[0]).items()}
    config = AlignConfig(method="pairwise", cost="activations")
    result = matching.match(state_dicts=sds, spec=spec, config=config, correlations=corr)
    assert not is_identity(result.perms[1])
    x = inputs("vgg16")
    torch.testing.assert_close(outputs(models[1], apply_perms(sds[1], spec, result.perms[1]), x), outputs(models[1], sds[1], x))


def test_c2m3_maps_compose_to_identity_and_pairwise_maps_do_not(trained):
    sds, spec = trained
    c2m3_result = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(method="c2m3"))
    assert cycle_error(matching.pairwise_maps(c2m3_result), 3) == 0.0
    pairwise = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(method="pairwise"))
    maps = matching.pairwise_maps(pairwise)
    error = cycle_error(maps, 3)
    assert 0.0 < error < 1.0
    by_group = cycle_error_by_group(maps, 3)
    sizes = group_sizes(spec, sds[0])
    assert error == pytest.approx(sum(by_group[g] * sizes[g] for g in sizes) / sum(sizes.values()))
    # The reference model keeps its basis; the others are the maps matched to it.
    assert is_identity(pairwise.perms[0])
    assert all(torch.equal(pairwise.perms[1][g], maps[(0, 1)][g]) for g in sizes)


def test_pairwise_matches_every_model_to_the_reference(trained):
    sds, spec = trained
    result = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(method="pairwise", reference=2, seed=4))
    assert is_identity(result.perms[2])
    for i in (0, 1):
        direct = matching.match_pair(sds[2], sds[i], spec, seed=4, max_iter=200)
        assert all(torch.equal(result.perms[i][g], direct[g]) for g in direct)
    assert set(matching.pairwise_maps(result)) == set(itertools.permutations(range(3), 2))


def test_cycle_error_counts_units_not_sent_home():
    swap = {"g": torch.tensor([1, 0, 2, 3])}
    ident = {"g": torch.arange(4)}
    maps = maps_from_pairs({(0, 1): swap, (0, 2): ident, (1, 2): ident}, 3)
    # Every 3-cycle passes the swap exactly once: 2 of 4 units move.
    assert cycle_error(maps, 3) == pytest.approx(0.5)
    assert cycle_error(maps, 2) == 0.0


@pytest.mark.parametrize("init", ["identity", "barycenter", "sinkhorn"])
@pytest.mark.parametrize("anchor", [True, False])
def test_frank_wolfe_objective_never_decreases(trained, init, anchor):
    sds, spec = trained
    result = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(init=init, anchor=anchor, max_iter=40))
    history = np.array(result.report.objective_history)
    assert len(history) == result.report.iterations + 1
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:]))
    # Without the anchor, the barycenter is a symmetric stationary point: FW stops at once.
    assert history[-1] > history[0] or (init == "barycenter" and not anchor)
    # The report's final objective is the rounded solution's, computed from scratch.
    assert result.report.extra["objective"] == pytest.approx(objective(sds, spec, result.perms))


def test_anchored_c2m3_beats_or_ties_the_symmetric_iteration_on_two_models(trained):
    sds, spec = trained
    anchored = matching.match(state_dicts=sds[:2], spec=spec, config=AlignConfig())
    symmetric = matching.match(state_dicts=sds[:2], spec=spec, config=AlignConfig(anchor=False))
    assert is_identity(anchored.perms[0])
    assert anchored.report.extra["objective"] >= symmetric.report.extra["objective"]


def random_state(arch, n_models, seed):
    models = [make(arch, seed + i) for i in range(n_models)]
    sds, spec = [m.state_dict() for m in models], models[0].perm_spec()
    sizes = group_sizes(spec, sds[0])
    mats = c2m3.initial_mats(sizes, n_models, "sinkhorn", seed=seed, anchor=None, device=CPU, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    targets = {name: torch.stack([torch.randperm(n, generator=g) for _ in range(n_models)]) for name, n in sizes.items()}
    return sds, spec, mats, targets


def pair_gradients(sds, spec, mats):
    """dF/dM from the O(N^2) pair terms of C2M3 (reference §1.3) for matrices and vectors, in our convention."""
    grads = {g: torch.zeros_like(m) for g, m in mats.items()}
    for key, axes in spec.items():
        if not torch.is_floating_point(sds[0][key]) or all(a is None for a in axes):
            continue
        for a, b in itertools.permutations(range(len(sds)), 2):
            wa, wb = sds[a][key], sds[b][key]
            if len(axes) == 1:
                r = axes[0]
                grads[r][a] += torch.outer(mats[r][b] @ wb, wa)
                continue
            r, c = axes
            ra, rb = (mats[r][a], mats[r][b]) if r else (torch.eye(wa.shape[0], dtype=wa.dtype),) * 2
            ca, cb = (mats[c][a], mats[c][b]) if c else (torch.eye(wa.shape[1], dtype=wa.dtype),) * 2
            if r:  # row role: M_r^b W^b M_c^bT M_c^a W^aT
                grads[r][a] += rb @ wb @ cb.T @ ca @ wa.T
            if c:  # column role: M_c^b W^bT M_r^bT M_r^a W^a
                grads[c][a] += cb @ wb.T @ rb.T @ ra @ wa
    return grads


def test_universe_sum_gradient_equals_the_pairwise_terms():
    sds, spec, mats, _ = random_state("mlp", 4, seed=1)
    obj = WeightObjective(sds, spec, CPU, torch.float64)
    obj.reset(mats)
    grads = obj.gradient(mats)
    expected = pair_gradients(sds, spec, mats)
    for g in grads:
        torch.testing.assert_close(grads[g], expected[g], rtol=1e-10, atol=1e-12)
    # Anchoring model 2 only skips its own gradient.
    anchored = WeightObjective(sds, spec, CPU, torch.float64, anchor=2)
    anchored.reset(mats)
    for g, grad in anchored.gradient(mats).items():
        torch.testing.assert_close(grad[[0, 1, 3]], expected[g][[0, 1, 3]], rtol=1e-10, atol=1e-12)
        assert not grad[2].any()


def test_universe_sum_gradient_equals_autograd_on_conv_and_residual_groups():
    sds, spec, mats, _ = random_state("resnet20-bn", 3, seed=2)
    obj = WeightObjective(sds, spec, CPU, torch.float64)
    value = obj.reset(mats)
    grads = obj.gradient(mats)
    leaves = {g: m.clone().requires_grad_(True) for g, m in mats.items()}
    total = 0.0
    for key, axes in spec.items():
        if not torch.is_floating_point(sds[0][key]):
            continue
        universe = []
        for i, sd in enumerate(sds):
            w = sd[key]
            for k, g in enumerate(axes):
                if g is not None:
                    w = torch.tensordot(leaves[g][i], w, dims=([1], [k])).movedim(0, k)
            universe.append(w)
        total = total + sum((universe[a] * universe[b]).sum() for a, b in itertools.combinations(range(3), 2))
    total.backward()
    assert value == pytest.approx(total.item(), rel=1e-12)
    for g in grads:
        torch.testing.assert_close(grads[g], leaves[g].grad, rtol=1e-10, atol=1e-12)


def objective_at(obj, mats):
    return obj.reset(mats)


def toward(mats, targets, t):
    return {g: torch.lerp(m, vertex(targets[g], m), t) for g, m in mats.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_line_search_matches_a_dense_grid(seed):
    sds, spec, mats, targets = random_state("resnet20-ln" if seed == 2 else "mlp", 3, seed)
    obj = WeightObjective(sds, spec, CPU, torch.float64)
    obj.reset(mats)
    poly = obj.line(mats, targets)
    grid = np.linspace(0.0, 1.0, 21 if seed == 2 else 201)  # each point is a full pass; the ResNet's costs more
    exact = np.array([objective_at(obj, toward(mats, targets, t)) for t in grid])
    np.testing.assert_allclose(np.polynomial.Polynomial(poly)(grid), exact, rtol=1e-10, atol=1e-10)
    t_star = c2m3.best_step(poly)
    at_star = objective_at(obj, toward(mats, targets, t_star))
    assert exact.max() - 1e-9 <= at_star <= exact.max() + 1e-3 * abs(exact.max())


def test_best_step_maximizes_random_quartics_on_the_unit_interval():
    rng = np.random.default_rng(0)
    grid = np.linspace(0.0, 1.0, 20001)
    for _ in range(200):
        poly = rng.normal(size=5)
        p = np.polynomial.Polynomial(poly)
        t = c2m3.best_step(poly)
        assert 0.0 <= t <= 1.0
        assert p(t) >= p(grid).max() - 1e-9
    assert c2m3.best_step(np.array([1.0, -1.0, 0, 0, 0])) == 0.0


def test_incremental_state_matches_a_fresh_computation():
    sds, spec, mats, targets = random_state("resnet20-bn", 3, seed=4)
    obj = WeightObjective(sds, spec, CPU, torch.float64)
    obj.reset(mats)
    poly = obj.line(mats, targets)
    obj.step(0.37)
    moved = toward(mats, targets, 0.37)
    grads = obj.gradient(moved)
    fresh_value = obj.reset(moved)
    assert fresh_value == pytest.approx(np.polynomial.Polynomial(poly)(0.37), rel=1e-12)
    fresh = obj.gradient(moved)
    for g in grads:
        torch.testing.assert_close(grads[g], fresh[g])


def planted_correlations(sizes, n_models, seed, noise=0.1):
    """C[a, b][i, j] = K[latent of unit i of a, latent of unit j of b] + noise, K with a unit diagonal."""
    g = torch.Generator().manual_seed(seed)
    corr, truth = {}, [{} for _ in range(n_models)]
    for name, n in sizes.items():
        k = 0.4 * (2 * torch.rand(n, n, generator=g) - 1)
        k = (k + k.T) / 2
        k.fill_diagonal_(1.0)
        latent = [torch.randperm(n, generator=g) for _ in range(n_models)]  # unit i of a is latent[a][i]
        c = torch.empty(n_models, n_models, n, n, dtype=torch.float64)
        for a, b in itertools.product(range(n_models), repeat=2):
            c[a, b] = k[latent[a]][:, latent[b]] + noise * torch.randn(n, n, generator=g)
        corr[name] = c
        for a in range(n_models):
            truth[a][name] = torch.argsort(latent[a])  # universe unit u = latent u
    return corr, truth


@pytest.mark.parametrize("method", ["c2m3", "merge_many", "pairwise"])
def test_activation_matching_recovers_planted_permutations(method):
    model = make("mlp", 0)
    sds = [model.state_dict()] * 4
    spec = model.perm_spec()
    corr, truth = planted_correlations(group_sizes(spec, sds[0]), 4, seed=5)
    config = AlignConfig(method=method, cost="activations")
    result = matching.match(state_dicts=sds, spec=spec, config=config, correlations=corr)
    assert same_maps(matching.pairwise_maps(result), truth_maps(truth))
    assert result.report.extra["cost"] == "activations"
    if method == "c2m3":
        history = np.array(result.report.objective_history)
        assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:]))


def test_activation_line_search_is_exact():
    sizes = {"a": 7, "b": 5}
    corr, _ = planted_correlations(sizes, 3, seed=1, noise=0.5)
    corr = matching.base.check_correlations(corr, sizes, 3)
    obj = ActivationObjective(corr, CPU, torch.float64)
    mats = c2m3.initial_mats(sizes, 3, "sinkhorn", seed=0, anchor=None, device=CPU, dtype=torch.float64)
    targets = {g: torch.stack([torch.randperm(n) for _ in range(3)]) for g, n in sizes.items()}
    obj.reset(mats)
    poly = obj.line(mats, targets)
    assert poly[3] == poly[4] == 0.0
    for t in np.linspace(0, 1, 11):
        assert np.polynomial.Polynomial(poly)(t) == pytest.approx(objective_at(obj, toward(mats, targets, t)), rel=1e-12)


def test_activation_cost_without_correlations_fails_clearly():
    model = make("mlp", 0)
    sds, spec = [model.state_dict()] * 2, model.perm_spec()
    config = AlignConfig(cost="activations")
    with pytest.raises(ValueError, match="activations.correlations: true"):
        matching.match(state_dicts=sds, spec=spec, config=config)
    corr, _ = planted_correlations(group_sizes(spec, sds[0]), 2, seed=0)
    del corr["h1"]
    with pytest.raises(ValueError, match=r"no correlations for groups \['h1'\]"):
        matching.match(state_dicts=sds, spec=spec, config=config, correlations=corr)


@pytest.mark.parametrize("method", ["c2m3", "merge_many", "pairwise"])
def test_same_inputs_give_the_same_permutations(trained, method):
    sds, spec = trained
    config = AlignConfig(method=method, init="sinkhorn", seed=3, max_iter=20)
    first = matching.match(state_dicts=sds, spec=spec, config=config)
    second = matching.match(state_dicts=sds, spec=spec, config=config)
    assert all(torch.equal(a[g], b[g]) for a, b in zip(first.perms, second.perms) for g in a)
    assert first.report.objective_history == second.report.objective_history


def test_restarts_keep_the_best_objective_and_record_every_start(trained):
    sds, spec = trained
    result = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(restarts=4, max_iter=30))
    starts = result.report.extra["starts"]
    assert [(s["start"], s["seed"]) for s in starts] == [("identity", None), ("barycenter", None), ("sinkhorn", 0), ("sinkhorn", 1)]
    best = max(range(4), key=lambda k: starts[k]["objective"])
    assert result.report.extra["selected_start"] == best
    assert objective(sds, spec, result.perms) == pytest.approx(starts[best]["objective"])


def test_restarts_by_calibration_loss_use_the_score_function(trained):
    sds, spec = trained
    calls = []

    def score(perms):  # lower is better: here, prefer the start with the LOWEST objective
        calls.append(perms)
        return objective(sds, spec, perms)

    config = AlignConfig(restarts=3, select_by="calibration_loss", max_iter=30)
    result = matching.match(state_dicts=sds, spec=spec, config=config, score=score)
    starts = result.report.extra["starts"]
    assert len(calls) == 3 and all(s["score"] is not None for s in starts)
    assert result.report.extra["selected_start"] == min(range(3), key=lambda k: starts[k]["score"])
    with pytest.raises(ValueError, match="no score function"):
        matching.match(state_dicts=sds, spec=spec, config=config)


def test_naive_keeps_every_basis_and_alignment_raises_cosine_similarity():
    _, sds, spec, _ = planted("mlp", n_models=3, seed=2)
    naive = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(method="naive"))
    assert all(is_identity(p) for p in naive.perms)
    aligned = matching.match(state_dicts=sds, spec=spec, config=AlignConfig())
    universe = [apply_perms(sd, spec, p) for sd, p in zip(sds, aligned.perms)]
    assert matching.cosine_similarity(universe) == pytest.approx(1.0)
    assert matching.cosine_similarity(sds) < 0.5
    assert aligned.report.extra["objective"] > naive.report.extra["objective"]


def test_objective_is_the_sum_of_pairwise_inner_products(trained):
    sds, spec = trained
    perms = [random_perms(spec, sds[0], torch.Generator().manual_seed(i)) for i in range(3)]
    universe = [apply_perms(sd, spec, p) for sd, p in zip(sds, perms)]
    direct = sum((universe[a][k] * universe[b][k]).sum().item()
                 for a, b in itertools.combinations(range(3), 2) for k in spec)
    assert objective(sds, spec, perms) == pytest.approx(direct, rel=1e-12)


def test_report_summary_is_json_and_progress_is_reported(trained):
    sds, spec = trained
    seen = []
    result = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(method="pairwise"),
                            progress=lambda step, value: seen.append((step, value)))
    assert [s for s, _ in seen] == [1, 2, 3]
    summary = json.loads(json.dumps(result.report.summary()))
    assert summary["method"] == "pairwise" and "pairwise_maps" not in summary["extra"]
    seen.clear()
    result = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(max_iter=5), progress=lambda s, v: seen.append(v))
    assert seen == result.report.objective_history[1:]


def test_bad_inputs_fail_with_a_clear_message():
    model = make("mlp", 0)
    sd, spec = model.state_dict(), model.perm_spec()
    with pytest.raises(ValueError, match="align.reference is 5 but there are only 2 models"):
        matching.match(state_dicts=[sd, sd], spec=spec, config=AlignConfig(method="pairwise", reference=5))
    other = {k: v[..., :3] if k == "layers.0.weight" else v for k, v in sd.items()}
    with pytest.raises(ValueError, match="model 1"):
        matching.match(state_dicts=[sd, other], spec=spec, config=AlignConfig())


# --- polish: block-coordinate LAP ascent after Frank-Wolfe's rounding -----------------------------


def scramble(perms, model: int, group: str, swaps: int, seed: int):
    """``perms`` with ``swaps`` random transpositions applied to one model's group."""
    out = [dict(p) for p in perms]
    p = out[model][group].clone()
    g = torch.Generator().manual_seed(seed)
    for _ in range(swaps):
        a, b = torch.randperm(p.numel(), generator=g)[:2].tolist()
        p[[a, b]] = p[[b, a]]
    out[model][group] = p
    return out


@pytest.mark.parametrize("arch", ["mlp", "resnet20-ln"])
def test_polish_restores_a_disturbed_planted_solution_and_keeps_the_anchor(arch):
    """From the truth with units swapped in two models, every block's LAP against the others finds
    the planted units again (exact copies: the truth is the global maximum), and the universe is
    relabelled so the anchor keeps the identity."""
    model, sds, spec, truth = planted(arch, n_models=3, seed=6)
    anchored = reanchor(truth, 0)
    groups = list(group_sizes(spec, sds[0]))
    start = scramble(scramble(anchored, 0, groups[0], 3, seed=1), 2, groups[-1], 3, seed=2)
    assert objective(sds, spec, start) < objective(sds, spec, anchored) - 1e-9
    perms, report = polish_weights(sds, spec, start, tol=1e-9, max_sweeps=20, anchor=0)
    assert same_maps(matching.pairwise_maps(matching.MatchResult(perms, matching.MatchReport("c2m3"))), truth_maps(truth))
    assert is_identity(perms[0])
    assert report.stop_reason == "converged" and report.steps_kept >= 2
    assert report.objective_after == pytest.approx(objective(sds, spec, perms), rel=1e-12)
    assert report.objective_after > report.objective_before
    x = inputs(arch)
    for sd, p in zip(sds, perms):
        torch.testing.assert_close(outputs(model, apply_perms(sd, spec, p), x), outputs(model, sd, x))


@pytest.mark.parametrize("arch", ["mlp", "resnet20-ln"])
def test_polish_never_lowers_the_frank_wolfe_objective_on_random_models(arch):
    sds, spec, _, _ = random_state(arch, 3, seed=2)
    for init in ("identity", "barycenter"):
        plain = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(init=init, max_iter=10, polish=False))
        polished = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(init=init, max_iter=10, polish=True))
        report = polished.report.extra["polish"]
        assert report["objective_before"] == pytest.approx(plain.report.extra["objective"], rel=1e-12)
        assert polished.report.extra["objective"] == pytest.approx(objective(sds, spec, polished.perms), rel=1e-12)
        assert polished.report.extra["objective"] >= plain.report.extra["objective"]
        # Random models are far from one basin: FW's rounding leaves steps that gain.
        assert report["steps_kept"] > 0 and polished.report.extra["objective"] > plain.report.extra["objective"]
        assert is_identity(polished.perms[0])
        assert cycle_error(matching.pairwise_maps(polished), 3) == 0.0
        # Polish does not move the Frank-Wolfe iterates, only what follows the rounding.
        assert polished.report.objective_history == plain.report.objective_history


def test_polish_after_frank_wolfe_on_trained_models_reaches_a_block_optimum(trained):
    sds, spec = trained
    plain = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(polish=False))
    polished = matching.match(state_dicts=sds, spec=spec, config=AlignConfig())
    assert polished.report.extra["objective"] >= plain.report.extra["objective"]
    assert "polish" in polished.report.extra and "polish" not in plain.report.extra  # on by default
    # At the end no (model, group) LAP against the others gains: a second polish keeps nothing.
    _, again = polish_weights(sds, spec, polished.perms, tol=1e-6, max_sweeps=5, anchor=0)
    assert again.steps_kept == 0 and again.sweeps == 1
    symmetric = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(anchor=False, polish=True))
    assert symmetric.report.extra["polish"]["objective_after"] >= symmetric.report.extra["polish"]["objective_before"]
    assert cycle_error(matching.pairwise_maps(symmetric), 3) == 0.0


def test_polish_runs_on_every_restart_before_selection(trained):
    sds, spec = trained
    config = AlignConfig(restarts=3, max_iter=5, polish=False)
    plain = matching.match(state_dicts=sds, spec=spec, config=config)
    polished = matching.match(state_dicts=sds, spec=spec, config=config.model_copy(update={"polish": True}))
    before, after = plain.report.extra["starts"], polished.report.extra["starts"]
    assert all(b["objective"] <= a["objective"] + 1e-9 for b, a in zip(before, after))
    assert polished.report.extra["selected_start"] == max(range(3), key=lambda k: after[k]["objective"])
    chosen = polished.report.extra["selected_start"]
    assert polished.report.extra["rounded_objective"] == pytest.approx(before[chosen]["objective"], rel=1e-12)


def test_activation_polish_restores_planted_units_and_never_lowers_the_objective():
    sizes = {"a": 9, "b": 6}
    corr, truth = planted_correlations(sizes, 4, seed=3, noise=0.05)
    corr = matching.base.check_correlations(corr, sizes, 4)
    anchored = reanchor(truth, 1)
    start = scramble(scramble(anchored, 1, "a", 3, seed=0), 3, "b", 2, seed=1)
    perms, report = polish_activations(corr, start, tol=1e-9, max_sweeps=20, anchor=1)
    assert all(torch.equal(perms[i][g], anchored[i][g]) for i in range(4) for g in sizes)
    assert report.objective_after == pytest.approx(matching.activation_objective(corr, perms), rel=1e-12)
    assert report.objective_after > report.objective_before
    model = make("mlp", 0)
    sds, spec = [model.state_dict()] * 3, model.perm_spec()
    noisy, _ = planted_correlations(group_sizes(spec, sds[0]), 3, seed=8, noise=1.0)
    plain = matching.match(state_dicts=sds, spec=spec, correlations=noisy,
                           config=AlignConfig(cost="activations", max_iter=3, polish=False))
    polished = matching.match(state_dicts=sds, spec=spec, correlations=noisy,
                              config=AlignConfig(cost="activations", max_iter=3, polish=True))
    assert polished.report.extra["objective"] >= plain.report.extra["objective"]
    assert polished.report.extra["objective"] == pytest.approx(
        matching.activation_objective(matching.base.check_correlations(noisy, group_sizes(spec, sds[0]), 3),
                                      polished.perms), rel=1e-12)


def test_polish_keeps_only_steps_that_gain_more_than_tol(trained):
    sds, spec = trained
    plain = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(max_iter=3))
    value = objective(sds, spec, plain.perms)
    # A tolerance larger than any possible relative gain: nothing is kept, the input comes back.
    perms, report = polish_weights(sds, spec, plain.perms, tol=10.0, max_sweeps=5, anchor=0)
    assert report.steps_kept == 0 and report.sweeps == 1 and report.stop_reason == "converged"
    assert all(torch.equal(a[g], b[g]) for a, b in zip(perms, plain.perms) for g in a)
    assert report.objective_after == pytest.approx(value, rel=1e-12)
    _, capped = polish_weights(sds, spec, plain.perms, tol=0.0, max_sweeps=1, anchor=0)
    assert capped.sweeps == 1


def test_the_restart_score_is_judged_on_the_validation_split_when_there_is_one():
    from cyclemerge.averaging import average
    from cyclemerge.config import Config
    from cyclemerge.evaluate import accuracy_and_loss, load_into
    from cyclemerge.stages.align import calibration_scorer

    _, sds, spec, _ = planted("mlp", n_models=3, seed=4)
    model = make("mlp", 0)
    g = torch.Generator().manual_seed(3)
    shape = (64, ARCHS["mlp"][1], ARCHS["mlp"][2], ARCHS["mlp"][2])
    calib = (torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, 5, (64,), generator=g))
    val = (3 * torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, 5, (64,), generator=g))
    config = Config.model_validate({"repair": {"method": "none"}})
    perms = matching.match(state_dicts=sds, spec=spec, config=AlignConfig()).perms
    merged = load_into(model, average([apply_perms(sd, spec, p) for sd, p in zip(sds, perms)]))
    on_val = accuracy_and_loss(merged, *val, batch_size=500)["loss"]
    on_calib = accuracy_and_loss(merged, *calib, batch_size=500)["loss"]
    assert on_val != pytest.approx(on_calib)
    assert calibration_scorer(model, sds, [None] * 3, spec, *calib, config, val)(perms) == pytest.approx(on_val)
    assert calibration_scorer(model, sds, [None] * 3, spec, *calib, config)(perms) == pytest.approx(on_calib)

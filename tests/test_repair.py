"""REPAIR and BatchNorm reset: the folded merged model has the goal statistics, computes what a hooked
model rescaling each point in turn computes (exactly with the calibration set in one batch, to second
order in the batch noise with smaller batches), takes one forward per batch whatever the number of
points, leaves a model alone when it already has them, and gets an aligned merge of two networks
closer to its endpoints than the plain average."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from cyclemerge.activations import Stats, channel_stats, cross_correlations, permute_stats
from cyclemerge.averaging import average
from cyclemerge.models.mlp import MLP
from cyclemerge.permutation import apply_perms, invert, random_perms
from cyclemerge.repair import (
    apply_repair,
    goal_statistics,
    repair,
    reset_batchnorm,
    stat_point_weights,
)
from tests.conftest import CHANNELS, SIZE, TINY_MODELS as CONFIGS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
MEAN_ATOL, STD_RTOL = 1e-4, 1e-3


def calibration(n: int = 32, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def loaded(name: str, state_dict) -> nn.Module:
    model = tiny_model(name)
    model.load_state_dict(state_dict)
    return model.eval()


def summand_points(points: dict[str, str]) -> set[str]:
    """Branch and shortcut outputs of every residual sum (their std yields to the sum's, by design)."""
    out = set()
    for path, group in points.items():
        if path.endswith(".residual"):
            parent = path.rsplit(".", 1)[0] + "."
            out |= {q for q, g in points.items() if g == group and q.startswith(parent) and q != path}
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def merged_case(request):
    """Two differently initialised endpoints, their plain average and the uniform goal statistics."""
    name = request.param
    x = calibration()
    ends = [tiny_model(name, seed) for seed in (0, 1)]
    merged = average([m.state_dict() for m in ends])
    goal = goal_statistics([channel_stats(m, x, batch_size=len(x)) for m in ends])
    # One batch: every in-pass correction is the final one, so this is the point-by-point REPAIR.
    repaired = repair(ends[0], merged, goal, x, batch_size=len(x))
    return name, x, ends, merged, goal, repaired


def test_repaired_model_has_the_goal_statistics(merged_case):
    name, x, ends, merged, goal, repaired = merged_case
    assert list(repaired) == list(merged) and all(repaired[k].dtype == merged[k].dtype for k in merged)
    model = loaded(name, repaired)  # strict load: same architecture, no wrapper
    points = model.stat_points()
    after = channel_stats(model, x, batch_size=len(x))
    before = channel_stats(loaded(name, merged), x, batch_size=len(x))
    assert any(not torch.allclose(before[p].std, goal[p].std, rtol=0.05) for p in points), "nothing to repair"
    summands = summand_points(points)
    for p in points:
        torch.testing.assert_close(after[p].mean, goal[p].mean, rtol=0, atol=MEAN_ATOL)
        if p not in summands:
            torch.testing.assert_close(after[p].std, goal[p].std, rtol=STD_RTOL, atol=1e-6)
    # Branch and shortcut of a sum are off their goal std by one common per-channel factor.
    for p in (q for q in points if q.endswith(".residual")):
        pair = [q for q in sorted(summands) if q.startswith(p.rsplit(".", 1)[0] + ".")]
        assert len(pair) == 2
        # Dead ReLUs feed constant shortcuts, which no scale can move.
        live = torch.stack([s.var > 1e-12 for q in pair for s in (goal[q], after[q])]).all(dim=0)
        ratios = [after[q].std[live] / goal[q].std[live] for q in pair]
        torch.testing.assert_close(ratios[0], ratios[1], rtol=STD_RTOL, atol=0)


def hooked(model: nn.Module, state_dict, goal: dict[str, Stats], x: torch.Tensor) -> nn.Module:
    """Unfolded REPAIR: a forward hook (a-μ)/σ·σ_goal+μ_goal at each point, μ and σ measured in order
    with the earlier hooks active."""
    model = copy.deepcopy(model)
    model.load_state_dict(state_dict)
    for path in model.stat_points():
        cur = channel_stats(model, x, batch_size=len(x), points=[path])[path]

        # A constant channel (a dead ReLU upstream) cannot be rescaled, only moved to the goal mean.
        live = cur.var > 1e-12
        gain = torch.where(live, goal[path].std / cur.std.clamp_min(1e-30), torch.ones_like(cur.std))

        def rescale(_m, _i, out, cur=cur, gain=gain, g=goal[path]):
            shape = (1, -1) + (1,) * (out.dim() - 2)
            a = (out.double() - cur.mean.view(shape)) * gain.view(shape)
            return (a + g.mean.view(shape)).to(out.dtype)

        model.get_submodule(path).register_forward_hook(rescale)
    return model.eval()


def test_folded_model_computes_what_the_hooked_model_computes(merged_case):
    name, x, ends, merged, goal, repaired = merged_case
    reference = hooked(ends[0], merged, goal, x)
    fresh = calibration(16, seed=99)  # equal as functions, not only on the calibration set
    with torch.no_grad():
        for inputs in (x, fresh):
            expected = reference(inputs)
            got = loaded(name, repaired)(inputs)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def stat_errors(name: str, state_dict, goal: dict[str, Stats], x: torch.Tensor) -> tuple[float, float]:
    """Largest |mean - goal mean| / goal std and |std / goal std - 1| over all points and live channels
    (summands' stds excluded: they yield to their sum's by design)."""
    after = channel_stats(loaded(name, state_dict), x, batch_size=len(x))
    points = tiny_model(name).stat_points()
    summands = summand_points(points)
    mean_err = std_err = 0.0
    for p in points:
        live = goal[p].var > 1e-10
        mean_err = max(mean_err, ((after[p].mean - goal[p].mean)[live].abs() / goal[p].std[live]).max().item())
        if p not in summands:
            std_err = max(std_err, (after[p].std[live] / goal[p].std[live] - 1).abs().max().item())
    return mean_err, std_err


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_repair_is_within_its_noise_of_the_goal(name):
    # With B < N images per batch, a point's in-pass correction comes from its own batch, off the
    # pooled one by sampling deviations of relative size ~1/sqrt(B). Later points see them through
    # products of two such deviations (their mean is O(1/B)), and the pooled error is the average of
    # N/B of those products: O(1/B)·sqrt(B/N) = K/sqrt(B·N). Measured K <= 10.2 on these four models
    # for N in {512, 2048}, B in {32, ..., 512} (and ~3 on trained MLPs), so K = 16 bounds it; the
    # first-order error of in-pass corrections from the pooled-so-far statistics (K ~ 50-100) would
    # not pass, nor would measuring every point once without in-pass corrections (error ~1).
    x = calibration(512, seed=11)
    ends = [tiny_model(name, seed) for seed in (0, 1)]
    if name == "resnet20-bn":
        # Running statistics that describe the inputs, as a trained network's do: tiny_model()'s random ones
        # leave channels that fire on a few samples, whose batch statistics are no estimate at all.
        for m in ends:
            m.load_state_dict(reset_batchnorm(m, m.state_dict(), x, batch_size=len(x)))
    merged = average([m.state_dict() for m in ends])
    goal = goal_statistics([channel_stats(m, x, batch_size=len(x)) for m in ends])
    plain = stat_errors(name, merged, goal, x)
    assert max(plain) > 0.5, f"nothing to repair: {plain}"
    for batch in (128, 32):
        errors = stat_errors(name, repair(ends[0], merged, goal, x, batch_size=batch), goal, x)
        assert max(errors) <= 16 / (batch * len(x)) ** 0.5, (batch, errors)
    exact = stat_errors(name, repair(ends[0], merged, goal, x, batch_size=len(x)), goal, x)
    assert max(exact) < 1e-4, exact


@pytest.mark.parametrize("name", ["mlp", "resnet20-ln"])
def test_one_forward_per_batch_whatever_the_number_of_points(name, monkeypatch):
    x = calibration(40)
    if name == "mlp":
        models = [MLP(CHANNELS * SIZE * SIZE, [16] * depth, 10) for depth in (1, 3, 8)]
    else:
        models = [tiny_model(name)]
    for model in models:
        goal = goal_statistics([channel_stats(model, x, batch_size=len(x))])
        cls = type(model)
        calls = []
        forward = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, inp, forward=forward: calls.append(len(inp)) or forward(self, inp))
        repair(model, average([model.state_dict()] * 2), goal, x, batch_size=16)
        monkeypatch.setattr(cls, "forward", forward)
        assert calls == [16, 16, 8], (len(goal), calls)  # three batches, each run once, for 1 to 37 points


@pytest.mark.parametrize("name", list(CONFIGS))
def test_repair_of_identical_copies_changes_nothing(name):
    model = tiny_model(name, seed=3)
    x = calibration()
    sd = model.state_dict()
    goal = goal_statistics([channel_stats(model, x, batch_size=len(x))] * 3)
    repaired = repair(model, average([sd] * 3), goal, x, batch_size=len(x))
    if name == "resnet20-bn":
        # REPAIR recomputes BN running stats from the calibration data and compensates in the affine:
        # other buffers, same function.
        assert not torch.allclose(repaired["norm1.running_mean"], sd["norm1.running_mean"])
        with torch.no_grad():
            torch.testing.assert_close(loaded(name, repaired)(x), model(x), rtol=1e-4, atol=1e-4)
        return
    for k in sd:
        torch.testing.assert_close(repaired[k], sd[k], rtol=1e-4, atol=1e-5)


def test_goal_statistics_one_hot_and_uniform():
    stats = [channel_stats(tiny_model("resnet20-ln", seed), calibration(), batch_size=32) for seed in range(3)]
    for k in range(3):
        one_hot = torch.zeros(3)
        one_hot[k] = 1
        goal = goal_statistics(stats, one_hot)
        for p in stats[k]:
            assert torch.equal(goal[p].mean, stats[k][p].mean) and torch.equal(goal[p].var, stats[k][p].var)
    uniform = goal_statistics(stats)
    for p in stats[0]:
        torch.testing.assert_close(uniform[p].mean, sum(s[p].mean for s in stats) / 3)
        torch.testing.assert_close(uniform[p].var, sum(s[p].var for s in stats) / 3)  # variances, not stds
    torch.testing.assert_close(goal_statistics(stats, [2.0, 2.0, 2.0])["norm1"].var, uniform["norm1"].var)


def test_goal_statistics_per_point_and_per_channel_weights():
    stats = [channel_stats(tiny_model("mlp", seed), calibration(), batch_size=32) for seed in range(2)]
    n = stats[0]["layers.0"].mean.numel()
    per_channel = torch.zeros(n, 2)
    per_channel[: n // 2, 0] = 1  # first half of the channels from model 0, the rest from model 1
    per_channel[n // 2 :, 1] = 1
    weights = {"layers.0": per_channel, "layers.1": torch.tensor([0.0, 1.0]), "layers.2": torch.tensor([1.0, 3.0])}
    goal = goal_statistics(stats, weights)
    torch.testing.assert_close(goal["layers.0"].mean[: n // 2], stats[0]["layers.0"].mean[: n // 2])
    torch.testing.assert_close(goal["layers.0"].var[n // 2 :], stats[1]["layers.0"].var[n // 2 :])
    torch.testing.assert_close(goal["layers.1"].mean, stats[1]["layers.1"].mean)
    torch.testing.assert_close(goal["layers.2"].var, 0.25 * stats[0]["layers.2"].var + 0.75 * stats[1]["layers.2"].var)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"layers.0": torch.ones(2)}, "no weights for stat point 'layers.1'"),
        (torch.tensor([1.0, -1.0]), "non-negative"),
        (torch.zeros(2), "all zero"),
        (torch.ones(3), r"expected \[2\]"),
    ],
)
def test_goal_statistics_rejects_bad_weights(weights, message):
    stats = [channel_stats(tiny_model("mlp", seed), calibration(), batch_size=32) for seed in range(2)]
    with pytest.raises((KeyError, ValueError), match=message):
        goal_statistics(stats, weights)


def test_stat_point_weights_follow_the_parts():
    model = tiny_model("resnet20-ln")
    parts = model.layer_parts()
    part_weights = {part: torch.tensor([float(i), 1.0]) for i, part in enumerate(parts)}
    index = {part: i for i, part in enumerate(parts)}
    w = stat_point_weights(part_weights, parts, model.stat_points())
    assert list(w) == list(model.stat_points())
    assert w["norm1"][0] == index["conv1"]
    assert w["stages.0.0.norm1"][0] == index["stages.0.0.conv1"]
    assert w["stages.0.0.norm2"][0] == index["stages.0.0.conv2"]
    assert w["stages.1.0.shortcut.1"][0] == index["stages.1.0.shortcut"]
    # A residual sum mixes like its two summands.
    assert w["stages.0.1.residual"][0] == (index["stages.0.1.conv2"] + index["stages.0.1.shortcut"]) / 2
    with pytest.raises(KeyError, match="no weights for part 'conv1'"):
        stat_point_weights({k: v for k, v in part_weights.items() if k != "conv1"}, parts, model.stat_points())


def test_reset_batchnorm_recomputes_running_stats():
    model = tiny_model("resnet20-bn")
    x = calibration()
    sd = model.state_dict()
    fresh = reset_batchnorm(model, sd, x, batch_size=len(x))
    for k in sd:  # only the running statistics move
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(fresh[k], sd[k]), k
    # Reference: each BN's input in train mode on the whole set in one batch (BN then uses batch stats).
    inputs: dict[str, torch.Tensor] = {}
    reference = copy.deepcopy(model).train()
    for path, m in reference.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(
                lambda _m, i, path=path: inputs.__setitem__(path, i[0].transpose(0, 1).flatten(1))
            )
    with torch.no_grad():
        reference(x)
    assert len(inputs) == 1 + 9 * 2 + 2  # stem, two per block, two projection shortcuts
    for path, a in inputs.items():
        torch.testing.assert_close(fresh[f"{path}.running_mean"], a.mean(dim=1), rtol=0, atol=1e-5)
        torch.testing.assert_close(fresh[f"{path}.running_var"], a.var(dim=1), rtol=1e-4, atol=1e-6)
        assert not torch.allclose(fresh[f"{path}.running_var"], sd[f"{path}.running_var"])
    # Equal batches: a cumulative average of the batch means is the mean over all of x.
    batched = reset_batchnorm(model, sd, x, batch_size=8)
    torch.testing.assert_close(batched["norm1.running_mean"], fresh["norm1.running_mean"], rtol=0, atol=1e-5)


def test_apply_repair_dispatch_and_errors():
    model = tiny_model("mlp")
    x = calibration()
    sd = model.state_dict()
    copied = apply_repair("none", model, sd, x, batch_size=8)
    assert all(torch.equal(copied[k], sd[k]) for k in sd) and all(copied[k] is not sd[k] for k in sd)
    with pytest.raises(ValueError, match="needs BatchNorm layers"):
        apply_repair("reset_bn", model, sd, x, batch_size=8)
    with pytest.raises(ValueError, match="endpoint_stats"):
        apply_repair("repair", model, sd, x, batch_size=8)
    with pytest.raises(ValueError, match="known: repair, reset_bn, none"):
        apply_repair("rescale", model, sd, x, batch_size=8)
    stats = [channel_stats(model, x, batch_size=8)]
    via_dispatch = apply_repair("repair", model, sd, x, batch_size=8, endpoint_stats=stats)
    direct = repair(model, sd, goal_statistics(stats), x, batch_size=8)
    assert all(torch.equal(via_dispatch[k], direct[k]) for k in sd)
    with pytest.raises(KeyError, match="not stat points"):
        repair(model, sd, {"layers.9": stats[0]["layers.0"]}, x, batch_size=8)


# --- End to end: a small trained MLP on a deterministic teacher task ---------------------------------

DIM, CLASSES, HIDDEN = 32, 10, [64, 64, 64]


@pytest.fixture(scope="module")
def task():
    g = torch.Generator().manual_seed(0)
    teacher = MLP(DIM, [64], CLASSES)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0.0, 1.0, generator=g)

    def draw(n: int, seed: int):
        x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return x, teacher(x).argmax(dim=1)

    (x_train, y_train), (x_test, y_test) = draw(4000, 1), draw(2000, 2)

    def train(seed: int) -> MLP:
        torch.manual_seed(seed)
        model = MLP(DIM, HIDDEN, CLASSES)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        order = torch.Generator().manual_seed(seed)
        for _ in range(400):
            i = torch.randint(0, len(x_train), (128,), generator=order)
            loss = F.cross_entropy(model(x_train[i]), y_train[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()

    def accuracy(state_dict) -> float:
        model = MLP(DIM, HIDDEN, CLASSES)
        model.load_state_dict(state_dict)
        with torch.no_grad():
            return (model.eval()(x_test).argmax(dim=1) == y_test).float().mean().item()

    return train(1), train(2), accuracy, x_train[:2000]


def test_repair_helps_merge_two_independently_trained_mlps(task):
    a, b, accuracy, x_cal = task
    spec, points = a.perm_spec(), a.stat_points()
    # Universe = a's basis; b's units matched by activation correlation (REPAIR paper's matching).
    corr = cross_correlations([a, b], x_cal, batch_size=1000)
    to_universe = {
        g: torch.as_tensor(linear_sum_assignment(c[0, 1].numpy(), maximize=True)[1]) for g, c in corr.items()
    }
    b_universe = apply_perms(b.state_dict(), spec, to_universe)
    merged = average([a.state_dict(), b_universe])
    stats = [
        channel_stats(a, x_cal, batch_size=500),
        permute_stats(channel_stats(b, x_cal, batch_size=500), to_universe, points),
    ]
    repaired = repair(a, merged, goal_statistics(stats), x_cal, batch_size=500)
    endpoints = (accuracy(a.state_dict()) + accuracy(b.state_dict())) / 2
    naive, plain, fixed = accuracy(average([a.state_dict(), b.state_dict()])), accuracy(merged), accuracy(repaired)
    assert endpoints > 0.6 and plain > naive + 0.1, (endpoints, plain, naive)
    assert plain < fixed <= endpoints + 0.01, (fixed, plain, endpoints)


def test_repair_of_planted_permuted_noisy_copies_does_not_lose_accuracy(task):
    base, _, accuracy, x_cal = task
    spec, points = base.perm_spec(), base.stat_points()
    noise = torch.Generator().manual_seed(5)

    def noisy(sd):
        return {k: v + 0.6 * v.std() * torch.randn(v.shape, generator=noise) for k, v in sd.items()}

    a = noisy(base.state_dict())
    planted = random_perms(spec, a, torch.Generator().manual_seed(7))
    b = apply_perms(noisy(base.state_dict()), spec, planted)
    to_universe = invert(planted)
    merged = average([a, apply_perms(b, spec, to_universe)])

    def stats_of(sd):
        model = MLP(DIM, HIDDEN, CLASSES)
        model.load_state_dict(sd)
        return channel_stats(model, x_cal, batch_size=500)

    stats = [stats_of(a), permute_stats(stats_of(b), to_universe, points)]
    repaired = repair(base, merged, goal_statistics(stats), x_cal, batch_size=500)
    plain, fixed = accuracy(merged), accuracy(repaired)
    assert plain > accuracy(average([a, b])) + 0.1, "planted perms must matter"
    assert fixed >= plain - 0.005, (fixed, plain)

import copy
import math

import pytest
import torch
from torch import nn

from cyclemerge.evaluate import (
    ENDPOINT_MEAN,
    accuracy_and_loss,
    barriers,
    cosine_similarity,
    cycle_experiment,
    cycle_permutation,
    ensemble_accuracy_and_loss,
    ensemble_of_state_dicts,
    evaluate_state_dicts,
    interpolation_curve,
    lambda_grid,
    load_into,
    mean_pairwise_cosine,
    method_table,
    relative_distance,
)
from cyclemerge.permutation import apply_perms, compose, invert, is_identity, pairwise_map, random_perms


class TinyNet(nn.Module):
    """4 -> 6 (BatchNorm) -> 5 -> 3: small, with BN buffers to exercise load_into."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.l2 = nn.Linear(6, 5)
        self.l3 = nn.Linear(5, 3)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.bn(self.l1(x))))))

    @staticmethod
    def perm_spec():
        spec = {"l1.weight": ("h0", None), "l1.bias": ("h0",), "bn.num_batches_tracked": ()}
        spec |= {f"bn.{k}": ("h0",) for k in ("weight", "bias", "running_mean", "running_var")}
        spec |= {"l2.weight": ("h1", "h0"), "l2.bias": ("h1",), "l3.weight": (None, "h1"), "l3.bias": (None,)}
        return spec


def make_net(seed: int) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.normal_()
        net.bn.bias.normal_()
    return net


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 4, generator=g)
    y = torch.randint(0, 3, (37,), generator=g)
    return x, y


def test_accuracy_and_loss_exact_on_hand_built_linear_model():
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        model.bias.zero_()
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 2, 0])  # the last one is predicted as class 1: wrong
    logits = [[2, 0, 0], [0, 1, 0], [-1, -1, 0], [0, 3, 0]]
    expected_loss = sum(math.log(sum(math.exp(v) for v in z)) - z[k] for z, k in zip(logits, y.tolist())) / 4
    model.train()
    out = accuracy_and_loss(model, x, y, batch_size=3)
    assert out["acc"] == 0.75
    assert out["loss"] == pytest.approx(expected_loss, abs=1e-6)
    assert model.training, "the caller's train/eval mode is restored"


def test_accuracy_independent_of_batch_size_and_does_not_touch_bn_stats(data):
    x, y = data
    net = make_net(1)
    before = copy.deepcopy(net.state_dict())
    net.train()
    one = accuracy_and_loss(net, x, y, batch_size=1)
    many = accuracy_and_loss(net, x, y, batch_size=1000)
    assert one["acc"] == many["acc"]
    assert one["loss"] == pytest.approx(many["loss"], abs=1e-6)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed during evaluation"


def test_mismatched_data_is_rejected(data):
    x, y = data
    with pytest.raises(ValueError, match="37 inputs but 36 labels"):
        accuracy_and_loss(make_net(0), x, y[:-1], batch_size=8)


def test_ensemble_of_identical_models_equals_the_model(data):
    x, y = data
    net = make_net(2)
    single = accuracy_and_loss(net, x, y, batch_size=8)
    ens = ensemble_accuracy_and_loss([net, copy.deepcopy(net), copy.deepcopy(net)], x, y, batch_size=8)
    assert ens["acc"] == single["acc"]
    assert ens["loss"] == pytest.approx(single["loss"], abs=1e-9)
    via_sd = ensemble_of_state_dicts(make_net(9), [net.state_dict()] * 2, x, y, batch_size=8)
    assert via_sd["loss"] == pytest.approx(single["loss"], abs=1e-9)


def test_ensemble_averages_probabilities_not_losses():
    # Constant predictors: zero weights, bias = log of a chosen distribution.
    p1, p2 = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.3, 0.6])
    models = []
    for p in (p1, p2):
        m = nn.Linear(2, 3)
        with torch.no_grad():
            m.weight.zero_()
            m.bias.copy_(p.log())
        models.append(m)
    x, y = torch.zeros(2, 2), torch.tensor([0, 2])
    out = ensemble_accuracy_and_loss(models, x, y, batch_size=1)
    mean = (p1 + p2) / 2  # [0.4, 0.25, 0.35]: predicts class 0 for both rows
    assert out["acc"] == 0.5
    assert out["loss"] == pytest.approx(-(math.log(mean[0]) + math.log(mean[2])) / 2, abs=1e-6)


def test_load_into_overwrites_every_buffer_and_copies(data):
    x, _ = data
    a, b = make_net(3), make_net(4)
    holder = make_net(5)
    load_into(holder, a.state_dict())
    sd_b = {k: v.clone() for k, v in b.state_dict().items()}
    load_into(holder, sd_b)
    holder.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(holder(x), b(x))
        sd_b["bn.running_mean"].add_(100.0)  # editing the dict afterwards must not reach the module
        assert torch.equal(holder(x), b(x))


def test_load_into_names_missing_keys():
    sd = make_net(0).state_dict()
    del sd["bn.running_var"]
    with pytest.raises(KeyError, match="bn.running_var"):
        load_into(make_net(1), sd)


def test_evaluate_state_dicts_matches_single_evaluations(data):
    x, y = data
    nets = {"a": make_net(1), "b": make_net(2)}
    out = evaluate_state_dicts(make_net(0), {k: n.state_dict() for k, n in nets.items()}, {"test": (x, y)}, batch_size=16)
    for name, net in nets.items():
        assert out[name]["test"] == accuracy_and_loss(net, x, y, batch_size=16)


def test_interpolation_endpoints_equal_endpoint_evaluations(data):
    x, y = data
    a, b = make_net(1), make_net(2)
    curve = interpolation_curve(make_net(0), a.state_dict(), b.state_dict(), x, y, steps=5, batch_size=16)
    assert curve["lambdas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(curve["acc"]) == len(curve["loss"]) == 5
    end_a, end_b = accuracy_and_loss(a, x, y, batch_size=16), accuracy_and_loss(b, x, y, batch_size=16)
    assert (curve["acc"][0], curve["loss"][0]) == (end_a["acc"], end_a["loss"])
    assert (curve["acc"][-1], curve["loss"][-1]) == (end_b["acc"], end_b["loss"])


def test_interpolation_between_identical_models_has_no_barrier(data):
    x, y = data
    sd = make_net(1).state_dict()
    curve = interpolation_curve(make_net(0), sd, sd, x, y, steps=7, batch_size=16)
    assert len(set(curve["loss"])) == 1
    for key in ("barrier", "barrier_endpoint_mean", "acc_barrier"):
        assert abs(curve[key]) < 1e-12, key


def test_interpolation_applies_prepare_at_every_point(data):
    x, y = data
    seen = []

    def prepare(sd):
        seen.append(float(sd["l3.bias"][0]))
        return sd

    a, b = make_net(1).state_dict(), make_net(2).state_dict()
    interpolation_curve(make_net(0), a, b, x, y, steps=3, batch_size=16, prepare=prepare)
    mid = 0.5 * (float(a["l3.bias"][0]) + float(b["l3.bias"][0]))
    assert seen == pytest.approx([float(a["l3.bias"][0]), mid, float(b["l3.bias"][0])], abs=1e-6)


def test_barrier_definitions_on_known_losses():
    # Unequal endpoints: the chord barrier and the endpoint-mean barrier differ.
    out = barriers([0.0, 0.5, 1.0], acc=[0.9, 0.5, 0.7], loss=[1.0, 1.2, 3.0])
    assert out["barrier"] == pytest.approx(0.0)
    assert out["barrier_endpoint_mean"] == pytest.approx(1.0)
    assert out["acc_barrier"] == pytest.approx(0.3)
    out = barriers([0.0, 0.5, 1.0], acc=[1.0, 1.0, 1.0], loss=[1.0, 3.0, 2.0])
    assert out["barrier"] == pytest.approx(1.5)
    assert out["barrier_endpoint_mean"] == pytest.approx(1.5)


def test_lambda_grid_needs_both_endpoints():
    assert lambda_grid(2) == [0.0, 1.0]
    with pytest.raises(ValueError, match="steps must be >= 2"):
        lambda_grid(1)


def _universe_maps(sd, spec, seed):
    g = torch.Generator().manual_seed(seed)
    perms = [random_perms(spec, sd, g) for _ in range(3)]
    return pairwise_map(perms[0], perms[1]), pairwise_map(perms[1], perms[2]), pairwise_map(perms[2], perms[0])


def test_cycle_consistent_maps_bring_a_back_exactly(data):
    x, y = data
    net, spec = make_net(1), TinyNet.perm_spec()
    sd = net.state_dict()
    ab, bc, ca = _universe_maps(sd, spec, seed=0)
    assert is_identity(cycle_permutation(ab, bc, ca))
    res = cycle_experiment(make_net(0), sd, spec, ab, bc, ca, x, y, steps=5, batch_size=16)
    assert res["distance"] == 0.0
    assert res["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert res["fixed_fraction"] == {"h0": 1.0, "h1": 1.0}
    assert res["fixed_fraction_mean"] == 1.0 and res["consistent"]
    assert len(set(res["curve"]["acc"])) == 1 and len(set(res["curve"]["loss"])) == 1
    assert res["curve"]["barrier"] == pytest.approx(0.0, abs=1e-12)


def test_cycle_direction_matches_pairwise_matching_semantics():
    # B and C are relabelled copies of A; m_{x<-y} is the exact map with apply(sd_y, m) == sd_x,
    # which is what matching y to x returns. Composing them in the wrong order would not give the identity.
    spec, sd_a = TinyNet.perm_spec(), make_net(1).state_dict()
    g = torch.Generator().manual_seed(3)
    qb, qc = random_perms(spec, sd_a, g), random_perms(spec, sd_a, g)
    sd_b, sd_c = apply_perms(sd_a, spec, qb), apply_perms(sd_a, spec, qc)
    m_ab, m_bc, m_ca = invert(qb), compose(invert(qc), qb), qc
    for target, source, m in ((sd_a, sd_b, m_ab), (sd_b, sd_c, m_bc), (sd_c, sd_a, m_ca)):
        assert all(torch.equal(v, target[k]) for k, v in apply_perms(source, spec, m).items())
    assert is_identity(cycle_permutation(m_ab, m_bc, m_ca))
    assert not is_identity(compose(compose(m_ab, m_bc), m_ca))


def test_inconsistent_maps_move_a_but_keep_its_function(data):
    x, y = data
    net, spec = make_net(1), TinyNet.perm_spec()
    sd = net.state_dict()
    g = torch.Generator().manual_seed(7)
    ab, bc, ca = (random_perms(spec, sd, g) for _ in range(3))
    res = cycle_experiment(make_net(0), sd, spec, ab, bc, ca, x, y, steps=5, batch_size=16)
    assert res["distance"] > 0.1
    assert res["cosine"] < 1.0
    assert res["fixed_fraction_mean"] < 1.0 and not res["consistent"]
    curve = res["curve"]
    assert curve["acc"][0] == curve["acc"][-1]
    assert curve["loss"][-1] == pytest.approx(curve["loss"][0], abs=1e-5)
    assert res["path_max_loss"] == max(curve["loss"])


def test_cycle_rejects_maps_over_different_groups():
    p = {"h0": torch.arange(3)}
    with pytest.raises(ValueError, match="same groups"):
        cycle_permutation(p, p, {"h1": torch.arange(3)})


def test_distance_and_cosine():
    sd = make_net(1).state_dict()
    double = {k: (2 * v if torch.is_floating_point(v) else v) for k, v in sd.items()}
    assert relative_distance(sd, sd) == 0.0
    assert relative_distance(sd, double) == pytest.approx(1.0)
    assert cosine_similarity(sd, double) == pytest.approx(1.0)
    neg = {k: (-v if torch.is_floating_point(v) else v) for k, v in sd.items()}
    assert mean_pairwise_cosine([sd, sd, neg]) == pytest.approx((1 - 1 - 1) / 3)


def test_method_table_rows_and_endpoint_mean():
    results = {
        "endpoint_0": {"test": {"acc": 0.9, "loss": 0.3}, "train": {"acc": 0.95, "loss": 0.2}},
        "endpoint_1": {"test": {"acc": 0.8, "loss": 0.5}, "train": {"acc": 0.85, "loss": 0.4}},
        "naive": {"test": {"acc": 0.1, "loss": 2.3}},
        "c2m3": {"test": {"acc": 0.7, "loss": 0.9}, "train": {"acc": 0.75, "loss": 0.8}},
    }
    rows = method_table(results, endpoints=["endpoint_0", "endpoint_1"])
    assert [r["method"] for r in rows] == ["endpoint_0", "endpoint_1", ENDPOINT_MEAN, "naive", "c2m3"]
    assert [r["kind"] for r in rows] == ["endpoint", "endpoint", "reference", "method", "method"]
    assert rows[2]["test_acc"] == pytest.approx(0.85) and rows[2]["train_loss"] == pytest.approx(0.3)
    assert rows[3]["train_acc"] is None and rows[3]["test_loss"] == 2.3
    with pytest.raises(KeyError, match="endpoint_9"):
        method_table(results, endpoints=["endpoint_9"])


def test_evaluating_with_the_module_that_owns_the_state_dict_is_safe(data):
    # model.state_dict() aliases the live parameters; loading other weights must not rewrite it.
    x, y = data
    net, spec = make_net(1), TinyNet.perm_spec()
    sd = net.state_dict()
    original = {k: v.clone() for k, v in sd.items()}
    g = torch.Generator().manual_seed(7)
    ab, bc, ca = (random_perms(spec, sd, g) for _ in range(3))
    res = cycle_experiment(net, sd, spec, ab, bc, ca, x, y, steps=3, batch_size=16)
    assert res["distance"] > 0.1
    assert all(torch.equal(sd[k], original[k]) for k in sd)
    other = make_net(2).state_dict()
    out = evaluate_state_dicts(net, {"other": other, "self": net.state_dict()}, {"t": (x, y)}, batch_size=16)
    assert out["self"]["t"] == accuracy_and_loss(load_into(make_net(0), original), x, y, batch_size=16)

"""Hard-concrete gates: the distribution, the gated merge, gate learning, and what REPAIR reads.

Numbered comments refer to the test list of soft-gates-reference.md §7.
"""

from __future__ import annotations

import copy
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from cyclemerge.averaging import average
from cyclemerge.config import GRANULARITIES, DataConfig, GatesConfig, SyntheticConfig
from cyclemerge.data import load_data
from cyclemerge.gates.distribution import (
    HardConcrete,
    combine,
    final_weights,
    gated_tensors,
    make_plan,
    merge_with_weights,
)
from cyclemerge.gates.learning import (
    GateResult,
    constant_keys,
    learn_gates,
    penalty_row_weights,
    split_rows,
    temperature_at,
    uniform_result,
)
from cyclemerge.gates.report import gate_table, layer_weights, stat_point_weights, weights_for_stat_point
from cyclemerge.models import MLP, ResNet20
from cyclemerge.prefilter import screen_models

LN11 = math.log(11.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------
# tiny models


def mlp_models(n: int = 3, seed: int = 0):
    template = MLP(12, [10, 8], 4)
    sds = []
    for k in range(n):
        torch.manual_seed(seed + k)
        sds.append({key: v.detach().clone() for key, v in MLP(12, [10, 8], 4).state_dict().items()})
    return template, sds


def resnet_bn_models(n: int = 3):
    """BatchNorm ResNet20s with distinct running statistics (identity shortcuts stay identical)."""
    template = ResNet20(1, 4, norm="batchnorm")
    sds = []
    for k in range(n):
        torch.manual_seed(100 + k)
        sd = {key: v.detach().clone() for key, v in ResNet20(1, 4, norm="batchnorm").state_dict().items()}
        for key, v in sd.items():
            if key.endswith("running_mean"):
                v.normal_()
            elif key.endswith("running_var"):
                v.uniform_(0.5, 2.0)
            elif key.endswith("num_batches_tracked"):
                v.fill_(7)
            elif ".norm" in key or key.startswith("norm1"):
                v.add_(0.1 * torch.randn_like(v))
        sds.append(sd)
    return template, sds


MODEL_KINDS = {"mlp": mlp_models, "resnet_bn": resnet_bn_models}


def inputs_for(template, n: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(template, MLP):
        return torch.randn(n, 12, generator=g)
    return torch.randn(n, 1, 8, 8, generator=g)


def logits(template, sd, x):
    model = copy.deepcopy(template)
    model.load_state_dict(sd)
    model.eval()
    with torch.no_grad():
        return model(x)


def plan_for(template, sds, cfg, **kw):
    return make_plan(sds, template.layer_parts(), cfg, spec=template.perm_spec(), **kw)


def sd_hash(sd) -> str:
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# 1-4: the hard concrete itself

HC = HardConcrete()
LOG_ALPHAS = [-3.0, -1.0, 0.0, 1.0, 3.0]
P_NONZERO = [0.1976, 0.6453, 0.8318, 0.9308, 0.9900]
P_ONE = [0.0100, 0.0692, 0.1682, 0.3547, 0.8024]


def test_closed_forms_match_reference_values_and_monte_carlo():  # 1
    la = torch.tensor(LOG_ALPHAS, dtype=torch.float64)
    assert torch.allclose(HC.prob_nonzero(la), torch.tensor(P_NONZERO, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(HC.prob_one(la), torch.tensor(P_ONE, dtype=torch.float64), atol=1e-4)
    draws = HC.sample(la.expand(100_000, -1), torch.Generator().manual_seed(0))
    assert torch.allclose((draws != 0).double().mean(0), HC.prob_nonzero(la), atol=0.006)
    assert torch.allclose((draws == 1).double().mean(0), HC.prob_one(la), atol=0.006)


def test_samples_lie_in_unit_interval_with_point_masses_at_both_ends():  # 2
    g = torch.Generator().manual_seed(1)
    z = HC.sample(torch.zeros(100_000), g)
    assert z.min() >= 0 and z.max() <= 1
    assert abs((z == 0).double().mean().item() - 0.1682) < 0.006
    assert abs((z == 1).double().mean().item() - 0.1682) < 0.006
    for a in (0.5, 2.0):
        p_zero = 1 - HC.prob_nonzero(torch.tensor(a))
        assert torch.isclose(p_zero, HC.prob_one(torch.tensor(-a)), atol=1e-6)
        mc_zero = (HC.sample(torch.full((100_000,), a), g) == 0).double().mean()
        mc_one = (HC.sample(torch.full((100_000,), -a), g) == 1).double().mean()
        assert abs(mc_zero - mc_one) < 0.006


def test_deterministic_gate_values():  # 3
    zhat = HC.deterministic(torch.tensor([0.0, -LN11, -LN11 - 0.5, -20.0, LN11, LN11 + 0.5, 20.0, 1.0]))
    assert zhat[0] == 0.5
    assert torch.all(zhat[1:4] == 0)
    assert torch.all(zhat[4:7] == 1)
    assert abs(zhat[7].item() - 0.7773) < 1e-4  # not E[z] = 0.707 at log_alpha = 1


def test_penalty_gradient_is_p_one_minus_p_and_matches_finite_differences():  # 4
    la = torch.tensor(LOG_ALPHAS, dtype=torch.float64, requires_grad=True)
    p = HC.prob_nonzero(la)
    p.sum().backward()
    assert torch.allclose(la.grad, (p * (1 - p)).detach(), atol=1e-12)
    h = 1e-6
    fd = (HC.prob_nonzero(la.detach() + h) - HC.prob_nonzero(la.detach() - h)) / (2 * h)
    assert torch.allclose(la.grad, fd, atol=1e-8)


def test_constants_come_from_the_config():
    cfg = GatesConfig(beta=0.5, gamma=-0.2, zeta=1.2)
    hc = HardConcrete.from_config(cfg)
    assert (hc.beta, hc.gamma, hc.zeta) == (0.5, -0.2, 1.2)
    assert torch.isclose(hc.prob_nonzero(torch.tensor(0.0)), torch.sigmoid(torch.tensor(-0.5 * math.log(0.2 / 1.2))))


# ---------------------------------------------------------------------------------------------
# 5-7, 10: the gated merge


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_one_hot_gates_return_that_model_bit_for_bit(kind, granularity):  # 5
    template, sds = MODEL_KINDS[kind]()
    x = inputs_for(template)
    cfg = GatesConfig(granularity=granularity)
    plan = plan_for(template, sds, cfg)
    for k in range(len(sds)):
        la = torch.full((plan.num_rows, len(sds)), -10.0)
        la[:, k] = 10.0
        one_hot = F.one_hot(torch.full((plan.num_rows,), k), len(sds)).double()
        for mode in ("deterministic", "threshold", "argmax"):
            assert torch.equal(final_weights(la, cfg.model_copy(update={"final_gates": mode})), one_hot)
        merged = merge_with_weights(plan, sds, one_hot)
        assert list(merged) == list(sds[k])
        for key in sds[k]:
            assert torch.equal(merged[key], sds[k][key]), key
        assert torch.allclose(logits(template, merged, x), logits(template, sds[k], x), atol=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_equal_gates_give_the_plain_average(granularity):  # 6
    template, sds = resnet_bn_models()
    cfg = GatesConfig(granularity=granularity)
    plan = plan_for(template, sds, cfg)
    merged = merge_with_weights(plan, sds, final_weights(torch.full((plan.num_rows, 3), 0.7), cfg))
    plain = average(sds)
    for key in plain:
        assert torch.allclose(merged[key], plain[key], atol=1e-6, rtol=0), key
    assert torch.equal(merged["stages.0.0.norm1.num_batches_tracked"], sds[0]["stages.0.0.norm1.num_batches_tracked"])


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_copies_of_one_model_merge_to_that_model_for_any_gates(granularity):  # 7
    template, sds = mlp_models(1)
    copies = [sds[0]] * 4
    cfg = GatesConfig(granularity=granularity)
    plan = plan_for(template, copies, cfg)
    g = torch.Generator().manual_seed(3)
    la = 3 * torch.randn(plan.num_rows, 4, generator=g)
    merged = merge_with_weights(plan, copies, final_weights(la, cfg))
    stacked = {k: torch.stack([sd[k] for sd in copies]) for k in plan.key_part}
    w = combine(HC.sample(la, g), la, normalize=True, fallback="uniform")
    trained_path = gated_tensors(plan, stacked, w)
    for key, value in sds[0].items():
        assert torch.allclose(merged[key], value, rtol=1e-6, atol=1e-7), key
        if key in trained_path:
            assert torch.allclose(trained_path[key], value, rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_training_merge_equals_static_merge_for_the_same_weights(granularity):
    template, sds = resnet_bn_models()
    plan = plan_for(template, sds, GatesConfig(granularity=granularity))
    w = torch.rand(plan.num_rows, 3, generator=torch.Generator().manual_seed(4))
    stacked = {k: torch.stack([sd[k] for sd in sds]) for k in plan.key_part}
    trained_path = gated_tensors(plan, stacked, w)
    static = merge_with_weights(plan, sds, w)
    for key, value in trained_path.items():
        assert torch.allclose(value, static[key], rtol=1e-5, atol=1e-5), key


def test_channel_gates_select_per_output_channel_including_norm_and_buffers():
    template, sds = resnet_bn_models()
    cfg = GatesConfig(granularity="channel")
    plan = plan_for(template, sds, cfg)
    assert plan.rows["stages.0.0.conv1"].stop - plan.rows["stages.0.0.conv1"].start == 16
    assert plan.rows["stages.1.0.shortcut"].stop - plan.rows["stages.1.0.shortcut"].start == 32
    assert plan.rows["linear"].stop - plan.rows["linear"].start == 4  # classifier: its output (class) axis
    la = torch.full((plan.num_rows, 3), -10.0)
    chosen = torch.arange(plan.num_rows) % 3
    la[torch.arange(plan.num_rows), chosen] = 10.0
    merged = merge_with_weights(plan, sds, final_weights(la, cfg))
    for part, keys in plan.parts.items():
        for c in range(plan.rows[part].stop - plan.rows[part].start):
            k = int(chosen[plan.rows[part].start + c])
            for key in keys:
                assert torch.equal(merged[key][c], sds[k][key][c]), (key, c)


def test_all_off_fallback_is_uniform_or_argmax_and_stays_finite():  # 10
    la = torch.tensor([[0.3, 2.0, -1.0], [1.0, 1.0, 1.0]], requires_grad=True)
    for fallback, expected in (("uniform", torch.full((2, 3), 1 / 3)), ("argmax", torch.tensor([[0.0, 1, 0], [1, 0, 0]]))):
        z = la * 0  # every gate exactly off, still on the graph
        w = combine(z, la, normalize=True, fallback=fallback)
        assert torch.allclose(w, expected)
        w.sum().backward()
        assert torch.isfinite(la.grad).all()
        la.grad = None
    assert torch.equal(combine(la * 0, la, normalize=False, fallback="uniform"), la * 0)
    # read-out: a row with every gate closed keeps the largest log_alpha (ties share uniformly)
    closed = torch.tensor([[-9.0, -5.0, -7.0], [-6.0, -6.0, -6.0]])
    w = final_weights(closed, GatesConfig())
    assert torch.equal(w, torch.tensor([[0.0, 1, 0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64))
    template, sds = mlp_models()
    plan = plan_for(template, sds, GatesConfig())
    merged = merge_with_weights(plan, sds, final_weights(torch.full((plan.num_rows, 3), -9.0), GatesConfig()))
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_readout_modes_and_unnormalised_gates():
    la = torch.tensor([[3.0, 0.0, -3.0]])
    zhat = HC.deterministic(la.double())
    assert torch.allclose(final_weights(la, GatesConfig()), zhat / zhat.sum())
    assert torch.allclose(final_weights(la, GatesConfig(normalize=False)), zhat)
    assert torch.equal(final_weights(la, GatesConfig(final_gates="threshold")), torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    assert torch.equal(final_weights(la, GatesConfig(final_gates="argmax")), torch.tensor([[1.0, 0, 0]], dtype=torch.float64))


def test_plan_errors_name_the_problem():
    template, sds = mlp_models()
    with pytest.raises(ValueError, match="matches no layer.*layers.0"):
        plan_for(template, sds, GatesConfig(gated_parts=["conv*"]))
    with pytest.raises(ValueError, match="out of range"):
        plan_for(template, sds, GatesConfig(gated_parts=["layers.0"], ungated_rule="model:5"))
    with pytest.raises(ValueError, match="exactly once"):
        make_plan(sds, {"a": ["layers.0.weight"]}, GatesConfig())
    bad = dict(sds[1])
    bad["layers.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="differs in shape"):
        plan_for(template, [sds[0], bad], GatesConfig())


# ---------------------------------------------------------------------------------------------
# 8, 9, 11, 12: gate learning


def random_batch(template, n=64, seed=5):
    x = inputs_for(template, n, seed)
    y = torch.arange(n) % 4
    return x, y


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_sources_and_template_stay_frozen_and_only_log_alpha_is_optimised(kind, monkeypatch):  # 8
    template, sds = MODEL_KINDS[kind]()
    before = [sd_hash(sd) for sd in sds]
    template_before = sd_hash(template.state_dict())
    template.train()
    seen = []
    real_adam = torch.optim.Adam

    class SpyAdam(real_adam):
        def __init__(self, params, **kw):
            params = list(params)
            seen.append(params)
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    x, y = random_batch(template)
    result = learn_gates(template, sds, x, y, GatesConfig(steps=3, batch_size=32))
    assert [sd_hash(sd) for sd in sds] == before
    assert sd_hash(template.state_dict()) == template_before
    assert all(m.training for m in template.modules())  # modes restored
    assert len(seen) == 1 and len(seen[0]) == 1
    assert seen[0][0].shape == (result.plan.num_rows, len(sds))
    assert not any(t.requires_grad for t in result.merged.values())


@pytest.mark.parametrize("rule", ["average", "model:2"])
def test_ungated_parts_follow_the_rule_exactly(rule):  # 9
    template, sds = mlp_models()
    x, y = random_batch(template)
    cfg = GatesConfig(gated_parts=["layers.1"], ungated_rule=rule, steps=5, batch_size=32)
    result = learn_gates(template, sds, x, y, cfg)
    assert list(result.plan.parts) == ["layers.1"]
    expected = average(sds) if rule == "average" else sds[2]
    for key in ("layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"):
        assert torch.equal(result.merged[key], expected[key]), key
    table = gate_table(result)
    assert {(r["part"], r["gated"]) for r in table} == {("layers.1", True), ("layers.0", False), ("layers.2", False)}


def test_tensor_granularity_can_gate_single_keys():
    template, sds = mlp_models()
    plan = plan_for(template, sds, GatesConfig(granularity="tensor", gated_parts=["layers.0.bias", "layers.2"]))
    assert list(plan.parts) == ["layers.0.bias", "layers.2.weight", "layers.2.bias"]
    plan = plan_for(template, sds, GatesConfig(granularity="model", gated_parts=["layers.0", "layers.1"]))
    assert list(plan.parts) == ["model"] and plan.num_rows == 1
    assert plan.ungated == ["layers.2.weight", "layers.2.bias"]


def test_lambda_shrinks_the_expected_number_of_active_models(trained):  # 11
    template, honest = trained["template"], trained["honest"]
    x, y = trained["calib"]
    active = []
    for lam in (0.0, 1e-3, 1e-2, 1e-1, 1.0):
        result = learn_gates(template, honest, x, y, GatesConfig(lam=lam, steps=60, batch_size=128, lr=0.05))
        per_part = [HC.prob_nonzero(la.double()).sum(-1).mean().item() for la in result.log_alpha.values()]
        active.append(sum(per_part) / len(per_part))
    assert all(b <= a + 0.02 for a, b in zip(active, active[1:])), active
    assert active[-1] < active[0] - 0.5, active


def test_same_seed_same_gates_other_seed_other_gates():  # 12
    template, sds = mlp_models()
    x, y = random_batch(template)
    cfg = GatesConfig(steps=20, batch_size=16, mc_samples=2)
    a, b = (learn_gates(template, sds, x, y, cfg) for _ in range(2))
    assert all(torch.equal(a.log_alpha[p], b.log_alpha[p]) for p in a.log_alpha)
    assert a.history == b.history
    c = learn_gates(template, sds, x, y, cfg.model_copy(update={"seed": 1}))
    assert any(not torch.equal(a.log_alpha[p], c.log_alpha[p]) for p in a.log_alpha)


def test_non_finite_steps_are_skipped_and_an_off_nan_model_never_reaches_the_merge():
    template, sds = mlp_models()
    sds[2] = {k: v.clone() for k, v in sds[2].items()}
    sds[2]["layers.1.weight"][0, 0] = float("nan")
    x, y = random_batch(template)
    cfg = GatesConfig(steps=6, batch_size=32)
    result = learn_gates(template, sds, x, y, cfg, initial_off=[2])
    # 0 x NaN is NaN, so every step that merges the NaN model is skipped, not applied
    assert result.skipped_steps == 6 and not math.isfinite(result.history["loss"][0])
    assert all(torch.equal(la[2], torch.tensor(-cfg.init_off)) for la in result.log_alpha.values())
    assert all(float(w[2]) == 0 for w in result.weights.values())
    assert all(torch.isfinite(v).all() for v in result.merged.values())


def test_initial_off_models_start_closed_and_leave_the_ungated_average():
    template, sds = mlp_models()
    x, y = random_batch(template)
    cfg = GatesConfig(steps=1, gated_parts=["layers.0"], init_off=6.0)
    result = learn_gates(template, sds, x, y, cfg, initial_off=[1])
    assert torch.equal(result.plan.ungated_weights, torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    assert torch.equal(result.merged["layers.2.weight"], average([sds[0], sds[2]])["layers.2.weight"])
    with pytest.raises(ValueError, match="out of range"):
        learn_gates(template, sds, x, y, cfg, initial_off=[3])


def test_disabled_gates_give_the_uniform_average_in_the_same_shape():
    template, sds = mlp_models()
    x, y = random_batch(template)
    result = learn_gates(template, sds, x, y, GatesConfig(enabled=False))
    assert isinstance(result, GateResult) and not result.learned
    plain = average(sds)
    assert all(torch.equal(result.merged[k], plain[k]) for k in plain)
    assert all(torch.allclose(w, torch.full((3,), 1 / 3, dtype=torch.float64)) for w in result.weights.values())
    off = uniform_result(template, sds, GatesConfig(enabled=False), initial_off=[0])
    two = average(sds[1:])
    assert all(torch.equal(off.merged[k], two[k]) for k in two)


def test_temperature_annealing_and_penalty_weights_and_progress():
    cfg = GatesConfig(steps=100, beta_final=0.2)
    betas = [temperature_at(s, cfg) for s in range(100)]
    assert betas[0] == betas[69] == cfg.beta and betas[99] == pytest.approx(0.2)
    assert all(b >= a for a, b in zip(betas[1:], betas))
    assert temperature_at(99, GatesConfig(steps=100)) == GatesConfig().beta
    template, sds = mlp_models()
    plan = plan_for(template, sds, GatesConfig(granularity="channel"))
    for weighting in ("count", "params"):
        assert penalty_row_weights(plan, weighting).sum().item() == pytest.approx(1.0)
    by_params = penalty_row_weights(plan, "params")
    assert by_params[plan.rows["layers.0"]].sum() / by_params[plan.rows["layers.2"]].sum() == pytest.approx(130 / 36)
    calls = []
    x, y = random_batch(template)
    learn_gates(template, sds, x, y, GatesConfig(steps=4, batch_size=16), progress=lambda s, m: calls.append((s, set(m))))
    assert calls == [(s, {"loss", "ce", "expected_l0"}) for s in range(4)]


def test_batchnorm_uses_batch_statistics_during_learning():
    template, sds = resnet_bn_models(2)
    # source running statistics are garbage: eval-mode BN would turn every logit into nonsense
    for sd in sds:
        for key in sd:
            if key.endswith("running_var"):
                sd[key].fill_(1e6)
    x, y = random_batch(template, 32)
    checks = []

    def compare(module, args, out):
        batch = F.batch_norm(args[0], None, None, module.weight, module.bias, training=True, eps=module.eps)
        checks.append(torch.allclose(out, batch, atol=1e-5))
        checks.append(abs(module.running_var.min().item() - 1e6) < 10)  # the merged buffers are there, unused

    hook = template.norm1.register_forward_hook(compare)
    learn_gates(template, sds, x, y, GatesConfig(steps=2, batch_size=32))
    hook.remove()
    assert checks == [True] * 4


# ---------------------------------------------------------------------------------------------
# REPAIR's view and the report table


def result_with(template, sds, cfg, weights_by_part: dict) -> GateResult:
    plan = plan_for(template, sds, cfg)
    w = torch.zeros(plan.num_rows, len(sds), dtype=torch.float64)
    for part, value in weights_by_part.items():
        w[plan.rows[part]] = torch.as_tensor(value, dtype=torch.float64)
    return GateResult(plan=plan, log_alpha=split_rows(plan, w), weights=split_rows(plan, w),
                      merged=merge_with_weights(plan, sds, w), constant_keys=constant_keys(sds))


def test_stat_point_weights_follow_parts_residual_streams_and_identity_shortcuts():
    template, sds = resnet_bn_models()
    plan = plan_for(template, sds, GatesConfig())
    values = {p: F.one_hot(torch.tensor(i % 3), 3).double() for i, p in enumerate(plan.parts)}
    values["conv1"] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    values["stages.0.0.conv2"] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    values["stages.0.0.shortcut"] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # uninformative gates
    result = result_with(template, sds, GatesConfig(), values)
    points = template.stat_points()
    w = stat_point_weights(result, points)
    assert list(w) == list(points)
    assert torch.equal(w["norm1"], values["conv1"])
    assert torch.equal(w["stages.0.0.norm1"], values["stages.0.0.conv1"])
    assert torch.equal(w["stages.0.0.norm2"], values["stages.0.0.conv2"])
    # the identity shortcut carries the stream entering the block (the stem), not its own gates
    assert torch.equal(w["stages.0.0.shortcut"], values["conv1"])
    assert torch.allclose(w["stages.0.0.residual"], torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    assert torch.equal(w["stages.0.1.shortcut"], w["stages.0.0.residual"])
    # a transition shortcut (conv + norm) has real weights of its own
    assert torch.equal(w["stages.1.0.shortcut.1"], values["stages.1.0.shortcut"])
    assert torch.equal(weights_for_stat_point(result, points, "norm1"), w["norm1"])
    for k in range(3):  # one model everywhere: every point is that model's
        one = result_with(template, sds, GatesConfig(), {p: F.one_hot(torch.tensor(k), 3) for p in plan.parts})
        assert all(torch.equal(v, F.one_hot(torch.tensor(k), 3).double()) for v in stat_point_weights(one, points).values())


def test_stat_point_weights_at_channel_and_model_granularity_and_for_the_mlp():
    template, sds = resnet_bn_models()
    result = uniform_result(template, sds, GatesConfig(granularity="channel"))
    w = stat_point_weights(result, template.stat_points())
    assert w["stages.0.0.norm1"].shape == (16, 3) and w["stages.2.2.residual"].shape == (64, 3)
    assert all(torch.allclose(v.sum(-1), torch.ones((), dtype=torch.float64)) for v in w.values())
    mlp, msds = mlp_models()
    one = result_with(mlp, msds, GatesConfig(granularity="model"), {"model": [0.2, 0.0, 0.8]})
    w = stat_point_weights(one, mlp.stat_points())
    assert list(w) == ["layers.0", "layers.1"]
    assert all(torch.allclose(v, torch.tensor([0.2, 0.0, 0.8], dtype=torch.float64)) for v in w.values())
    assert set(layer_weights(one)) == set(mlp.layer_parts())


def test_gate_table_rows():
    template, sds = resnet_bn_models()
    x, y = random_batch(template, 16)
    result = learn_gates(template, sds, x, y, GatesConfig(granularity="channel", gated_parts=["stages.2.*"], steps=2, batch_size=16))
    rows = gate_table(result, model_names=["a", "b", "c"])
    gated = [r for r in rows if r["gated"]]
    assert len(gated) == 3 * len(result.plan.parts)
    assert {r["model"] for r in rows} == {"a", "b", "c"}
    assert all(0 <= r["open_fraction"] <= 1 and 0 <= r["p_active"] <= 1 for r in gated)
    assert [r["part"] for r in gate_table(result, ["linear"])] == ["linear"] * 3
    with pytest.raises(ValueError, match="unknown parts"):
        gate_table(result, ["nope"])


# ---------------------------------------------------------------------------------------------
# integration: small MLPs trained on synthetic data (13, 14, 18)

SYNTH = SyntheticConfig(num_train=2400, num_test=800, num_classes=10, channels=1, image_size=8, noise=3.0)


def _train(template, init, x, y, seed, epochs=2):
    model = copy.deepcopy(template)
    model.load_state_dict(init)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 100):
            idx = order[i : i + 100]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained():
    """Honest models trained from ONE init on different data orders: one basin without alignment,
    standing in for the universe-aligned models the pipeline hands to gate learning."""
    torch.set_num_threads(1)
    bundle = load_data(DataConfig(name="synthetic", calibration_size=800, validation_size=0, synthetic=SYNTH))
    x, y = bundle.train_set()
    torch.manual_seed(0)
    template = MLP(64, [64, 64], 10)
    init = {k: v.clone() for k, v in template.state_dict().items()}
    honest = [_train(template, init, x, y, seed) for seed in range(4)]
    randoms = []
    for seed in range(3):
        torch.manual_seed(50 + seed)
        randoms.append({k: v.detach().clone() for k, v in MLP(64, [64, 64], 10).state_dict().items()})
    return {"bundle": bundle, "template": template, "honest": honest, "random": randoms,
            "calib": bundle.calibration_set(), "test": (bundle.test_x, bundle.test_y)}


def accuracy(template, sd, data) -> float:
    x, y = data
    return (logits(template, sd, x).argmax(1) == y).double().mean().item()


GATE_CFG = GatesConfig(lr=0.1, steps=120, batch_size=256, lam=0.01)  # the recipe these tests were written for


@pytest.mark.parametrize("corruption", ["scale_1e3", "noise_100x_std"])
def test_malicious_model_is_gated_out(trained, corruption):  # 13
    template, honest, test = trained["template"], trained["honest"], trained["test"]
    g = torch.Generator().manual_seed(9)
    if corruption == "scale_1e3":
        bad = {k: v * 1e3 for k, v in honest[3].items()}
    else:
        bad = {k: v + 100 * v.std() * torch.randn(v.shape, generator=g) for k, v in honest[3].items()}
    models = honest[:3] + [bad]
    assert screen_models(models, 100.0).flagged == (3,)
    honest_avg = accuracy(template, average(honest[:3]), test)
    result = learn_gates(template, models, *trained["calib"], GATE_CFG)
    for part, la in result.log_alpha.items():
        assert HC.deterministic(la[3]) == 0, part
        assert result.weights[part][3] == 0, part
    assert accuracy(template, result.merged, test) >= honest_avg - 0.01
    if corruption == "noise_100x_std":  # the naive average of all four is ruined
        assert accuracy(template, average(models), test) < honest_avg - 0.2


def test_corrupting_one_layer_closes_only_that_gate(trained):  # 13, partial variant
    template, honest = trained["template"], trained["honest"]
    bad = dict(honest[3])
    bad["layers.1.weight"] = bad["layers.1.weight"] * 1e3
    bad["layers.1.bias"] = bad["layers.1.bias"] * 1e3
    result = learn_gates(template, honest[:3] + [bad], *trained["calib"], GATE_CFG.model_copy(update={"lam": 0.0}))
    zhat = {p: HC.deterministic(la) for p, la in result.log_alpha.items()}
    assert zhat["layers.1"][3] == 0
    assert zhat["layers.0"][3] > 0 and zhat["layers.2"][3] > 0


def test_argmax_picks_the_good_model_among_degraded_ones(trained):  # 14
    template, good, test = trained["template"], trained["honest"][0], trained["test"]
    models = [trained["random"][0], good, trained["random"][1], trained["random"][2]]
    cfg = GATE_CFG.model_copy(update={"final_gates": "argmax", "granularity": "tensor"})
    result = learn_gates(template, models, *trained["calib"], cfg)
    picks = [int(w.argmax()) for w in result.weights.values()]
    assert sum(p == 1 for p in picks) >= 0.9 * len(picks), picks
    assert accuracy(template, result.merged, test) >= accuracy(template, good, test) - 0.01


def test_gate_learning_sees_only_the_calibration_slice_of_train(trained):  # 18
    bundle, template = trained["bundle"], trained["template"]
    assert not set(bundle.calib_idx.tolist()) & set(bundle.train_idx.tolist())
    x, y = bundle.calibration_set()
    assert torch.equal(x, bundle.train_x[bundle.calib_idx])
    calib_rows = {row.numpy().tobytes() for row in x.flatten(1)}
    test_rows = {row.numpy().tobytes() for row in bundle.test_x.flatten(1)}
    assert not calib_rows & test_rows
    fed = []
    hook = template.register_forward_pre_hook(lambda m, args: fed.append(args[0].detach().clone()))
    learn_gates(template, trained["honest"][:3], x, y, GatesConfig(steps=5, batch_size=64))
    hook.remove()
    assert len(fed) == 5
    assert all(row.numpy().tobytes() in calib_rows for batch in fed for row in batch.flatten(1))

"""The model pre-filter: non-finite values and outlier per-tensor norms."""

from __future__ import annotations

import pytest
import torch

from cyclemerge.models import MLP, ResNet20
from cyclemerge.permutation import apply_perms, random_perms
from cyclemerge.prefilter import map_into_universe, screen_models


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def models(n: int = 4, arch: str = "mlp"):
    sds = []
    for k in range(n):
        torch.manual_seed(k)
        model = MLP(12, [10, 8], 4) if arch == "mlp" else ResNet20(1, 4, norm="batchnorm")
        sds.append({key: v.detach().clone() for key, v in model.state_dict().items()})
    return sds


def scaled(sd, factor, keys=None):
    return {k: v * factor if (keys is None or k in keys) and torch.is_floating_point(v) else v.clone() for k, v in sd.items()}


def test_independent_seeds_pass():
    report = screen_models(models(5, "resnet"), 100.0)
    assert report.flagged == () and report.clean == (0, 1, 2, 3, 4)
    assert "all 5 models pass" in report.describe()


@pytest.mark.parametrize("factor", [1e3, 1e-3])
def test_a_scaled_model_is_flagged_whichever_way(factor):
    sds = models()
    sds[2] = scaled(sds[2], factor)
    report = screen_models(sds, 100.0)
    assert report.flagged == (2,) and report.clean == (0, 1, 3)
    assert len(report.reasons[2]) == len(sds[2])  # every float tensor of the model is off
    assert report.worst_ratio[2] == pytest.approx(1e3, rel=0.5)
    assert "layers.0.weight" in report.reasons[2][0] and "median" in report.reasons[2][0]


def test_one_corrupted_tensor_is_named():
    sds = models()
    sds[1] = scaled(sds[1], 1e3, keys={"layers.1.bias"})
    report = screen_models(sds, 100.0)
    assert report.flagged == (1,)
    assert len(report.reasons[1]) == 1 and report.reasons[1][0].startswith("layers.1.bias: norm")
    assert "model 1: layers.1.bias" in report.describe()
    assert "\n  b: layers.1.bias" in report.describe(names=["a", "b", "c", "d"])


def test_ratio_threshold_and_disabling():
    sds = models()
    sds[0] = scaled(sds[0], 50.0)
    assert screen_models(sds, 100.0).flagged == ()
    assert screen_models(sds, 10.0).flagged == (0,)
    sds[3] = scaled(sds[3], 1e6)
    assert screen_models(sds, None).flagged == ()
    with pytest.raises(ValueError, match="must be > 1"):
        screen_models(sds, 1.0)


def test_nan_models_are_flagged_and_always_dropped():
    sds = models()
    sds[3]["layers.2.weight"][0, 0] = float("nan")
    sds[1] = scaled(sds[1], 1e3)
    for ratio in (100.0, None):
        report = screen_models(sds, ratio)
        assert 3 in report.flagged and report.nonfinite == (3,)
        assert "non-finite" in report.reasons[3][0] and "always dropped" in report.reasons[3][0]
    report = screen_models(sds, 100.0)
    assert report.partition("drop") == ((0, 2), (), (1, 3))
    assert report.partition("gate_off") == ((0, 2), (1,), (3,))
    with pytest.raises(ValueError, match="drop, gate_off"):
        report.partition("keep")


def test_two_models_have_no_majority_so_only_nan_is_caught():
    # with N = 2 the median is the mean of the two norms: it cannot tell which model is off
    sds = models(2)
    sds[1] = scaled(sds[1], 1e3)
    report = screen_models(sds, 100.0)
    assert report.flagged == () and "norm test skipped" in report.describe()
    sds = models(3)
    sds[0]["layers.0.bias"][0] = float("inf")
    sds[1] = scaled(sds[1], 1e3)
    assert screen_models(sds, 100.0).flagged == (0,)


def test_integer_buffers_and_all_zero_tensors_are_ignored():
    sds = models(4, "resnet")
    sds[0]["norm1.num_batches_tracked"].fill_(10**9)
    for sd in sds:
        sd["norm1.bias"].zero_()
    sds[1]["norm1.bias"][0] = 5.0  # median norm 0: no scale to compare with
    assert screen_models(sds, 100.0).flagged == ()


def test_a_flagged_model_is_mapped_into_the_clean_models_universe():
    torch.manual_seed(0)
    template = MLP(12, [10, 8], 4)
    spec = template.perm_spec()
    base = {k: v.detach().clone() for k, v in template.state_dict().items()}
    clean = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    truth = scaled(base, 1e3)
    hidden = apply_perms(truth, spec, random_perms(spec, truth, torch.Generator().manual_seed(1)))
    mapped, perms = map_into_universe(hidden, clean, spec)
    assert set(perms) == {"h0", "h1"}
    assert all(torch.equal(mapped[k], truth[k]) for k in truth)
    hidden["layers.0.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        map_into_universe(hidden, clean, spec)

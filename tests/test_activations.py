"""Activation statistics: streamed per-channel moments equal the ones of all activations at once, follow
the model's permutations, and cross-correlations identify a permuted copy unit for unit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cyclemerge.activations import (
    Stats,
    channel_stats,
    correlation_points,
    cross_correlations,
    permute_stats,
    stats_from_tensors,
    stats_to_tensors,
)
from cyclemerge.config import ModelConfig
from cyclemerge.models import ChannelAffine, LayerNorm2d, build_model
from cyclemerge.permutation import apply_perms, random_perms

CONFIGS = {
    "mlp": ModelConfig(arch="mlp", hidden=[24, 16, 12]),
    "resnet20-ln": ModelConfig(arch="resnet20", norm="layernorm"),
    "resnet20-bn": ModelConfig(arch="resnet20", norm="batchnorm"),
    "vgg16": ModelConfig(arch="vgg16"),
}
CHANNELS, SIZE = 3, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors on a shared 2-core machine: extra intra-op threads only spin against each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(name: str, seed: int = 0) -> nn.Module:
    """A model with non-trivial norms, shortcut affines and BN running stats, so channels differ."""
    torch.manual_seed(seed)
    model = build_model(CONFIGS[name], in_channels=CHANNELS, image_size=SIZE, num_classes=10)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LayerNorm2d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if isinstance(m, ChannelAffine):
                m.scale.uniform_(0.5, 1.5, generator=g)
                m.shift.normal_(0.0, 0.3, generator=g)
    return model.eval()


def calibration(n: int = 24, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def all_outputs(model: nn.Module, x: torch.Tensor, paths) -> dict[str, torch.Tensor]:
    """Every point's whole activation tensor as float64 [C, samples]: the unstreamed reference."""
    got: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(p).register_forward_hook(
            lambda _m, _i, out, p=p: got.__setitem__(p, out.detach().transpose(0, 1).reshape(out.shape[1], -1).double())
        )
        for p in paths
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return got


@pytest.mark.parametrize("name", ["mlp", "resnet20-ln", "resnet20-bn"])
def test_streamed_stats_equal_stats_of_all_activations(name):
    model = make(name)
    x = calibration()
    points = model.stat_points()
    reference = all_outputs(model, x, points)
    for batch_size in (5, 24):  # uneven last batch, and one batch
        stats = channel_stats(model, x, batch_size=batch_size)
        assert list(stats) == list(points)
        for p, a in reference.items():
            torch.testing.assert_close(stats[p].mean, a.mean(dim=1), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(stats[p].var, a.var(dim=1, unbiased=False), rtol=1e-9, atol=1e-12)
            assert stats[p].count == a.shape[1]
    conv_point = "norm1" if name != "mlp" else None
    if conv_point:  # conv maps: batch and spatial positions are samples
        assert stats[conv_point].count == len(x) * SIZE * SIZE


def test_variance_survives_a_large_mean():
    # A channel at 1e4 ± 1: E[x²] - E[x]² in float32 would lose the variance entirely.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    model.stat_points = lambda: {"0": "h0"}
    with torch.no_grad():
        model[0].weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
        model[0].bias.fill_(1e4)
    x = torch.randn(1000, 4, generator=torch.Generator().manual_seed(1))
    stats = channel_stats(model, x, batch_size=64)
    with torch.no_grad():
        out = model(x).double()
    torch.testing.assert_close(stats["0"].var, out.var(dim=0, unbiased=False), rtol=1e-6, atol=0)
    assert (stats["0"].var > 0.5).all()


def test_points_subset_and_mode_restored():
    model = make("resnet20-bn").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = channel_stats(model, calibration(), batch_size=8, points=["norm1", "stages.0.0.norm2"])
    assert list(stats) == ["norm1", "stages.0.0.norm2"]
    assert all(m.training for m in model.modules()), "training flags must be restored"
    # Measured in eval mode: BatchNorm running statistics are not touched.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_points_out_of_forward_order_are_an_error():
    model = make("mlp")
    with pytest.raises(RuntimeError, match="forward order"):
        channel_stats(model, calibration(), batch_size=8, points=["layers.2", "layers.0"])


def test_empty_calibration_and_bad_batch_size_are_errors():
    model = make("mlp")
    with pytest.raises(ValueError, match="no calibration samples"):
        channel_stats(model, calibration()[:0], batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        channel_stats(model, calibration(), batch_size=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stats_follow_permutations(name):
    model = make(name)
    x = calibration(12)
    sd, spec, points = model.state_dict(), model.perm_spec(), model.stat_points()
    perms = random_perms(spec, sd, torch.Generator().manual_seed(3))
    permuted = make(name)
    permuted.load_state_dict(apply_perms(sd, spec, perms))
    measured = channel_stats(permuted, x, batch_size=12)
    expected = permute_stats(channel_stats(model, x, batch_size=12), perms, points)
    for p in points:
        torch.testing.assert_close(measured[p].mean, expected[p].mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(measured[p].var, expected[p].var, rtol=1e-4, atol=1e-6)
    # The permutation really moved channels (otherwise the check above proves nothing).
    assert any(not torch.allclose(measured[p].mean, channel_stats(model, x, batch_size=12)[p].mean) for p in points)


def test_permute_stats_rejects_unknown_points():
    stats = {"nope": Stats(torch.zeros(2), torch.ones(2), 3)}
    with pytest.raises(KeyError, match="not a stat point"):
        permute_stats(stats, {}, {"layers.0": "h0"})


def test_stats_tensor_round_trip():
    stats = channel_stats(make("resnet20-ln"), calibration(), batch_size=12)
    flat = stats_to_tensors(stats)
    assert all(isinstance(v, torch.Tensor) for v in flat.values())
    back = stats_from_tensors(flat)
    assert list(back) == list(stats)
    for p, s in stats.items():
        assert torch.equal(back[p].mean, s.mean) and torch.equal(back[p].var, s.var) and back[p].count == s.count


def test_correlation_points_use_residual_sums_for_residual_groups():
    points = make("resnet20-ln").stat_points()
    chosen = correlation_points(points)
    assert sorted(set(chosen.values())) == sorted(set(points.values())), "every group keeps a representative"
    res0 = [p for p, g in chosen.items() if g == "res0"]
    assert res0 == ["stages.0.0.residual", "stages.0.1.residual", "stages.0.2.residual"]
    assert chosen["stages.1.2.norm1"] == "stages.1.2.inner"
    mlp_points = make("mlp").stat_points()
    assert correlation_points(mlp_points) == mlp_points


def test_cross_correlations_match_numpy_and_identify_a_permuted_copy():
    model = make("mlp")
    x = calibration(40)
    sd, spec = model.state_dict(), model.perm_spec()
    perms = random_perms(spec, sd, torch.Generator().manual_seed(5))
    permuted = make("mlp")
    permuted.load_state_dict(apply_perms(sd, spec, perms))
    other = make("mlp", seed=1)
    models = [model, permuted, other]
    corr = cross_correlations(models, x, batch_size=15)
    assert set(corr) == {"h0", "h1", "h2"}
    outs = [all_outputs(m, x, m.stat_points()) for m in models]
    for group, path in (("h0", "layers.0"), ("h1", "layers.1"), ("h2", "layers.2")):
        c = corr[group]
        n = model.layers[int(path[-1])].out_features
        assert c.shape == (3, 3, n, n) and c.dtype == torch.float32
        stacked = torch.cat([o[path] for o in outs]).numpy()
        expected = torch.from_numpy(np.corrcoef(stacked)).reshape(3, n, 3, n).permute(0, 2, 1, 3).float()
        torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c[0, 1], c[1, 0].T)
        # Unit j of the permuted copy is unit perms[j] of the original: perfectly correlated.
        j = torch.arange(n)
        torch.testing.assert_close(c[0, 1][perms[group], j], torch.ones(n), rtol=0, atol=1e-5)
        assert torch.equal(c[0, 1].argmax(dim=0), perms[group])


def test_cross_correlations_of_a_constant_unit_are_zero():
    model = make("mlp")
    with torch.no_grad():
        model.layers[0].weight[3].zero_()  # unit 3 of h0 is its bias for every input
    corr = cross_correlations([model, make("mlp", seed=1)], calibration(), batch_size=8)["h0"]
    assert torch.isfinite(corr).all()
    assert (corr[0, 1][3] == 0).all() and (corr[0, 0][3] == 0).all()

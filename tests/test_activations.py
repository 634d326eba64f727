"""Activation statistics: streamed per-channel moments equal the ones of all activations at once, follow
the model's permutations, and cross-correlations identify a permuted copy unit for unit; the per-batch
moments of the hooks match float64 ones; hooked runs replace outputs without writing into inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cyclemerge import activations
from cyclemerge.activations import (
    Stats,
    batch_moments,
    channel_stats,
    correlation_points,
    cross_correlations,
    permute_stats,
    row_chunks,
    run_hooked,
    stats_from_tensors,
    stats_to_tensors,
)
from cyclemerge.permutation import apply_perms, random_perms
from tests.conftest import CHANNELS, SIZE, TINY_MODELS as CONFIGS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def calibration(n: int = 24, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def all_outputs(model: nn.Module, x: torch.Tensor, paths, batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Every point's whole activation tensor as float64 [C, samples]: the unstreamed reference."""
    got: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    handles = [
        model.get_submodule(p).register_forward_hook(
            lambda _m, _i, out, p=p: got[p].append(out.detach().transpose(0, 1).reshape(out.shape[1], -1).double())
        )
        for p in paths
    ]
    with torch.no_grad():
        # Batch by batch as the stream is fed: a float32 matmul's rounding depends on the batch size
        # (1e-6 relative, measured), and that is the model's, not the streaming's, error.
        for start in range(0, len(x), batch_size or len(x)):
            model(x[start : start + (batch_size or len(x))])
    for h in handles:
        h.remove()
    return {p: torch.cat(a, dim=1) for p, a in got.items()}


@pytest.mark.parametrize("name", ["mlp", "resnet20-ln", "resnet20-bn"])
def test_streamed_stats_equal_stats_of_all_activations(name):
    model = tiny_model(name)
    x = calibration()
    points = model.stat_points()
    for batch_size in (5, 24):  # uneven last batch, and one batch
        reference = all_outputs(model, x, points, batch_size)
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
    model = tiny_model("resnet20-bn").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = channel_stats(model, calibration(), batch_size=8, points=["norm1", "stages.0.0.norm2"])
    assert list(stats) == ["norm1", "stages.0.0.norm2"]
    assert all(m.training for m in model.modules()), "training flags must be restored"
    # Measured in eval mode: BatchNorm running statistics are not touched.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_points_out_of_forward_order_are_an_error():
    model = tiny_model("mlp")
    with pytest.raises(RuntimeError, match="forward order"):
        channel_stats(model, calibration(), batch_size=8, points=["layers.2", "layers.0"])


def test_empty_calibration_and_bad_batch_size_are_errors():
    model = tiny_model("mlp")
    with pytest.raises(ValueError, match="no calibration samples"):
        channel_stats(model, calibration()[:0], batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        channel_stats(model, calibration(), batch_size=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stats_follow_permutations(name):
    model = tiny_model(name)
    x = calibration(12)
    sd, spec, points = model.state_dict(), model.perm_spec(), model.stat_points()
    perms = random_perms(spec, sd, torch.Generator().manual_seed(3))
    permuted = tiny_model(name)
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
    stats = channel_stats(tiny_model("resnet20-ln"), calibration(), batch_size=12)
    flat = stats_to_tensors(stats)
    assert all(isinstance(v, torch.Tensor) for v in flat.values())
    back = stats_from_tensors(flat)
    assert list(back) == list(stats)
    for p, s in stats.items():
        assert torch.equal(back[p].mean, s.mean) and torch.equal(back[p].var, s.var) and back[p].count == s.count


def test_correlation_points_use_residual_sums_for_residual_groups():
    points = tiny_model("resnet20-ln").stat_points()
    chosen = correlation_points(points)
    assert sorted(set(chosen.values())) == sorted(set(points.values())), "every group keeps a representative"
    res0 = [p for p, g in chosen.items() if g == "res0"]
    assert res0 == ["stages.0.0.residual", "stages.0.1.residual", "stages.0.2.residual"]
    assert chosen["stages.1.2.norm1"] == "stages.1.2.inner"
    mlp_points = tiny_model("mlp").stat_points()
    assert correlation_points(mlp_points) == mlp_points


def test_cross_correlations_match_numpy_and_identify_a_permuted_copy():
    model = tiny_model("mlp")
    x = calibration(40)
    sd, spec = model.state_dict(), model.perm_spec()
    perms = random_perms(spec, sd, torch.Generator().manual_seed(5))
    permuted = tiny_model("mlp")
    permuted.load_state_dict(apply_perms(sd, spec, perms))
    other = tiny_model("mlp", seed=1)
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
    model = tiny_model("mlp")
    with torch.no_grad():
        model.layers[0].weight[3].zero_()  # unit 3 of h0 is its bias for every input
    corr = cross_correlations([model, tiny_model("mlp", seed=1)], calibration(), batch_size=8)["h0"]
    assert torch.isfinite(corr).all()
    assert (corr[0, 1][3] == 0).all() and (corr[0, 0][3] == 0).all()


@pytest.mark.parametrize("shape", [(300, 7), (40, 5, 6, 6), (3, 4, 70, 70)])
def test_batch_moments_match_float64_and_survive_a_large_mean(shape, monkeypatch):
    monkeypatch.setattr(activations, "CHUNK_BYTES", 4096)  # several chunks even for small tensors
    g = torch.Generator().manual_seed(0)
    channels = shape[1]
    spread = torch.linspace(0.01, 3.0, channels).view((1, -1) + (1,) * (len(shape) - 2))
    offset = torch.tensor([0.0, 1e3, -50.0] + [1.0] * (channels - 3)).view(spread.shape)
    out = torch.randn(shape, generator=g) * spread + offset
    n, mean, m2 = batch_moments(out)
    a = out.double().transpose(0, 1).reshape(channels, -1)
    assert n == a.shape[1] and len(row_chunks(out)) > 1
    # float32 inputs hold ~6e-8 relative; a value near 1e3 carries 6e-5 absolute, so its mean does too.
    torch.testing.assert_close(mean, a.mean(dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2 / n, a.var(dim=1, unbiased=False), rtol=1e-4, atol=0)


def test_run_hooked_replaces_outputs_counts_calls_and_copies_aliased_outputs():
    model = nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 2))
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    seen_inputs = []

    def zero_(out):
        out.zero_()  # an in-place write, as REPAIR's hooks do
        return out

    model[1].register_forward_pre_hook(lambda _m, args: seen_inputs.append(args[0].clone()))
    calls = run_hooked(model, x, batch_size=4, outputs={"1": zero_}, writes=True)
    assert calls == 3
    # The Identity's output IS its input: the write went to a copy, the Linear's output is intact...
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(seen_inputs), model[0](x))
    # ...and the replaced output is what the rest of the forward read.
    got = []
    run_hooked(model, x, batch_size=10, outputs={"1": zero_, "2": lambda out: got.append(out.clone())}, writes=True)
    torch.testing.assert_close(got[0], model[2].bias.detach().expand(10, 2))

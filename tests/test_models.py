"""Models and their perm specs: a permuted model must compute the same function (the bug class that
cost Git Re-Basin users days, see STYLE.md), and every spec/part/stat-point list must be complete."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.func import functional_call

from cyclemerge.config import ARCHITECTURES, ModelConfig
from cyclemerge.models import MODELS, ChannelAffine, LayerNorm2d, PermutableModel, build_model
from cyclemerge.permutation import apply_perms, check_spec, group_sizes, random_perms
from tests import spec_oracles as oracle

USER_CNN = "tests.fixtures.user_cnn:build"

NUM_CLASSES = 10
SHAPES = [(1, 28), (3, 32)]
CONFIGS = {
    "mlp-small": ModelConfig(arch="mlp", hidden=[32, 24, 16]),
    "mlp": ModelConfig(arch="mlp"),
    "resnet20-ln": ModelConfig(arch="resnet20", norm="layernorm"),
    "resnet20-bn": ModelConfig(arch="resnet20", norm="batchnorm"),
    "vgg16": ModelConfig(arch="vgg16"),
}
# First layer (its column axis is the input) and the classifier (its row axis is the classes).
INPUT_AND_HEAD = {"mlp": ("layers.0", None), "resnet20": ("conv1", "linear"), "vgg16": ("features.0", "classifier.4")}


def head_of(model: nn.Module, arch: str) -> str:
    return f"layers.{len(model.layers) - 1}" if arch == "mlp" else INPUT_AND_HEAD[arch][1]


def make(name: str, in_channels: int, image_size: int, seed: int = 0) -> nn.Module:
    """A model whose every float tensor is non-trivial, in eval mode.

    Fresh norms (weight 1, bias 0) and identity shortcuts are permutation-invariant and would hide
    a missing tie; BatchNorm gets non-trivial running statistics for the same reason.
    """
    torch.manual_seed(seed)
    model = build_model(CONFIGS[name], in_channels=in_channels, image_size=image_size, num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (LayerNorm2d, nn.BatchNorm2d)):
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(0.0, 0.1, generator=g)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 1.5, generator=g)
                module.num_batches_tracked.fill_(7)
            if isinstance(module, ChannelAffine):
                module.scale.uniform_(0.5, 1.5, generator=g)
                module.shift.normal_(0.0, 0.1, generator=g)
    return model.eval()


def inputs(in_channels: int, image_size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(42))


CASES = [(name, c, s) for name in CONFIGS for c, s in SHAPES]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{c}x{s}" for n, c, s in CASES])
def case(request):
    name, c, s = request.param
    model = make(name, c, s)
    return name, model, model.state_dict(), model.perm_spec(), inputs(c, s)


def test_permuted_model_computes_the_same_logits(case):
    _, model, sd, spec, x = case
    check_spec(spec, sd)
    perms = random_perms(spec, sd, torch.Generator().manual_seed(3))
    permuted = apply_perms(sd, spec, perms)
    assert any(not torch.equal(permuted[k], sd[k]) for k in sd)
    with torch.no_grad():
        expected = model(x)
        got = functional_call(model, permuted, (x,))
    assert expected.shape == (x.shape[0], NUM_CLASSES)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_every_hidden_axis_has_a_group_and_input_and_class_axes_none(case):
    name, model, sd, spec, _ = case
    arch = CONFIGS[name].arch
    first, head = INPUT_AND_HEAD[arch][0], head_of(model, arch)
    for key, axes in spec.items():
        tensor = sd[key]
        for axis, group in enumerate(axes):
            is_input = key == f"{first}.weight" and axis == 1
            is_class = key.startswith(f"{head}.") and axis == 0
            is_kernel = axis >= 2
            if is_input or is_class or is_kernel:
                assert group is None, f"{key} axis {axis} must never be permuted, spec says {group!r}"
            else:
                assert group is not None and tensor.shape[axis] > 1, f"{key} axis {axis} is hidden but has no group"
        named = [g for g in axes if g is not None]
        assert len(named) == len(set(named)), f"{key}: one group on two axes {axes}"


def test_stat_points_exist_and_permute_with_their_group(case):
    _, model, sd, spec, x = case
    sizes = group_sizes(spec, sd)
    points = model.stat_points()
    perms = random_perms(spec, sd, torch.Generator().manual_seed(5))

    def record(params):
        seen = {}
        hooks = [
            model.get_submodule(path).register_forward_hook(lambda m, i, o, path=path: seen.__setitem__(path, o))
            for path in points
        ]
        try:
            with torch.no_grad():
                functional_call(model, params, (x,))
        finally:
            for h in hooks:
                h.remove()
        return seen

    before, after = record(sd), record(apply_perms(sd, spec, perms))
    for path, group in points.items():
        assert before[path].shape[1] == sizes[group], path
        # REPAIR's statistics of universe unit j must be the model's unit perms[group][j].
        torch.testing.assert_close(after[path], before[path].index_select(1, perms[group]), atol=1e-5, rtol=1e-5)


def test_layer_parts_cover_every_key_once_in_state_dict_order(case):
    _, model, sd, _, _ = case
    parts = model.layer_parts()
    flat = [k for keys in parts.values() for k in keys]
    assert [k for k, n in Counter(flat).items() if n > 1] == []
    assert flat == list(sd)
    for path, keys in parts.items():
        model.get_submodule(path)
        assert keys and keys[0].startswith(f"{path}.")


@pytest.mark.parametrize("name", ["mlp-small", "resnet20-ln", "resnet20-bn", "vgg16"])
def test_unbinding_any_tied_axis_changes_the_function(name):
    """The converse of invariance: a spec that ties one axis too few would be caught (mutation test)."""
    model = make(name, 1, 28)
    sd, spec, x = model.state_dict(), model.perm_spec(), inputs(1, 28, n=2)
    perms = random_perms(spec, sd, torch.Generator().manual_seed(11))
    permuted = apply_perms(sd, spec, perms)
    with torch.no_grad():
        expected = model(x)
        for key, axes in spec.items():
            for axis, group in enumerate(axes):
                if group is None:
                    continue
                untied = {key: axes[:axis] + (None,) + axes[axis + 1 :]}
                broken = permuted | apply_perms({key: sd[key]}, untied, perms)
                got = functional_call(model, broken, (x,))
                assert (got - expected).abs().max() > 1e-4, f"{name}: untying {key} axis {axis} went unnoticed"


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_resnet20_residual_groups(norm):
    model = build_model(ModelConfig(arch="resnet20", norm=norm), in_channels=3, image_size=32, num_classes=NUM_CLASSES)
    spec = model.perm_spec()
    assert spec["conv1.weight"][:2] == ("res0", None)
    for key in ("norm1.weight", "norm1.bias"):
        assert spec[key] == ("res0",)
    for s in range(3):
        res, prev = f"res{s}", f"res{max(s - 1, 0)}"
        for b in range(3):
            p = f"stages.{s}.{b}"
            inner = f"{p}.inner"
            assert spec[f"{p}.conv1.weight"][:2] == (inner, prev if b == 0 else res)
            assert spec[f"{p}.conv2.weight"][:2] == (res, inner)
            assert spec[f"{p}.norm1.weight"] == (inner,)
            assert spec[f"{p}.norm2.weight"] == spec[f"{p}.norm2.bias"] == (res,)
            if s > 0 and b == 0:
                assert spec[f"{p}.shortcut.0.weight"][:2] == (res, prev)
                assert spec[f"{p}.shortcut.1.weight"] == (res,)
            else:
                assert spec[f"{p}.shortcut.scale"] == spec[f"{p}.shortcut.shift"] == (res,)
    assert spec["linear.weight"] == (None, "res2")
    assert spec["linear.bias"] == (None,)
    groups = {g for axes in spec.values() for g in axes if g is not None}
    assert groups == {"res0", "res1", "res2"} | {f"stages.{s}.{b}.inner" for s in range(3) for b in range(3)}
    if norm == "batchnorm":
        assert spec["stages.1.0.norm2.running_mean"] == spec["stages.1.0.norm2.running_var"] == ("res1",)
        assert spec["stages.1.0.norm2.num_batches_tracked"] == ()


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("in_channels,image_size", SHAPES)
def test_resnet20_widths_and_strides(width, in_channels, image_size):
    model = build_model(ModelConfig(arch="resnet20", width=width), in_channels=in_channels, image_size=image_size, num_classes=7)
    shapes = {}
    for s, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda m, i, o, s=s: shapes.__setitem__(s, tuple(o.shape[1:])))
    assert model(inputs(in_channels, image_size, n=2)).shape == (2, 7)
    sizes = [image_size, (image_size + 1) // 2, (image_size + 3) // 4]
    assert shapes == {s: (w * width, sizes[s], sizes[s]) for s, w in enumerate((16, 32, 64))}
    assert len(model.stat_points()) == 1 + 9 * 4 and len(model.layer_parts()) == 1 + 9 * 3 + 1


def test_identity_shortcuts_are_non_trainable_identities():
    model = build_model(ModelConfig(arch="resnet20"), in_channels=3, image_size=32, num_classes=NUM_CLASSES)
    affines = [m for m in model.modules() if isinstance(m, ChannelAffine)]
    assert len(affines) == 7  # 9 blocks minus the two stage transitions
    trainable = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith((".scale", ".shift")) for n in trainable)
    x = torch.randn(2, 16, 5, 5)
    assert torch.equal(affines[0](x), x)
    assert all(isinstance(b.residual, nn.Identity) for stage in model.stages for b in stage)


@pytest.mark.parametrize("image_size", [16, 28, 32, 64])
def test_vgg16_handles_small_and_large_images(image_size):
    model = build_model(ModelConfig(arch="vgg16"), in_channels=1, image_size=image_size, num_classes=NUM_CLASSES)
    feats = model.features(inputs(1, image_size, n=1))
    assert feats.shape[1] == 512 and 1 <= feats.shape[-1] <= max(1, image_size // 32)
    assert model(inputs(1, image_size, n=2)).shape == (2, NUM_CLASSES)
    # Keys do not depend on the image size (skipped pools keep their index).
    reference = build_model(ModelConfig(arch="vgg16"), in_channels=1, image_size=32, num_classes=NUM_CLASSES)
    assert list(model.state_dict()) == list(reference.state_dict())


def test_vgg16_layout_and_width():
    model = build_model(ModelConfig(arch="vgg16", width=2), in_channels=3, image_size=32, num_classes=NUM_CLASSES)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [2 * w for w in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)]
    assert all(c.bias is not None for c in convs)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(1024, 512), (512, 512), (512, NUM_CLASSES)]
    groups = sorted({g for axes in model.perm_spec().values() for g in axes if g is not None})
    assert groups == sorted([f"conv{k}" for k in range(13)] + ["fc0", "fc1"])
    assert list(model.stat_points().values()) == [f"conv{k}" for k in range(13)] + ["fc0", "fc1"]


def test_mlp_layout():
    model = build_model(ModelConfig(arch="mlp", hidden=[20, 10]), in_channels=3, image_size=4, num_classes=5)
    assert [(l.in_features, l.out_features) for l in model.layers] == [(48, 20), (20, 10), (10, 5)]
    assert model.stat_points() == {"layers.0": "h0", "layers.1": "h1"}
    assert model.perm_spec() == {
        "layers.0.weight": ("h0", None),
        "layers.0.bias": ("h0",),
        "layers.1.weight": ("h1", "h0"),
        "layers.1.bias": ("h1",),
        "layers.2.weight": (None, "h1"),
        "layers.2.bias": (None,),
    }
    x = torch.randn(4, 3, 4, 4)
    # Logits, not log-probabilities.
    assert not torch.allclose(model(x).exp().sum(1), torch.ones(4))


def test_default_parameter_counts():
    def count(arch, c, s):
        return sum(p.numel() for p in build_model(ModelConfig(arch=arch), in_channels=c, image_size=s, num_classes=10).parameters())

    assert count("mlp", 1, 28) == 784 * 512 + 512 + 2 * (512 * 512 + 512) + 512 * 256 + 256 + 256 * 10 + 10
    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
             (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]  # fmt: skip
    vgg = sum(9 * a * b + b + 2 * b for a, b in convs) + 512 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert count("vgg16", 3, 32) == vgg
    stem = 9 * 3 * 16 + 2 * 16
    blocks = 0
    for w_in, w in ((16, 16), (16, 32), (32, 64)):
        blocks += 9 * w_in * w + 9 * w * w + 4 * w  # first block of the stage
        blocks += 2 * (2 * 9 * w * w + 4 * w)
        blocks += (9 * w_in * w + 2 * w) if w_in != w else 0  # 3x3 projection shortcut + its norm
    assert count("resnet20", 3, 32) == stem + blocks + 64 * 10 + 10


def test_layernorm2d_normalizes_each_pixel_over_channels():
    torch.manual_seed(0)
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    x = torch.randn(2, 6, 3, 4)
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(ln(x), expected)
    assert [n for n, _ in ln.named_parameters()] == ["weight", "bias"]


def test_registry_matches_config_and_rejects_unknown_arch():
    assert sorted(MODELS) == sorted(ARCHITECTURES)
    with pytest.raises(ValidationError):
        ModelConfig(arch="lenet")
    with pytest.raises(ValueError, match="unknown model architecture 'lenet'; known: custom, mlp, resnet20, vgg16"):
        build_model(ModelConfig.model_construct(arch="lenet"), in_channels=1, image_size=28, num_classes=10)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_models_follow_the_protocol(arch):
    cfg = ModelConfig(arch=arch, factory=USER_CNN) if arch == "custom" else ModelConfig(arch=arch)
    model = build_model(cfg, in_channels=1, image_size=28, num_classes=10)
    assert isinstance(model, PermutableModel)
    assert model.derived_spec().perm_spec == model.perm_spec()


def test_derived_specs_are_the_hand_written_ones(case):
    """One source of truth: the derived spec, renamed to the papers' groups, IS the hand-written spec,
    key for key and in the same order (so group order, and every number of a run, stay the same)."""
    _, model, sd, spec, _ = case
    assert list(spec.items()) == list(oracle.perm_spec(model).items())
    assert list(model.stat_points().items()) == list(oracle.stat_points(model).items())
    assert list(model.layer_parts().items()) == list(oracle.layer_parts(model).items())
    assert model.derived_spec().composite_keys == []


def test_spec_derivation_leaves_the_global_rng_and_the_weights_alone():
    def build_then_draw(derive: bool):
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch="resnet20", width=2), in_channels=1, image_size=12, num_classes=10)
        if derive:
            model.perm_spec()
        return model.state_dict(), torch.rand(3)

    (sd_a, r_a), (sd_b, r_b) = build_then_draw(False), build_then_draw(True)
    assert torch.equal(r_a, r_b) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_specs_are_derived_once_per_structure_and_survive_hooks():
    cfg = ModelConfig(arch="mlp", hidden=[7, 5])
    a, b = (build_model(cfg, in_channels=1, image_size=4, num_classes=3) for _ in range(2))
    assert a.derived_spec() is b.derived_spec()
    other = build_model(ModelConfig(arch="mlp", hidden=[7, 6]), in_channels=1, image_size=4, num_classes=3)
    assert other.derived_spec().groups == {"h0": 7, "h1": 6}
    # A forward hook that reads shapes (as activation recording does) must not break the trace.
    fresh = build_model(ModelConfig(arch="resnet20"), in_channels=2, image_size=9, num_classes=3)
    fresh.stages[0].register_forward_hook(lambda m, i, o: tuple(o.shape[1:]))
    assert fresh.stat_points()["norm1"] == "res0" and len(fresh.stages[0]._forward_hooks) == 1

"""Derived permutation specs (cyclemerge.spec): equal to the hand-written ones, invariant on torchvision
models and a user CNN, re-aligned by C2M3 from planted permutations, and refusing what they cannot see."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from cyclemerge import matching
from cyclemerge.config import AlignConfig, ModelConfig
from cyclemerge.models import build_model
from cyclemerge.permutation import PermSpec, apply_perms, check_spec
from cyclemerge.spec import DerivedSpec, SpecError, derive_spec
from cyclemerge.spec.verify import verify
from tests import spec_oracles as oracle
from tests.fixtures.user_cnn import build as build_user_cnn

HAND_WRITTEN = {
    "mlp": (ModelConfig(arch="mlp", hidden=[32, 24, 16]), 1, 28),
    "resnet20-ln": (ModelConfig(arch="resnet20", norm="layernorm"), 3, 32),
    "resnet20-bn": (ModelConfig(arch="resnet20", norm="batchnorm"), 1, 28),
    "vgg16": (ModelConfig(arch="vgg16"), 1, 28),
}


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    cfg, c, s = HAND_WRITTEN[name]
    torch.manual_seed(0)
    return build_model(cfg, in_channels=c, image_size=s, num_classes=10).eval(), torch.randn(2, c, s, s)


def partition(spec: PermSpec, sd: dict) -> tuple[set[frozenset], set, dict[str, frozenset]]:
    """Which (key, axis) pairs share a group, which are fixed, and each group's block."""
    blocks: dict[str, set] = {}
    fixed = set()
    for key, axes in spec.items():
        for a, g in enumerate(axes):
            if g is None:
                fixed.add((key, a))
            else:
                blocks.setdefault(g, set()).add((key, a))
    frozen = {g: frozenset(b) for g, b in blocks.items()}
    return set(frozen.values()), fixed, frozen


def float64_outputs(model: nn.Module, sd: dict, x: torch.Tensor) -> torch.Tensor:
    work = copy.deepcopy(model).double().eval()
    work.load_state_dict(sd)
    with torch.no_grad():
        return work(x.double())


def randomized_state(model: nn.Module, seed: int = 0) -> dict:
    """Every float tensor non-trivial (fresh norms are permutation invariant and would hide a missing tie)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if not torch.is_floating_point(v):
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = v.double() * torch.empty(v.shape, dtype=torch.float64).uniform_(0.5, 1.5, generator=g)
        else:
            out[k] = v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)
    return out


def assert_invariant(model: nn.Module, spec: DerivedSpec, x: torch.Tensor, seed: int = 3) -> None:
    """Independent of the verifier: permute every group through the spec, the logits must not move."""
    sd = randomized_state(model)
    perms = {g: torch.randperm(n, generator=torch.Generator().manual_seed(seed)) for g, n in spec.groups.items()}
    permuted = spec.apply(sd, perms)
    assert any(not torch.equal(permuted[k], sd[k]) for k in sd)
    base, moved = float64_outputs(model, sd, x), float64_outputs(model, permuted, x)
    torch.testing.assert_close(moved, base, rtol=1e-9, atol=1e-9 * base.abs().max().item())


@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_derived_spec_equals_the_hand_written_one(name):
    model, x = make(name)
    derived = derive_spec(model, x)
    sd = model.state_dict()
    hand = oracle.perm_spec(model)
    assert derived.composite_keys == []
    hand_blocks, hand_fixed, hand_groups = partition(hand, sd)
    derived_blocks, derived_fixed, derived_groups = partition(derived.perm_spec, sd)
    assert derived_blocks == hand_blocks
    assert derived_fixed == hand_fixed
    rename = {g: next(d for d, b in derived_groups.items() if b == block) for g, block in hand_groups.items()}
    assert sorted(rename.values()) == sorted(derived.groups)
    for g, block in hand_groups.items():
        key, axis = min(block)
        assert derived.groups[rename[g]] == sd[key].shape[axis]
    # Same stat points in the same (forward) order, reading the same groups; same layer parts.
    assert list(derived.stat_points) == list(oracle.stat_points(model))
    assert derived.stat_points == {p: rename[g] for p, g in oracle.stat_points(model).items()}
    assert list(derived.layer_parts.items()) == list(oracle.layer_parts(model).items())
    # With the hand-written names, it is the hand-written spec itself.
    same = derived.renamed({d: g for g, d in rename.items()})
    assert same.perm_spec == hand and same.stat_points == oracle.stat_points(model)


def test_derive_leaves_the_model_as_it_was():
    model, x = make("resnet20-bn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    derive_spec(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torchvision_resnet18_groups_and_invariance():
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    spec = derive_spec(model, x)
    # One residual stream per stage (stem + layer1 share one) and two inner groups... one per block.
    assert len(spec.groups) == 4 + 8
    assert sum(spec.groups.values()) == (64 + 128 + 256 + 512) + 2 * (64 + 128 + 256 + 512)
    assert spec.axes["layer2.0.downsample.0.weight"][0] == spec.axes["layer2.1.bn2.weight"][0]
    assert spec.axes["fc.weight"][0] == ((None, 10, 1),)
    assert "layer1.0.bn1" in spec.stat_points and "layer2.0.downsample.1" in spec.stat_points
    assert spec.layer_parts["layer2.0.downsample"] == [f"layer2.0.downsample.{i}.{n}" for i, n in
                                                       [(0, "weight"), (1, "weight"), (1, "bias"), (1, "running_mean"),
                                                        (1, "running_var"), (1, "num_batches_tracked")]]
    assert_invariant(model, spec, x)


def test_torchvision_mobilenet_v2_depthwise_and_inverted_residuals():
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    spec = derive_spec(model, x)
    dw = spec.axes["features.2.conv.1.0.weight"]
    assert dw[0] == spec.axes["features.2.conv.0.0.weight"][0] and dw[1] == ((None, 1, 1),)
    # The inverted residual of block 3 adds into block 2's output: one stream.
    assert spec.axes["features.3.conv.2.weight"][0] == spec.axes["features.2.conv.2.weight"][0]
    assert_invariant(model, spec, x)


def test_user_cnn_with_cat_groupnorm_residual_and_flatten():
    model = build_user_cnn(num_classes=10, in_channels=1, width=16).eval()
    x = torch.randn(2, 1, 28, 28)
    spec = derive_spec(model, x)
    assert spec.axes["block1.mix.weight"][1] == (("block1.narrow", 8, 1), ("block1.wide", 8, 1))
    assert spec.axes["block1.norm.weight"][0] == spec.axes["block1.mix.weight"][1]
    assert spec.axes["head.weight"][1] == (("down", 32, 4),)  # each channel owns its 2x2 pooled pixels
    assert spec.axes["block1.mix.bias"][0] == spec.axes["stem.bias"][0]  # the residual add ties the stream
    assert set(spec.composite_keys) == {"block1.norm.weight", "block1.norm.bias", "block1.mix.weight",
                                        "block2.norm.weight", "block2.norm.bias", "block2.mix.weight", "head.weight"}
    assert_invariant(model, spec, x)
    sd = randomized_state(model)
    viewed = spec.view(sd)
    check_spec(spec.perm_spec, viewed)
    assert viewed["head.weight[1:0:128]"].shape == (10, 32, 4)
    perms = {g: torch.randperm(n) for g, n in spec.groups.items()}
    via_view = spec.unview(apply_perms(viewed, spec.perm_spec, perms))
    direct = spec.apply(sd, perms)
    assert all(torch.equal(via_view[k], direct[k]) for k in sd)


def test_attached_spec_drives_repair_on_a_user_model():
    """The derived stat points are foldable module outputs: REPAIR moves each one to its goal statistics."""
    from cyclemerge.activations import channel_stats
    from cyclemerge.models import PermutableModel
    from cyclemerge.repair import repair

    torch.manual_seed(0)
    model, other = build_user_cnn(width=8).eval(), build_user_cnn(width=8).eval()
    x = torch.randn(32, 1, 16, 16)
    spec = derive_spec(model, x[:1])
    assert isinstance(spec.attach(model), PermutableModel) and model.stat_points() == spec.stat_points
    goal = channel_stats(other, x, batch_size=32, points=spec.stat_points)
    repaired = copy.deepcopy(model)
    repaired.load_state_dict(repair(model, model.state_dict(), goal, x, batch_size=32))
    after = channel_stats(repaired, x, batch_size=32, points=spec.stat_points)
    for point in spec.stat_points:
        torch.testing.assert_close(after[point].mean, goal[point].mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(after[point].var, goal[point].var, atol=1e-4, rtol=1e-3)


def planted_copies(spec: DerivedSpec, sd: dict, n: int, noise: float, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    copies = []
    for _ in range(n):
        permuted = spec.apply(sd, {k: torch.randperm(size, generator=g) for k, size in spec.groups.items()})
        copies.append({k: v + noise * v.abs().mean() * torch.randn(v.shape, generator=g)
                       if torch.is_floating_point(v) else v for k, v in permuted.items()})
    return copies


def realign_and_merge(spec: DerivedSpec, copies: list[dict], config: AlignConfig) -> dict:
    """C2M3 on the matching view of the state dicts, then the uniform average in the universe."""
    viewed = [spec.view(sd) for sd in copies]
    result = matching.match(state_dicts=viewed, spec=spec.perm_spec, config=config)
    universe = [spec.unview(apply_perms(v, spec.perm_spec, p)) for v, p in zip(viewed, result.perms)]
    return {k: torch.stack([u[k].double() for u in universe]).mean(0).to(v.dtype) if torch.is_floating_point(v)
            else v for k, v in copies[0].items()}


def test_planted_permutations_of_a_torchvision_resnet_are_undone_by_c2m3():
    # ResNet-10 ([1, 1, 1, 1] BasicBlocks, torchvision's own class): resnet18 takes ~20 s of C2M3 on two
    # cores; benchmarks/spec_torchvision.py runs the same check on the full resnet18.
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    spec = derive_spec(model, x[:1])
    sd = model.state_dict()
    merged = realign_and_merge(spec, planted_copies(spec, sd, 3, 1e-4, seed=1),
                               AlignConfig(max_iter=1, device="cpu", init="barycenter"))
    base, out = float64_outputs(model, sd, x), float64_outputs(model, merged, x)
    assert (out - base).abs().max() <= 2e-3 * base.abs().max()
    # Without re-alignment the copies average into another function entirely.
    unaligned = planted_copies(spec, sd, 3, 0.0, 1)
    naive = {k: torch.stack([c[k].double() for c in unaligned]).mean(0).float() if torch.is_floating_point(v) else v
             for k, v in sd.items()}
    assert (float64_outputs(model, naive, x) - base).abs().max() > 0.1 * base.abs().max()


def test_planted_permutations_through_cat_and_flatten_blocks():
    torch.manual_seed(0)
    model = build_user_cnn(width=16).eval()
    x = torch.randn(4, 1, 28, 28)
    spec = derive_spec(model, x[:1])
    sd = randomized_state(model)
    copies = [{k: v.float() if torch.is_floating_point(v) else v for k, v in c.items()}
              for c in planted_copies(spec, sd, 3, 0.0, seed=2)]
    merged = realign_and_merge(spec, copies, AlignConfig(max_iter=20, device="cpu"))
    base = float64_outputs(model, sd, x)
    torch.testing.assert_close(float64_outputs(model, merged, x), base, rtol=1e-4, atol=1e-4 * base.abs().max().item())


# --- small models for single rules ------------------------------------------------------------

class SqueezeExcite(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = F.silu(self.dw(self.conv(x)))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.head((scale * x).mean(dim=(2, 3)))


class ChannelsLast(nn.Module):
    """ConvNeXt-style: permute to channels-last, LayerNorm and Linear over the last axis, permute back."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.LayerNorm(c)
        self.up, self.down = nn.Linear(c, 16), nn.Linear(16, c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.conv(x)
        y = self.down(F.gelu(self.up(self.norm(x.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.head(torch.flatten(F.adaptive_max_pool2d(x + self.gamma * y, 1), 1))


class Grouped(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(groups, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(F.relu(self.norm(self.conv(x))).mean((2, 3)))


class Blocks(nn.Module):
    """Halves of a cat swapped by chunk + cat, then a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(10, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        first, second = torch.split(torch.cat([self.a(x), self.b(x)], 1), [4, 6], dim=1)
        h = F.relu(self.mix(torch.cat([second, first], dim=1)))
        return self.head(self.grouped(h).amax(dim=(2, 3)))


class FlatLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.LayerNorm([6, 8, 8])
        self.head = nn.Linear(6 * 64, 5)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).reshape(x.size(0), -1))


def test_squeeze_excitation_and_depthwise_tie_one_group():
    spec = derive_spec(SqueezeExcite().eval(), torch.randn(2, 3, 8, 8))
    assert spec.groups == {"conv": 8, "fc1": 4}
    assert spec.axes["fc2.weight"][0] == spec.axes["dw.weight"][0] == spec.axes["conv.weight"][0]


def test_channels_last_layer_norm_and_layer_scale_permute_channels():
    spec = derive_spec(ChannelsLast().eval(), torch.randn(2, 3, 8, 8))
    assert spec.groups == {"gamma": 8, "up": 16}  # named after the first state entry holding it
    assert spec.axes["gamma"][0] == spec.axes["norm.weight"][0] == spec.axes["down.weight"][0]


def test_layer_norm_over_channels_and_space_still_permutes_channels():
    spec = derive_spec(FlatLayerNorm().eval(), torch.randn(2, 3, 8, 8))
    assert spec.axes["norm.weight"] == ((("conv", 6, 1),), ((None, 8, 1),), ((None, 8, 1),))
    assert spec.axes["head.weight"][1] == (("conv", 6, 64),)


@pytest.mark.parametrize("groups,permuted", [(4, False), (1, True), (16, True)])
def test_group_norm_permutes_only_with_one_group_or_one_channel_per_group(groups, permuted):
    spec = derive_spec(Grouped(groups).eval(), torch.randn(2, 3, 8, 8))
    assert ("conv" in spec.groups) == permuted
    assert any(f"GroupNorm({groups}, 16) keeps its channels fixed" in n for n in spec.notes) == (not permuted)


def test_split_of_a_cat_keeps_its_blocks_and_grouped_conv_fixes():
    spec = derive_spec(Blocks().eval(), torch.randn(2, 3, 8, 8))
    assert spec.axes["mix.weight"][1] == (("b", 6, 1), ("a", 4, 1))
    assert "mix" not in spec.groups and any("grouped conv" in n for n in spec.notes)


def test_opaque_unknown_path_is_refused():
    with pytest.raises(SpecError, match="not submodules"):
        derive_spec(SqueezeExcite(), torch.randn(1, 3, 8, 8), opaque_modules=["nope"])


def test_spec_round_trips_through_plain_data():
    spec = derive_spec(build_user_cnn(width=8).eval(), torch.randn(1, 1, 16, 16))
    again = DerivedSpec.from_dict(spec.to_dict())
    assert again.perm_spec == spec.perm_spec and again.axes == spec.axes and again.layer_parts == spec.layer_parts


def test_verification_rejects_a_spec_that_misses_a_tie():
    model = SqueezeExcite().eval()
    x = torch.randn(2, 3, 8, 8)
    spec = derive_spec(model, x)
    broken = spec.to_dict()
    broken["axes"]["fc2.bias"] = [[[None, 8, 1]]]
    with pytest.raises(SpecError, match="failed verification.*'conv'"):
        verify(model, (x,), DerivedSpec.from_dict(broken))


# --- refusals ---------------------------------------------------------------------------------

class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class CustomFunction(nn.Module):
    def forward(self, x):
        return Double.apply(x)


class Sorted(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=1).values


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class Sdpa(nn.Module):
    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x)


class Host(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(4, 8), nn.Sequential(nn.ReLU(), inner), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(F.relu(self.block(self.inp(x).unsqueeze(1)).squeeze(1)))


REFUSED = {  # the inner module, the op named, the reason, the module path named
    "custom-function": (CustomFunction, "Double.apply", "custom torch.autograd.Function", "block.1"),
    "sort": (Sorted, "torch.sort", "orders entries by value", "block.1"),
    "control-flow": (DataDependent, "TraceError", "control flow", "block.1"),
    "multihead-attention": (Attention, "MultiheadAttention module", "attention internals", "block.1.attn"),
    "sdpa": (Sdpa, "scaled_dot_product_attention", "attention internals", "block.1"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_ops_are_refused_with_where_and_what_to_do(case):
    inner, op, why, path = REFUSED[case]
    with pytest.raises(SpecError) as err:
        derive_spec(Host(inner()), torch.randn(2, 4))
    message = str(err.value)
    assert op in message and why in message
    assert f"'{path}'" in message and f'opaque_modules: ["{path}"]' in message
    if case != "control-flow":
        assert "graph node" in message and "Supported:" in message
    spec = derive_spec(Host(inner()), torch.randn(2, 4), opaque_modules=["block.1"])
    assert spec.groups == {} and spec.layer_parts.keys() >= {"inp", "out"}


def test_refusal_comes_before_running_the_model():
    # The example input has the wrong width: running the model would fail, but the refusal comes first.
    with pytest.raises(SpecError, match="torch.sort"):
        derive_spec(Host(Sorted()), torch.randn(2, 5))


def test_counted_group_sizes_of_densenet_blocks_are_kept():
    model = torchvision.models.densenet121(weights=None, num_classes=10).eval()
    spec = derive_spec(model, torch.randn(1, 3, 32, 32), verify=False)
    blocks = spec.axes["features.denseblock1.denselayer3.norm1.weight"][0]
    assert [n for _, n, _ in blocks] == [64, 32, 32]
    assert Counter(spec.groups.values())[32] == 6 + 12 + 24 + 16

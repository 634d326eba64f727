"""Averaging in the universe and the merge-then-repair recipe shared by the stages."""

import pytest
import torch

from cyclemerge.averaging import average, to_universe_all
from cyclemerge.config import ModelConfig
from cyclemerge.models import build_model
from cyclemerge.permutation import random_perms
from cyclemerge.stages.repair import merge_and_repair


def _sd(seed):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch="mlp", hidden=[8, 6]), in_channels=1, image_size=4, num_classes=3).state_dict()


def test_average_of_copies_is_bit_identical_and_weights_are_convex():
    sd = _sd(0)
    assert all(torch.equal(average([sd] * 5)[k], sd[k]) for k in sd)
    a, b = _sd(1), _sd(2)
    mix = average([a, b], weights=[3, 1])
    assert torch.allclose(mix["layers.0.weight"], 0.75 * a["layers.0.weight"] + 0.25 * b["layers.0.weight"])
    with pytest.raises(ValueError, match="2 state dicts but 3 weights"):
        average([a, b], weights=[1, 1, 1])


def test_merging_permuted_copies_in_the_universe_returns_the_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="mlp", hidden=[8, 6]), in_channels=1, image_size=4, num_classes=3)
    spec, sd = model.perm_spec(), model.state_dict()
    g = torch.Generator().manual_seed(0)
    perms = [random_perms(spec, sd, g) for _ in range(3)]
    # model i is the universe model seen through perms[i]^-1, so mapping it by perms[i] undoes that
    from cyclemerge.permutation import from_universe

    copies = [from_universe(sd, spec, p) for p in perms]
    merged, repaired = merge_and_repair(model, to_universe_all(copies, spec, perms), method="none",
                                        x=torch.randn(10, 1, 4, 4), batch_size=5)
    assert all(torch.allclose(merged[k], sd[k]) for k in sd)
    assert all(torch.equal(repaired[k], merged[k]) for k in sd)
    with pytest.raises(ValueError, match="statistics"):
        merge_and_repair(model, copies, method="repair", x=torch.randn(10, 1, 4, 4), batch_size=5)

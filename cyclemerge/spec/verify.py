"""Verification: a permuted model must compute the same function, or the spec is not returned.

The check runs on a float64 copy whose tensors are first randomized: a freshly initialized norm
(weight 1, bias 0, running statistics 0/1) is invariant under every permutation and would hide a
missing tie. All groups are permuted at once (cheap); when that fails, each group alone finds the
culprits, so the error names the group and the tensors it touches.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from cyclemerge.permutation import check_spec
from cyclemerge.spec.derived import DerivedSpec
from cyclemerge.spec.errors import SpecError


def _randomize(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not torch.is_floating_point(t) or t.numel() == 0:
                continue
            noise = torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
            if name.endswith("running_var"):
                t.mul_(torch.exp(0.3 * noise))
                continue
            scale = t.std().item() if t.numel() > 1 else 0.0
            t.add_(0.2 * noise * (scale if scale > 0 else 1.0))


def _flat(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in _flat(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in _flat(v)]
    return []


def _error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        if not torch.is_floating_point(x):
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        scale = x.abs().max().item() or 1.0
        worst = max(worst, (x - y).abs().max().item() / scale)
    return worst


def _inputs(inputs: tuple, generator: torch.Generator) -> tuple:
    return tuple(torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
                 if isinstance(x, torch.Tensor) and torch.is_floating_point(x) else x for x in inputs)


def verify(model: nn.Module, inputs: tuple, spec: DerivedSpec, *, rtol: float = 1e-5, trials: int = 1,
           seed: int = 0) -> float:
    """Largest relative output change over ``trials`` joint random permutations; raises above ``rtol``."""
    gen = torch.Generator().manual_seed(seed)
    work = copy.deepcopy(model).double().eval()
    _randomize(work, gen)
    original = work.state_dict()
    # Some modules read the state dict's version metadata when loading (torchvision's MNASNet).
    metadata = getattr(original, "_metadata", None)
    state = {k: v.detach().clone() for k, v in original.items()}
    check_spec(spec.perm_spec, spec.view(state))
    roundtrip = spec.unview(spec.view(state))
    bad = [k for k in state if not torch.equal(roundtrip[k], state[k])]
    if bad:
        raise SpecError(f"derived spec: view/unview does not restore {bad[:5]} (a bug in the block layouts)")
    x = _inputs(inputs, gen)

    def run(perms) -> float:
        permuted = OrderedDict(spec.apply(state, perms))
        if metadata is not None:
            permuted._metadata = metadata
        work.load_state_dict(permuted)
        with torch.no_grad():
            return _error(base, _flat(work(*x)))

    try:
        with torch.no_grad():
            base = _flat(work(*x))
        unpermuted = run({})
    except Exception as err:
        raise SpecError(
            f"cannot verify the derived spec: the float64 copy of the model fails ({type(err).__name__}: {err}); "
            "verification needs a model that runs in float64 on its device"
        ) from err
    if unpermuted > rtol:
        raise SpecError(f"cannot verify the derived spec: two eval-mode runs of the model differ by {unpermuted:.2e}; "
                        "the model is not deterministic (random ops in eval mode?)")
    worst = 0.0
    try:
        for _ in range(trials):
            perms = {g: torch.randperm(n, generator=gen) for g, n in spec.groups.items()}
            worst = max(worst, run(perms))
        if worst > rtol:
            culprits = []
            for g, n in spec.groups.items():
                err = run({g: torch.randperm(n, generator=gen)})
                if err > rtol:
                    keys = [k for k, axes in spec.axes.items() if any(s[0] == g for a in axes for s in a)]
                    culprits.append(f"{g!r} (size {n}, relative change {err:.2e}; tensors {keys[:6]})")
            raise SpecError(
                f"derived spec failed verification: permuting its groups changes the outputs by {worst:.2e} "
                f"(> {rtol:g}); groups that break it: {culprits or 'only in combination'}. This is a bug in "
                "a rule of cyclemerge.spec; as a workaround, mark the modules around these tensors opaque"
            )
    finally:
        del work
    return worst

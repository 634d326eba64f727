"""The refusal: what cannot be reasoned about, where it is, and what the user can do."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED = (
    "modules: Linear, Conv1d/2d/3d and ConvTranspose (groups=1; depthwise groups=channels; other groups "
    "fix their channels), BatchNorm, InstanceNorm, LayerNorm, RMSNorm, GroupNorm (permuted only with one "
    "group or one channel per group), LocalResponseNorm (fixes channels), Embedding, PReLU, elementwise "
    "activations (ReLU, ReLU6, LeakyReLU, GELU, SiLU, Mish, Hardswish, Hardsigmoid, Sigmoid, Tanh, ELU, "
    "SELU, CELU, Softplus, ...), Softmax/LogSoftmax, Dropout*, Identity, max/avg/adaptive/LP pooling, "
    "Upsample, padding layers, Flatten, Unflatten; "
    "functions and methods: the same ops as F.*/torch.*/Tensor methods (linear, conv*, batch_norm, "
    "layer_norm, group_norm, activations, pooling, interpolate, pad), add/sub/mul/div/pow/maximum/minimum/"
    "where/comparisons with broadcasting, matmul/mm/bmm/@, cat/concat/stack, split/chunk/unbind, indexing "
    "with ints/slices/None/..., view/reshape/flatten/unflatten/squeeze/unsqueeze, permute/transpose/"
    "movedim/T, expand/repeat, mean/sum/amax/amin/max/min/std/var/norm/logsumexp over dims, argmax/argmin, "
    "cumsum (fixes the axis), gather/index_select/scatter/einsum (fix their operands), size/shape/dim, "
    "torch._assert, tensor factories (fixed), *_like, dtype/device casts, contiguous/clone/detach, "
    "torchvision's stochastic_depth"
)


class SpecError(ValueError):
    """A permutation spec cannot be derived (or failed its verification)."""


@dataclass(frozen=True)
class Refusal:
    op: str
    node: str
    module: str
    why: str

    def line(self) -> str:
        where = f"in module {self.module!r}" if self.module else "in the top-level forward"
        return f"{self.op} (graph node {self.node!r}, {where}): {self.why}"


def how_to_proceed(module: str) -> str:
    example = module or "blocks.3.attn"
    return (
        "To proceed, treat the module as opaque: list its path in model.opaque_modules (e.g. "
        f'model.opaque_modules: ["{example}"], or derive_spec(..., opaque_modules=["{example}"])); an opaque '
        "module is kept whole and every axis at its boundary is fixed, so the rest of the model is still "
        "permuted. Code outside any submodule must first be moved into a submodule to be made opaque."
    )


def refusal_error(refusals: list[Refusal]) -> SpecError:
    shown = refusals[:8]
    more = f"\n  ... and {len(refusals) - len(shown)} more" if len(refusals) > len(shown) else ""
    modules = sorted({r.module for r in refusals if r.module})
    suggestion = how_to_proceed(modules[0] if modules else "")
    if len(modules) > 1:
        suggestion += f" Modules to list here: {modules}."
    return SpecError(
        f"cannot derive a permutation spec: {len(refusals)} op(s) it cannot reason about:\n  "
        + "\n  ".join(r.line() for r in shown) + more
        + f"\n{suggestion}\nSupported: {SUPPORTED}."
    )

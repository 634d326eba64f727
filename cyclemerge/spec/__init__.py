"""Permutation specs derived from a model's torch.fx graph (issue 13: merge any PyTorch model).

    spec = derive_spec(model, example_input, opaque_modules=["blocks.3.attn"])
    spec.perm_spec, spec.stat_points, spec.layer_parts, spec.summary()

Every axis of every parameter, buffer and intermediate value is a union-find node; one rule per op
ties the axes that must share a permutation (:mod:`.table` lists them); axes that reach the model's
input or output are fixed. The spec is verified by random permutation before it is returned.
"""

from cyclemerge.spec.derive import derive_spec
from cyclemerge.spec.derived import AxisSpec, DerivedSpec, Piece
from cyclemerge.spec.errors import SUPPORTED, SpecError

__all__ = ["SUPPORTED", "AxisSpec", "DerivedSpec", "Piece", "SpecError", "derive_spec"]

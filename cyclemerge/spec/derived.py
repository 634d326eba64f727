"""The result of deriving a spec: a PermSpec, the block layouts behind it, stat points and layer parts.

A :data:`~cyclemerge.permutation.PermSpec` gives every tensor axis ONE group, permuted by one index
vector of the axis's length. Most models need nothing more, and then ``perm_spec`` is keyed by the
model's own state-dict keys: a drop-in for a hand-written spec.

Two things a PermSpec cannot say: an axis made of blocks from different groups (the input channels of
a conv after ``torch.cat([a, b], 1)``: its permutation is block-diagonal, ``P_a ⊕ P_b``), and an axis
where each channel owns ``inner`` consecutive entries (a Linear after flattening ``[C, H, W]``: its
permutation is ``P_C ⊗ I_{H·W}``). Both are exact in :attr:`DerivedSpec.axes`, and
:meth:`DerivedSpec.apply` permutes real state dicts with them. For the matching methods, which read
PermSpecs only, such a tensor is *viewed* as pieces: one slice per block, an ``inner > 1`` block
reshaped to ``(channels, inner)``, each piece with plain groups. ``perm_spec`` is then keyed by the
view (``view(sd)``); ``unview`` puts the pieces back. Matching on the view optimizes exactly the
same objective (each piece is a sub-block of the tensor, tied by the same permutations).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from cyclemerge.permutation import PermSpec, Perms, StateDict

# (group or None, channels, entries per channel); a fixed run is (None, length, 1).
SegmentSpec = tuple[str | None, int, int]
AxisSpec = tuple[SegmentSpec, ...]


@dataclass(frozen=True)
class Piece:
    name: str
    index: tuple[slice, ...]
    shape: tuple[int, ...]
    spec: tuple[str | None, ...]


def _is_plain(axis: AxisSpec) -> bool:
    return len(axis) == 1 and axis[0][2] == 1


def _pieces(key: str, shape: tuple[int, ...], axes: tuple[AxisSpec, ...]) -> list[Piece]:
    per_axis = []
    for a, (n, segments) in enumerate(zip(shape, axes)):
        if _is_plain(segments):
            per_axis.append([(slice(0, n), (n,), (segments[0][0],), "")])
            continue
        options, offset = [], 0
        for group, size, inner in segments:
            stop = offset + size * inner
            view = ((size, inner), (group, None)) if group is not None and inner > 1 else ((size * inner,), (group,))
            options.append((slice(offset, stop), view[0], view[1], f"[{a}:{offset}:{stop}]"))
            offset = stop
        per_axis.append(options)
    pieces = []
    for combo in itertools.product(*per_axis):
        pieces.append(Piece(key + "".join(c[3] for c in combo), tuple(c[0] for c in combo),
                            tuple(n for c in combo for n in c[1]), tuple(g for c in combo for g in c[2])))
    return pieces


@dataclass
class DerivedSpec:
    """Everything the pipeline needs from a model's graph; see the module docstring for ``view``."""

    groups: dict[str, int]
    axes: dict[str, tuple[AxisSpec, ...]]
    shapes: dict[str, tuple[int, ...]]
    stat_points: dict[str, str]
    layer_parts: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    max_relative_change: float | None = None  # of the outputs under random permutations, when verified
    perm_spec: PermSpec = field(init=False)
    pieces: dict[str, list[Piece]] = field(init=False)

    def __post_init__(self) -> None:
        self.perm_spec, self.pieces = {}, {}
        for key, axes in self.axes.items():
            if all(_is_plain(a) for a in axes):
                self.perm_spec[key] = tuple(a[0][0] for a in axes)
                continue
            self.pieces[key] = _pieces(key, self.shapes[key], axes)
            self.perm_spec.update({p.name: p.spec for p in self.pieces[key]})

    @property
    def composite_keys(self) -> list[str]:
        """State-dict keys with a block-structured axis; empty when ``perm_spec`` uses the real keys."""
        return list(self.pieces)

    @property
    def gate_parts(self) -> dict[str, list[str]]:
        return self.layer_parts

    def renamed(self, names: dict[str, str]) -> "DerivedSpec":
        """The same spec with groups renamed (``names``: old -> new; unlisted groups keep their names),
        e.g. to keep the names of a hand-written spec it replaces."""
        new = {g: names.get(g, g) for g in self.groups}
        if len(set(new.values())) != len(new):
            raise ValueError(f"renamed: two groups would share a name in {names}")

        def axis(segments: AxisSpec) -> AxisSpec:
            return tuple((new.get(g, g) if g is not None else None, n, i) for g, n, i in segments)

        return DerivedSpec(
            groups={new[g]: n for g, n in self.groups.items()},
            axes={k: tuple(axis(a) for a in axes) for k, axes in self.axes.items()},
            shapes=dict(self.shapes),
            stat_points={p: new[g] for p, g in self.stat_points.items()},
            layer_parts={k: list(v) for k, v in self.layer_parts.items()},
            notes=list(self.notes),
            seconds=dict(self.seconds),
            max_relative_change=self.max_relative_change,
        )

    def attach(self, model: nn.Module) -> nn.Module:
        """Give ``model`` the ``perm_spec()``, ``layer_parts()`` and ``stat_points()`` methods of
        :class:`cyclemerge.models.PermutableModel`, answered from this spec (returns the model).

        With block-structured tensors (``composite_keys``), ``perm_spec()`` describes ``view(sd)``, not
        the state dict itself: callers must match on views and map with :meth:`apply`; a caller that
        does not gets a loud ``check_spec`` error, never a silently wrong permutation.
        """
        model.perm_spec = lambda: dict(self.perm_spec)
        model.layer_parts = lambda: {k: list(v) for k, v in self.layer_parts.items()}
        model.stat_points = lambda: dict(self.stat_points)
        return model

    def view(self, state_dict: StateDict) -> StateDict:
        out: StateDict = {}
        for key, tensor in state_dict.items():
            if key not in self.pieces:
                out[key] = tensor
                continue
            for p in self.pieces[key]:
                out[p.name] = tensor[p.index].reshape(p.shape)
        return out

    def unview(self, viewed: StateDict) -> StateDict:
        out: StateDict = {}
        for key, shape in self.shapes.items():
            if key not in self.pieces:
                out[key] = viewed[key]
                continue
            first = viewed[self.pieces[key][0].name]
            tensor = torch.empty(shape, dtype=first.dtype, device=first.device)
            for p in self.pieces[key]:
                tensor[p.index] = viewed[p.name].reshape(tensor[p.index].shape)
            out[key] = tensor
        return out

    def index(self, key: str, axis: int, perms: Perms) -> torch.Tensor | None:
        """The gather index of one axis under ``perms`` (None: the axis does not move)."""
        segments = self.axes[key][axis]
        if all(g is None or g not in perms for g, _, _ in segments):
            return None
        parts, offset = [], 0
        for group, size, inner in segments:
            if group is None or group not in perms:
                parts.append(torch.arange(offset, offset + size * inner))
            else:
                p = perms[group].cpu().long()
                parts.append(offset + (p[:, None] * inner + torch.arange(inner)[None, :]).reshape(-1))
            offset += size * inner
        return torch.cat(parts)

    def apply(self, state_dict: StateDict, perms: Perms) -> StateDict:
        """``apply_perms`` on the real state dict, block layouts included (same index convention)."""
        out: StateDict = {}
        for key, tensor in state_dict.items():
            for axis in range(len(self.axes.get(key, ()))):
                idx = self.index(key, axis, perms)
                if idx is not None:
                    tensor = tensor.index_select(axis, idx.to(tensor.device))
            out[key] = tensor
        return out

    def summary(self) -> dict:
        """Groups and sizes, for run params and logs."""
        return {
            "num_groups": len(self.groups),
            "permuted_channels": sum(self.groups.values()),
            "groups": dict(self.groups),
            "stat_points": len(self.stat_points),
            "layer_parts": len(self.layer_parts),
            "composite_keys": self.composite_keys,
            "fixed_notes": list(self.notes),
            "seconds": dict(self.seconds),
            "max_relative_change": self.max_relative_change,
        }

    def to_dict(self) -> dict:
        """Plain JSON-able data, so a spec can be cached beside the checkpoints and reloaded."""
        return {
            "groups": self.groups,
            "axes": {k: [[list(s) for s in a] for a in axes] for k, axes in self.axes.items()},
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "stat_points": self.stat_points,
            "layer_parts": self.layer_parts,
            "notes": self.notes,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "DerivedSpec":
        return cls(
            groups=dict(data["groups"]),
            axes={k: tuple(tuple(tuple(s) for s in a) for a in axes) for k, axes in data["axes"].items()},
            shapes={k: tuple(v) for k, v in data["shapes"].items()},
            stat_points=dict(data["stat_points"]),
            layer_parts={k: list(v) for k, v in data["layer_parts"].items()},
            notes=list(data.get("notes", [])),
            seconds=dict(data.get("seconds", {})),
        )

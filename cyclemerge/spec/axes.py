"""Axes as union-find nodes, and the block layouts that cat and flatten give them.

Every axis of every graph value and every state tensor is described by a *layout*: a sequence of
segments, each ``(node, size, inner)``. A segment covers ``size * inner`` consecutive entries; entry
``c * inner + r`` belongs to channel ``c`` of union-find node ``node``. A plain feature axis is one
segment with ``inner = 1``; ``torch.cat`` along channels gives one segment per input; flattening
``[C, H, W]`` gives one segment with ``inner = H * W``. Node ``FIXED`` is never permuted: batch and
spatial axes, the model's inputs and outputs, and everything an op ties to them.

Parameters and buffers start *unbound* (:class:`ParamAxis`): the first op that uses an axis gives it
that op's layout (a conv's input axis takes the cat layout of its input), later uses tie to it.
Two layouts tie when they have the same segment structure (their nodes are joined pairwise);
otherwise every node in both is fixed, which is always sound, and the reason is kept as a note.
"""

from __future__ import annotations

from dataclasses import dataclass

FIXED = 0


@dataclass(frozen=True)
class Segment:
    node: int
    size: int
    inner: int = 1

    @property
    def length(self) -> int:
        return self.size * self.inner


Layout = tuple[Segment, ...]


@dataclass(frozen=True)
class ParamAxis:
    """Axis ``axis`` of state-dict entry ``key``, whose layout is looked up (or bound) lazily."""

    key: str
    axis: int
    size: int


Axis = Layout | ParamAxis


@dataclass(frozen=True)
class TensorAxes:
    """The layout of each axis of one tensor value."""

    axes: tuple[Axis, ...]


def trivial(length: int) -> Layout:
    return (Segment(FIXED, length, 1),)


def layout_length(layout: Layout) -> int:
    return sum(s.length for s in layout)


def repeat(layout: Layout, times: int) -> Layout:
    return tuple(layout) * times


def expand(layout: Layout, inner: int) -> Layout:
    """Each entry becomes ``inner`` consecutive entries (an axis flattened with the ones after it)."""
    return tuple(Segment(s.node, s.size, s.inner * inner) if s.node != FIXED else Segment(FIXED, s.length * inner)
                 for s in layout)


class AxisGraph:
    """Union-find over channel nodes, the layouts bound to state-tensor axes, and notes on fixing."""

    def __init__(self) -> None:
        self.parent = [FIXED]
        self.sizes = [0]
        self.bound: dict[tuple[str, int], Layout] = {}
        self.notes: list[str] = []

    def fresh(self, size: int) -> Layout:
        if size <= 1:
            return trivial(size)
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        return (Segment(len(self.parent) - 1, size, 1),)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if FIXED not in (ra, rb) and self.sizes[ra] != self.sizes[rb]:
            raise AssertionError(f"union of nodes of sizes {self.sizes[ra]} and {self.sizes[rb]}")
        # FIXED (0) is the smallest id, so it always stays the root of its set.
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo

    def normalize(self, layout: Layout) -> Layout:
        """Segments with their current roots; fixed segments merged into runs."""
        out: list[Segment] = []
        for s in layout:
            root = self.find(s.node)
            seg = Segment(FIXED, s.length) if root == FIXED else Segment(root, s.size, s.inner)
            if seg.node == FIXED and out and out[-1].node == FIXED:
                seg = Segment(FIXED, out.pop().length + seg.length)
            if seg.length:
                out.append(seg)
        return tuple(out) or trivial(0)

    def resolve(self, axis: Axis) -> Axis:
        if isinstance(axis, ParamAxis):
            return self.bound.get((axis.key, axis.axis), axis)
        return axis

    def concrete(self, axis: Axis) -> Layout:
        """The axis's layout; an unbound parameter axis gets a fresh node of its own."""
        axis = self.resolve(axis)
        if isinstance(axis, ParamAxis):
            layout = self.fresh(axis.size)
            self.bound[(axis.key, axis.axis)] = layout
            return layout
        return axis

    def is_trivial(self, axis: Axis) -> bool:
        return all(s.node == FIXED for s in self.normalize(self.concrete(axis)))

    def tie(self, a: Axis, b: Axis, where: str) -> None:
        """``a`` and ``b`` must take one permutation."""
        a, b = self.resolve(a), self.resolve(b)
        if isinstance(a, ParamAxis) and isinstance(b, ParamAxis):
            if (a.key, a.axis) == (b.key, b.axis):
                return
            self.bound[(b.key, b.axis)] = self.concrete(a)
            return
        if isinstance(a, ParamAxis):
            a, b = b, a
        if isinstance(b, ParamAxis):
            self.bound[(b.key, b.axis)] = a
            return
        na, nb = self.normalize(a), self.normalize(b)
        if layout_length(na) != layout_length(nb):
            raise AssertionError(f"{where}: tying axes of lengths {layout_length(na)} and {layout_length(nb)}")
        if [(s.size, s.inner) for s in na] == [(s.size, s.inner) for s in nb]:
            for sa, sb in zip(na, nb):
                self.union(sa.node, sb.node)
            return
        why = f"{where}: block structures {describe(na)} and {describe(nb)} do not line up"
        self.fix(na, why)
        self.fix(nb, why)

    def fix(self, axis: Axis, why: str) -> None:
        layout = self.concrete(axis)
        if why and why not in self.notes and not all(self.find(s.node) == FIXED for s in layout):
            self.notes.append(why)
        for s in layout:
            self.union(FIXED, s.node)

    def cut(self, layout: Layout, start: int, stop: int) -> Layout | None:
        """Entries ``start:stop`` as a layout, or None when the cut splits a permuted segment."""
        out: list[Segment] = []
        offset = 0
        for s in self.normalize(layout):
            lo, hi = max(start, offset), min(stop, offset + s.length)
            if lo < hi:
                if s.node == FIXED:
                    out.append(Segment(FIXED, hi - lo))
                elif (lo, hi) == (offset, offset + s.length):
                    out.append(s)
                else:
                    return None
            offset += s.length
        return tuple(out) or trivial(0)

    def shrink(self, layout: Layout, inner: int) -> Layout | None:
        """Inverse of :func:`expand`: None when some segment does not repeat every entry ``inner`` times."""
        out: list[Segment] = []
        for s in self.normalize(layout):
            if s.node == FIXED:
                if s.length % inner:
                    return None
                out.append(Segment(FIXED, s.length // inner))
            elif s.inner % inner:
                return None
            else:
                out.append(Segment(s.node, s.size, s.inner // inner))
        return tuple(out)

    def same(self, a: Layout, b: Layout) -> bool:
        return self.normalize(a) == self.normalize(b)


def describe(layout: Layout) -> str:
    parts = ["fixed" + str(s.length) if s.node == FIXED else f"{s.size}" + (f"x{s.inner}" if s.inner > 1 else "")
             for s in layout]
    return "[" + ", ".join(parts) + "]"

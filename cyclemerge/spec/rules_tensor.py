"""Rules for tensor functions and methods: elementwise ops, shape ops, reductions, cat/split, indexing.

Each rule takes a :class:`Site` and returns the layouts of the node's output. Batch and spatial axes
carry fixed layouts, so the rules handle every axis alike: an axis that passes through an op keeps
its layout, one the op mixes or reorders is fixed. A reduction over a permuted axis is invariant
(a sum does not depend on the order of its terms), so it needs no tie; an argmax does, so it fixes.
"""

from __future__ import annotations

import operator

from cyclemerge.spec.axes import TensorAxes, trivial
from cyclemerge.spec.site import Site, Value, fix_all, trivial_value
from cyclemerge.spec.trace import TensorMeta


def _dims(d, ndim: int) -> list[int]:
    if d is None:
        return list(range(ndim))
    if isinstance(d, int):
        d = [d]
    return sorted({int(x) % ndim for x in d}) if ndim else []


def elementwise(site: Site) -> Value:
    """Broadcasting: every operand axis that is not broadcast takes the output axis's permutation."""
    operands = site.tensor_args()
    if not isinstance(site.out, TensorMeta):
        if operands:
            return fix_all(site, "elementwise op without a tensor output")
        return None
    out = site.out_shape
    axes = []
    for i, n in enumerate(out):
        entry = None
        for a in operands:
            shape, value = site.shape(a), site.tensor(a)
            j = i - (len(out) - len(shape))
            if j < 0 or shape[j] != n:
                continue
            if entry is None:
                entry = value.axes[j]
            else:
                site.graph.tie(entry, value.axes[j], site.where)
        axes.append(entry if entry is not None else trivial(n))
    return TensorAxes(tuple(axes))


def first_operand(site: Site) -> Value:
    """Casts, copies and ``*_like`` factories: the output is laid out like the tensor they are called on."""
    return site.tensor(site.arg(0))


def factory(site: Site) -> Value:
    return trivial_value(site.out)


def no_tensor(site: Site) -> Value:
    """Shape queries and assertions: no tensor flows out."""
    return None


def shape_query(site: Site) -> Value:
    if isinstance(site.out, TensorMeta):
        return fix_all(site, "attribute with a tensor value")
    return None


# --- reductions -------------------------------------------------------------------------------

def _reduce(site: Site, dim_index: int, fix_reduced: bool) -> TensorAxes:
    x, src = site.tensor(site.arg(0)), site.shape(site.arg(0))
    out = site.out if isinstance(site.out, TensorMeta) else site.out[0]
    dims = _dims(site.const(site.arg(dim_index, "dim", site.node.kwargs.get("axis"))), len(src))
    keep = len(out.shape) == len(src) and len(src) > 0
    if fix_reduced:
        for d in dims:
            site.graph.fix(x.axes[d], f"{site.where}: the result depends on the order along a permuted axis")
    axes = [trivial(1) if d in dims else x.axes[d] for d in range(len(src)) if keep or d not in dims]
    return TensorAxes(tuple(axes))


def reduction(site: Site) -> Value:
    """A sum, mean, max, norm ... over an axis does not depend on the order of its entries."""
    return _reduce(site, 1, False)


def norm_reduction(site: Site) -> Value:
    return _reduce(site, 2, False)


def arg_reduction(site: Site) -> Value:
    return _reduce(site, 1, True)


def max_min(site: Site) -> Value:
    """torch.max/min: elementwise with a tensor, a full reduction alone, (values, indices) with a dim."""
    other = site.arg(1, "other", site.arg(1, "dim"))
    if site.tensor(other) is not None:
        return elementwise(site)
    if not isinstance(site.out, tuple):
        return _reduce(site, 1, False)
    indices_used = any(u.target is not operator.getitem or u.args[1] != 0 for u in site.node.users)
    values = _reduce(site, 1, indices_used)
    return (values, values)


def along_axis(site: Site) -> Value:
    """cumsum, flip, roll ...: order along the named axes matters, the other axes pass through."""
    x, src = site.tensor(site.arg(0)), site.shape(site.arg(0))
    name = site.node.target if isinstance(site.node.target, str) else site.node.target.__name__
    position = 2 if name == "roll" else 1
    dims = site.const(site.arg(position, "dims" if name in ("flip", "roll") else "dim"))
    for d in _dims(dims, len(src)):
        site.graph.fix(x.axes[d], f"{site.where}: {name} along a permuted axis")
    return TensorAxes(x.axes)


# --- joining and splitting --------------------------------------------------------------------

def cat(site: Site) -> Value:
    """The output axis is the inputs' layouts one after another: each block keeps its own groups."""
    tensors = site.arg(0, "tensors")
    out = site.out_shape
    d = int(site.const(site.arg(1, "dim", site.node.kwargs.get("axis", 0)))) % len(out)
    parts = [t for t in tensors if site.shape(t) is not None and len(site.shape(t)) == len(out)]
    axes = []
    for i, n in enumerate(out):
        if i == d:
            axes.append(tuple(s for t in parts for s in site.graph.concrete(site.tensor(t).axes[d])))
            continue
        entry = site.tensor(parts[0]).axes[i]
        for t in parts[1:]:
            site.graph.tie(entry, site.tensor(t).axes[i], site.where)
        axes.append(entry)
    return TensorAxes(tuple(axes))


def stack(site: Site) -> Value:
    tensors = site.arg(0, "tensors")
    out = site.out_shape
    d = int(site.const(site.arg(1, "dim", 0))) % len(out)
    first = site.tensor(tensors[0])
    for t in tensors[1:]:
        for a, b in zip(first.axes, site.tensor(t).axes):
            site.graph.tie(a, b, site.where)
    axes = list(first.axes)
    axes.insert(d, trivial(out[d]))
    return TensorAxes(tuple(axes))


def _pieces(site: Site, x: TensorAxes, d: int, lengths: list[int], keep_axis: bool) -> list[TensorAxes]:
    g = site.graph
    layout, offset, cuts = g.concrete(x.axes[d]), 0, []
    for n in lengths:
        cuts.append(g.cut(layout, offset, offset + n))
        offset += n
    if any(c is None for c in cuts):
        g.fix(layout, f"{site.where}: split inside a block of permuted channels")
        cuts = [trivial(n) for n in lengths]
    out = []
    for c in cuts:
        axes = list(x.axes)
        if keep_axis:
            axes[d] = c
        else:
            g.fix(c, f"{site.where}: unbind along a permuted axis")
            del axes[d]
        out.append(TensorAxes(tuple(axes)))
    return out


def split(site: Site) -> Value:
    """split/chunk/tensor_split: each piece is a cut of the axis; a cut inside a group fixes it."""
    x, src = site.tensor(site.arg(0)), site.shape(site.arg(0))
    pieces = list(site.out)
    name = site.node.target if isinstance(site.node.target, str) else site.node.target.__name__
    d = int(site.const(site.arg(2, "dim", 0))) % len(src)
    if name == "unbind":
        d = int(site.const(site.arg(1, "dim", 0))) % len(src)
        return tuple(_pieces(site, x, d, [1] * len(pieces), keep_axis=False))
    return tuple(_pieces(site, x, d, [m.shape[d] for m in pieces], keep_axis=True))


def narrow(site: Site) -> Value:
    x, src = site.tensor(site.arg(0)), site.shape(site.arg(0))
    d = int(site.const(site.arg(1, "dim"))) % len(src)
    start = int(site.const(site.arg(2, "start"))) % max(src[d], 1)
    return _pieces_at(site, x, d, start, site.out_shape[d])


def _pieces_at(site: Site, x: TensorAxes, d: int, start: int, length: int) -> TensorAxes:
    g = site.graph
    layout = g.concrete(x.axes[d])
    piece = g.cut(layout, start, start + length)
    if piece is None:
        g.fix(layout, f"{site.where}: slice inside a block of permuted channels")
        piece = trivial(length)
    axes = list(x.axes)
    axes[d] = piece
    return TensorAxes(tuple(axes))


def getitem(site: Site) -> Value:
    container, index = site.arg(0), site.const(site.arg(1))
    value = site.value(container)
    if not isinstance(value, TensorAxes):
        if isinstance(value, (list, tuple)):
            return value[index]
        if isinstance(value, dict):
            return value[index]
        return None
    return _index(site, value, site.shape(container), index)


def _index(site: Site, x: TensorAxes, shape: tuple[int, ...], index) -> Value:
    g = site.graph
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (TensorMeta, list)) for i in items):
        return fix_all(site, "advanced (tensor) indexing")
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    out, k = [], 0
    for item in items:
        if item is Ellipsis:
            span = len(shape) - consumed
            out.extend(x.axes[k:k + span])
            k += span
        elif item is None:
            out.append(trivial(1))
        elif isinstance(item, int):
            g.fix(x.axes[k], f"{site.where}: picking one entry of a permuted axis")
            k += 1
        elif isinstance(item, slice):
            start, stop, step = item.indices(shape[k])
            if (start, stop, step) == (0, shape[k], 1):
                out.append(x.axes[k])
            elif step == 1:
                out.append(_pieces_at(site, TensorAxes((x.axes[k],)), 0, start, max(stop - start, 0)).axes[0])
            else:
                g.fix(x.axes[k], f"{site.where}: strided slice of a permuted axis")
                out.append(trivial(len(range(start, stop, step))))
            k += 1
        else:
            return fix_all(site, f"indexing with {type(item).__name__}")
    out.extend(x.axes[k:])
    return TensorAxes(tuple(out))


def select(site: Site) -> Value:
    x, src = site.tensor(site.arg(0)), site.shape(site.arg(0))
    d = int(site.const(site.arg(1, "dim"))) % len(src)
    site.graph.fix(x.axes[d], f"{site.where}: picking one entry of a permuted axis")
    return TensorAxes(tuple(a for i, a in enumerate(x.axes) if i != d))


# --- products ---------------------------------------------------------------------------------

def matmul(site: Site) -> Value:
    """The contracted axes of both operands share one permutation; batch axes broadcast."""
    a, b = site.arg(0), site.arg(1, "other", site.arg(1, "mat2"))
    xa, xb = site.tensor(a), site.tensor(b)
    sa, sb = site.shape(a), site.shape(b)
    g = site.graph
    la, lb = list(xa.axes), list(xb.axes)
    va, vb = list(sa), list(sb)
    if len(va) == 1:
        la, va = [trivial(1)] + la, [1] + va
    if len(vb) == 1:
        lb, vb = lb + [trivial(1)], vb + [1]
    g.tie(la[-1], lb[-2], site.where)
    batch_a, batch_b = la[:-2], lb[:-2]
    n = max(len(batch_a), len(batch_b))
    batch = []
    for i in range(n):
        ia, ib = i - (n - len(batch_a)), i - (n - len(batch_b))
        sa_i = va[ia] if ia >= 0 else 1
        sb_i = vb[ib] if ib >= 0 else 1
        entry = batch_a[ia] if ia >= 0 and sa_i != 1 else None
        if ib >= 0 and sb_i != 1:
            if entry is None:
                entry = batch_b[ib]
            else:
                g.tie(entry, batch_b[ib], site.where)
        batch.append(entry if entry is not None else trivial(max(sa_i, sb_i)))
    out = batch + ([la[-2]] if len(sa) > 1 else []) + ([lb[-1]] if len(sb) > 1 else [])
    return TensorAxes(tuple(out))


def spatial(count: int):
    """Pooling/resampling over the last ``count`` axes: the leading (batch, channel) axes pass through."""

    def rule(site: Site) -> Value:
        x = site.tensor(site.arg(0))
        outs = site.out if isinstance(site.out, tuple) else (site.out,)
        values = []
        for m in outs:
            lead = x.axes[: len(m.shape) - count]
            values.append(TensorAxes(tuple(lead) + tuple(trivial(n) for n in m.shape[len(lead):])))
        return tuple(values) if isinstance(site.out, tuple) else values[0]

    return rule


def interpolate(site: Site) -> Value:
    return spatial(len(site.out_shape) - 2)(site)

